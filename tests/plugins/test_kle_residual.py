"""The KLE residual channel on synthetic images: anomalies stand out, results are deterministic, states reload."""

from __future__ import annotations

import numpy as np
import pytest

from autoseg.plugins import PluginError
from autoseg.plugins.channels import ChannelStack, load_state, save_state
from autoseg.plugins.kle import KLEResidual, _slice_choice, fit_basis

SHAPE = (24, 24, 24)


def _normal_case(rng: np.random.Generator, n_channels: int = 2) -> np.ndarray:
    """Smooth images spanned by three fixed patterns (per channel), plus a little noise."""
    z, y, x = np.meshgrid(*[np.linspace(0, np.pi, s) for s in SHAPE], indexing="ij")
    patterns = [np.cos(z), np.cos(y) * np.sin(x), np.cos(x + z)]
    out = np.empty((n_channels, *SHAPE), np.float32)
    for c in range(n_channels):
        out[c] = sum(rng.normal() * p for p in patterns) + 0.05 * rng.normal(size=SHAPE)
    return out


def _blob(center, sigma=2.0, amplitude=3.0) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    return amplitude * np.exp(-sum((g - c) ** 2 for g, c in zip(grid, center, strict=True)) / (2 * sigma ** 2))


@pytest.fixture(scope="module")
def cases():
    rng = np.random.default_rng(0)
    return [_normal_case(rng) for _ in range(10)], _normal_case(rng)


@pytest.mark.parametrize("ndim", [3, 2])
def test_an_inserted_blob_has_a_larger_residual_than_the_rest(cases, ndim):
    train, test = cases
    plugin = KLEResidual(grid=12, n_components=8)
    state = plugin.fit(train, ndim)
    blob = _blob((8, 15, 10))
    anomalous = test.copy()
    anomalous[0] += blob
    res = plugin.compute(state, anomalous, ndim)
    assert res.shape == (1, *SHAPE) and res.dtype == np.float32
    far = res[0][blob < 0.05]
    assert res[0, 8, 15, 10] > 1.3 * np.percentile(far, 99)
    assert plugin.compute(state, test, ndim)[0].max() < res[0, 8, 15, 10]  # the same case without the blob


def test_training_cases_get_cross_fitted_residuals_that_still_show_their_anomaly(cases):
    train, _ = cases
    train = [c.copy() for c in train]
    blob = _blob((12, 6, 16))
    train[3][1] += blob
    plugin = KLEResidual(grid=12, n_components=32)
    state = plugin.fit(train, 3)
    # in-sample, a basis of n - 1 components reconstructs every training case: its residual is (almost) zero
    assert plugin.compute(state, train[3], 3).max() < 1e-3
    channels = dict(plugin.training_channels(state, train, 3))
    assert sorted(channels) == list(range(len(train)))
    res = channels[3][0]
    assert res[12, 6, 16] > 1.3 * np.percentile(res[blob < 0.05], 99)
    assert min(ch.mean() for ch in channels.values()) > 0.01  # no training case has a blank channel
    with pytest.raises(PluginError, match="at least 3 training cases"):
        dict(plugin.training_channels(state, train[:2], 3))


def test_fit_is_deterministic_and_caps_components(cases):
    train, test = cases
    a = KLEResidual(grid=12, n_components=32).fit(train, 3)
    b = KLEResidual(grid=12, n_components=32).fit(list(train), 3)
    assert a["components"].shape == (9, 2 * 12 ** 3)  # 10 cases: at most 9 components
    assert all(np.array_equal(a[k], b[k]) for k in a)
    gram = a["components"] @ a["components"].T
    np.testing.assert_allclose(gram, np.eye(9), atol=1e-4)
    assert np.array_equal(KLEResidual(grid=12).compute(a, test, 3), KLEResidual(grid=12).compute(b, test, 3))


def test_basis_reconstructs_the_span_of_its_samples():
    rng = np.random.default_rng(1)
    basis = rng.normal(size=(3, 50))
    samples = (rng.normal(size=(20, 3)) @ basis).astype(np.float32)
    mean, comps, values = fit_basis(samples, 10)
    assert comps.shape[0] == 3 and np.all(np.diff(values) <= 0)  # rank 3: only three components survive
    centred = samples - mean
    np.testing.assert_allclose(centred - centred @ comps.T @ comps, 0, atol=1e-3)


def test_state_saved_as_npz_reloads_without_pickle_and_gives_the_same_channel(cases, tmp_path):
    train, test = cases
    plugin = KLEResidual(grid=12, n_components=4)
    state = plugin.fit(train, 3)
    save_state(tmp_path / "state.npz", state, {"plugin": "kle_residual", "params": {"grid": 12, "n_components": 4}})
    with np.load(tmp_path / "state.npz") as npz:  # allow_pickle stays False
        assert all(npz[k].dtype != object for k in npz.files)
    back, meta = load_state(tmp_path / "state.npz")
    assert meta["params"] == {"grid": 12, "n_components": 4} and set(back) == set(state)
    assert np.array_equal(plugin.compute(back, test, 3), plugin.compute(state, test, 3))
    with pytest.raises(PluginError, match="no objects"):
        save_state(tmp_path / "bad.npz", {"x": np.array([{}], dtype=object)}, {})
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(PluginError, match="broken.npz: not a readable plugin state"):
        load_state(tmp_path / "broken.npz")


def test_mismatched_channels_and_too_few_cases_are_refused(cases):
    train, test = cases
    state = KLEResidual(grid=8).fit(train[:3], 3)
    with pytest.raises(PluginError, match="fitted on 2-channel 3D data; this case has 1 channel"):
        KLEResidual(grid=8).compute(state, test[:1], 3)
    with pytest.raises(PluginError, match="at least 2 training cases"):
        KLEResidual(grid=8).fit(train[:1], 3)


def test_2d_fits_on_evenly_spaced_slices():
    picks = _slice_choice([10, 5, 7], 6)
    assert sum(p.size for p in picks) == 6 and all(p.max(initial=0) < d for p, d in zip(picks, [10, 5, 7]))
    assert [p.size for p in _slice_choice([3, 4], 100)] == [3, 4]


def test_channel_stack_reads_like_one_array():
    a, b = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5), np.ones((1, 4, 5), np.float32)
    stack = ChannelStack([a, b])
    assert stack.shape == (3, 4, 5) and stack.ndim == 3
    assert np.array_equal(stack[:, 1:3, 2:], np.concatenate([a, b])[:, 1:3, 2:])
    assert np.array_equal(stack[:, 2], np.concatenate([a, b])[:, 2])
    with pytest.raises(IndexError):
        stack[0]
