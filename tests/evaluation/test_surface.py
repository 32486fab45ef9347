"""Surface metrics against a brute-force computation and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from autoseg.evaluation.surface import (
    directed_surface_distances,
    image_diagonal_mm,
    surface_metrics,
    surface_voxels,
)


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Voxels with a face neighbour outside the mask, by explicit neighbour checks (outside image = out)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    out = np.zeros_like(mask)
    for ax in range(mask.ndim):
        for step in (-1, 1):
            out |= ~np.roll(padded, step, axis=ax)[inner]
    return mask & out


def brute_metrics(a: np.ndarray, b: np.ndarray, spacing, tol: float) -> dict[str, float]:
    pa = np.argwhere(brute_surface(a)) * np.asarray(spacing)
    pb = np.argwhere(brute_surface(b)) * np.asarray(spacing)
    dist = cdist(pa, pb)
    d_ab, d_ba = dist.min(axis=1), dist.min(axis=0)
    both = np.concatenate([d_ab, d_ba])
    return {"hd95": max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)), "assd": both.mean(),
            "nsd": np.count_nonzero(both <= tol) / both.size}


def blob(shape, seed: int, threshold: float = 0.55) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random(shape), sigma=1.2)
    return smooth > np.quantile(smooth, threshold)


@pytest.mark.parametrize("shape,spacing", [((13, 17), (0.7, 1.9)), ((7, 9, 11), (2.5, 0.8, 1.3))])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force(shape, spacing, seed):
    a, b = blob(shape, seed), blob(shape, seed + 100, threshold=0.6)
    assert a.any() and b.any()
    for tol in (0.5, 1.0, 2.0):
        got = surface_metrics(a, b, spacing, tolerance_mm=tol)
        want = brute_metrics(a, b, spacing, tol)
        for key in ("hd95", "assd", "nsd"):
            assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key


def test_surface_voxels_border_counts_as_surface():
    m = np.ones((2, 5), bool)
    assert surface_voxels(m).all()  # every voxel touches the image border
    m = np.ones((3, 4), bool)
    assert surface_voxels(m).sum() == 10 and not surface_voxels(m)[1, 1:3].any()
    m = np.ones((3, 3, 3), bool)
    s = surface_voxels(m)
    assert s.sum() == 26 and not s[1, 1, 1]
    assert np.array_equal(surface_voxels(blob((9, 10, 11), 5)), brute_surface(blob((9, 10, 11), 5)))


def test_small_masks_far_from_each_other_match_brute_force():
    # the bounding-box crop must not change anything when the masks are far apart or at the border
    a = np.zeros((20, 30), bool)
    b = np.zeros((20, 30), bool)
    a[0:3, 0:2] = True
    b[15:20, 25:30] = True
    b[10, 3] = True
    assert surface_metrics(a, b, (1.5, 0.4)) == pytest.approx(brute_metrics(a, b, (1.5, 0.4), 1.0))


@pytest.mark.parametrize("k", [1, 3, 7])
def test_single_voxels_k_apart(k):
    spacing = (2.0, 1.5, 0.7)
    a = np.zeros((5, 5, 12), bool)
    b = np.zeros_like(a)
    a[2, 2, 1] = True
    b[2, 2, 1 + k] = True
    m = surface_metrics(a, b, spacing, tolerance_mm=k * 0.7 - 0.01)
    assert m["hd95"] == pytest.approx(k * 0.7)
    assert m["assd"] == pytest.approx(k * 0.7)
    assert m["nsd"] == 0.0
    assert surface_metrics(a, b, spacing, tolerance_mm=k * 0.7)["nsd"] == 1.0
    # along the first axis the distance uses that axis' spacing
    c = np.zeros((12, 5, 5), bool)
    d = np.zeros_like(c)
    c[1, 2, 2] = d[1 + k, 2, 2] = True
    assert surface_metrics(c, d, (2.0, 1.5, 0.7))["hd95"] == pytest.approx(2.0 * k)


def test_cube_shifted_by_one_voxel():
    # 3x3x3 cube vs the same cube one voxel further along axis 0 (spacing 2 mm there, 1 mm in-plane).
    # Each direction: 9 face voxels at 2 mm, the far face's centre at 1 mm, 16 voxels at 0 mm.
    a = np.zeros((8, 7, 7), bool)
    a[2:5, 2:5, 2:5] = True
    b = np.roll(a, 1, axis=0)
    sp = (2.0, 1.0, 1.0)
    d_ab, d_ba = directed_surface_distances(a, b, sp)
    assert sorted(d_ab.tolist()) == [0.0] * 16 + [1.0] + [2.0] * 9
    assert sorted(d_ba.tolist()) == [0.0] * 16 + [1.0] + [2.0] * 9
    m = surface_metrics(a, b, sp, tolerance_mm=1.0)
    assert m["hd95"] == 2.0
    assert m["assd"] == pytest.approx(38 / 52)
    assert m["nsd"] == pytest.approx(34 / 52)
    assert surface_metrics(a, b, sp, tolerance_mm=2.0)["nsd"] == 1.0
    assert surface_metrics(a, a, sp) == {"hd95": 0.0, "assd": 0.0, "nsd": 1.0}


def test_empty_masks():
    a = np.zeros((4, 5, 6), bool)
    b = a.copy()
    b[1, 1, 1] = True
    sp = (3.0, 2.0, 1.0)
    both = surface_metrics(a, a, sp)
    assert all(math.isnan(v) for v in both.values())
    diag = math.sqrt(12.0**2 + 10.0**2 + 6.0**2)
    assert image_diagonal_mm(a.shape, sp) == pytest.approx(diag)
    for m in (surface_metrics(a, b, sp), surface_metrics(b, a, sp)):
        assert m["hd95"] == pytest.approx(diag) and m["assd"] == pytest.approx(diag) and m["nsd"] == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        directed_surface_distances(a, b, sp)


def test_invalid_inputs():
    a = np.zeros((4, 5), bool)
    with pytest.raises(ValueError, match="shape"):
        surface_metrics(a, np.zeros((4, 6), bool), (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        surface_metrics(a, a, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        surface_metrics(a, a, (1.0, 0.0))
    with pytest.raises(ValueError, match="tolerance"):
        surface_metrics(a, a, (1.0, 1.0), tolerance_mm=-1)
