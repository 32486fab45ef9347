"""Drift check: inputs unlike the training data (rescaled intensities, other spacing or size, other channels)
are found, and ordinary inputs from the same source are not."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from autoseg.data.synthetic import make_synthetic_dataset
from autoseg.fingerprint.drift import (
    MAX_INTENSITY_SAMPLES,
    DriftReference,
    check_case,
    check_header,
    intensity_percentiles,
    load_drift_reference,
)
from autoseg.fingerprint.extract import fingerprint_case, fingerprint_dataset
from autoseg.fingerprint.model import DatasetFingerprint
from autoseg.io.dataset import CaseFiles, DatasetSpec, load_dataset
from autoseg.preprocessing.preprocess import read_case


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """5 training cases and 6 unseen cases of one synthetic source (per-case intensity scale varies 1.8x)."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("drift") / "Dataset009_Drift", n_cases=5, n_test=6,
                                  shape=(20, 20, 20), kind="binary", seed=3)
    ds = load_dataset(root)
    fp = fingerprint_dataset(ds, progress=False)
    train = [(c.case_id, *read_case(c)[::2]) for c in ds.cases]
    unseen = []
    for p in sorted((root / "imagesTs").glob("*_0000.nii.gz")):
        cid = p.name[: -len("_0000.nii.gz")]
        images, _, geometry = read_case(CaseFiles(cid, (p,), None))
        unseen.append((cid, images, geometry))
    return fp, DriftReference.from_fingerprint(fp), train, unseen


def test_training_cases_and_unseen_cases_of_the_same_source_pass(source):
    fp, ref, train, unseen = source
    assert all(len(c.intensity_percentiles) == 1 for c in fp.cases)
    for cid, images, geometry in train + unseen:
        assert check_case(ref, images, geometry.array_spacing, cid, ["MR"]) == [], cid


@pytest.mark.parametrize("transform", [lambda a: a * 10, lambda a: a * 0.1, lambda a: a + 1000.0,
                                       lambda a: np.where(a != 0, a + 1000.0, 0)],
                         ids=["x10", "x0.1", "offset", "offset_inside"])
def test_rescaled_or_shifted_intensities_are_found(source, transform):
    _, ref, _, unseen = source
    for cid, images, geometry in unseen:
        found = check_case(ref, transform(images), geometry.array_spacing, cid)
        assert len(found) == 1, cid  # one finding per channel, geometry untouched
        f = found[0]
        assert f.quantity.startswith("intensity p") and f.quantity.endswith("of channel 'MR' (0000)")
        assert not f.low <= f.value <= f.high
        assert f.quantity in f.message and f"{f.value:.4g}" in f.message and cid in f.message
        assert f"training range {f.low:.4g} to {f.high:.4g}" in f.message and "scaling" in f.message


def test_spacing_far_from_training_warns_once_per_axis(source):
    _, ref, _, unseen = source
    cid, images, geometry = unseen[0]
    shape, spacing = images.shape[1:], geometry.array_spacing
    assert check_header(ref, shape, spacing, cid) == []
    finer = (spacing[0] / 3, spacing[1], spacing[2])  # the size along z shrinks 3x too: one finding, not two
    (f,) = check_header(ref, shape, finer, cid)
    assert (f.quantity, f.value, f.low, f.high) == ("spacing z", finer[0], ref.spacing[0].low, ref.spacing[0].high)
    assert "along z is 3.0x finer than the finest training spacing" in f.message
    assert f"{finer[0]:.4g} mm" in f.message and f"training range {f.low:.4g}-{f.high:.4g} mm" in f.message
    coarse = check_case(ref, images, (spacing[0], spacing[1], spacing[2] * 2.5), cid)
    assert [f.quantity for f in coarse] == ["spacing x"] and "2.5x coarser" in coarse[0].message


def test_field_of_view_far_larger_or_smaller_than_training_warns(source):
    _, ref, _, unseen = source
    cid, images, geometry = unseen[0]
    shape, spacing = images.shape[1:], geometry.array_spacing
    (big,) = check_header(ref, (shape[0], shape[1], shape[2] * 4), spacing, cid)
    assert big.quantity == "size x (mm)" and big.value == pytest.approx(shape[2] * 4 * spacing[2])
    assert f"{big.value:.4g} mm along x" in big.message and "larger than the largest" in big.message
    assert f"training range {big.low:.4g}-{big.high:.4g} mm" in big.message
    (small,) = check_header(ref, (shape[0] // 4, shape[1], shape[2]), spacing, cid)
    assert small.quantity == "size z (mm)" and "smaller than the smallest" in small.message
    assert check_header(ref, (shape[0], int(shape[1] * 1.5), shape[2]), spacing, cid) == []  # 1.5x: tolerated


def test_other_channel_names_are_a_finding(source):
    _, ref, _, unseen = source
    cid, images, geometry = unseen[0]
    (f,) = check_case(ref, images, geometry.array_spacing, cid, ["CT"])
    assert f.quantity == "channel names" and f.value == "CT" and "trained on MR" in f.message
    assert check_case(ref, images, geometry.array_spacing, cid, ["mr"]) == []  # case-insensitive


def test_old_fingerprint_without_percentiles_loads_and_skips_the_intensity_check(source, tmp_path):
    fp, _, _, unseen = source
    d = fp.to_json()
    for c in d["cases"]:
        del c["intensity_percentiles"]
    old = DatasetFingerprint.from_json(d)
    assert all(c.intensity_percentiles == () for c in old.cases)
    ref = DriftReference.from_fingerprint(old)
    assert ref.intensity == () and ref.spacing
    cid, images, geometry = unseen[0]
    assert check_case(ref, images * 10, geometry.array_spacing, cid) == []
    assert [f.quantity for f in check_case(ref, images * 10, (1.0, 1.0, 5.0), cid)] == ["spacing x"]
    assert DatasetFingerprint.from_json(fp.to_json()) == fp  # the new field round-trips
    old.save(tmp_path / "fingerprint.json")
    assert load_drift_reference(tmp_path) == ref
    assert load_drift_reference(tmp_path / "nowhere") is None
    (tmp_path / "fingerprint.json").write_text("{not json")
    assert load_drift_reference(tmp_path) is None  # a broken cache never stops a prediction


def test_2d_cases_are_compared_without_the_dummy_axis():
    spec = DatasetSpec.from_json({"channel_names": {"0": "R", "1": "G"}, "file_ending": ".png",
                                  "labels": {"background": 0, "cell": 1}, "numTraining": 4})
    rng = np.random.default_rng(0)

    def image(shape=(30, 40)):
        img = np.zeros((2, *shape), np.float32)
        img[:, 3:-3, 4:-4] = rng.uniform(80, 200) * rng.uniform(0.8, 1.2, (2, shape[0] - 6, shape[1] - 8))
        return img

    cases = tuple(fingerprint_case(f"c{i}", image(), np.zeros((30, 40), np.uint8), (0.5, 0.5), spec, 10, 0)[0]
                  for i in range(4))
    assert cases[0].shape == (1, 30, 40) and len(cases[0].intensity_percentiles) == 2
    fp = DatasetFingerprint("d", ("R", "G"), {"background": 0, "cell": 1}, 4, True, cases, ())
    ref = DriftReference.from_fingerprint(fp)
    assert check_case(ref, image(), (0.5, 0.5), "new") == []
    found = check_case(ref, image() * 10, (0.5, 0.5), "new")
    assert [f.quantity.split(" of ")[1] for f in found] == ["channel 'R' (0000)", "channel 'G' (0001)"]
    assert check_case(ref, image() * 10, (0.5, 0.5), "new", missing=[0, 1]) == []  # not acquired: not judged
    only_g = check_case(ref, image()[1:] * 10, (0.5, 0.5), "new", missing=[0])  # the present channels only
    assert [f.quantity.split(" of ")[1] for f in only_g] == ["channel 'G' (0001)"]
    assert check_case(ref, image()[1:], (0.5, 0.5), "new", missing=[0]) == []
    assert [f.quantity for f in check_header(ref, (30, 40), (0.5, 0.15), "new")] == ["spacing x"]
    assert [f.quantity for f in check_header(ref, (30, 160), (0.5, 0.5), "new")] == ["size x (mm)"]


def test_percentiles_are_of_the_nonzero_region_and_cheap_on_large_images():
    img = np.zeros((2, 10, 10, 10), np.float32)
    img[0, :5] = 7.0  # channel 1 is zero where channel 0 is not: the region is "any channel nonzero"
    assert intensity_percentiles(img) == ((7.0, 7.0, 7.0), (0.0, 0.0, 0.0))
    assert intensity_percentiles(np.zeros((1, 4, 4))) == ((0.0, 0.0, 0.0),)  # empty region: whole image
    rng = np.random.default_rng(1)
    big = np.zeros((1, 80, 80, 80), np.float32)
    big[0, 20:60, 20:60, 20:60] = rng.normal(100, 10, (40, 40, 40))
    sparse = np.zeros((1, 80, 80, 80), np.float32)
    sparse[0, :2, :5] = rng.normal(100, 10, (2, 5, 80))  # 800 voxels: too few for the uniform sample
    for arr in (big, sparse):
        assert arr.size > MAX_INTENSITY_SAMPLES
        exact = np.percentile(arr[arr != 0], (0.5, 50, 99.5))
        got = intensity_percentiles(arr)
        assert got == intensity_percentiles(arr.copy())  # deterministic
        assert np.allclose(got[0], exact, rtol=0.02)


def test_reference_is_a_frozen_record_and_spacing_only_references_work():
    ref = DriftReference.from_spacings(np.array([[3.0, 1.0, 1.0], [3.5, 0.8, 0.8]]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.spacing = ()  # type: ignore[misc]
    assert check_header(ref, (10, 10, 10), (3.0, 1.0, 1.0), "a") == []
    (f,) = check_header(ref, (10, 10, 10), (3.0, 1.0, 0.3), "a")
    assert f.quantity == "spacing x" and "finer than the finest" in f.message
    assert check_header(ref, (10, 10, 10, 10), (1.0,) * 4, "a") == []  # other dimensionality: not compared
