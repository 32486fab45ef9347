"""Fingerprint statistics on hand-made arrays, and the dataset pass on a tiny dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from autoseg.fingerprint.extract import (
    combine_intensities,
    component_sizes,
    fingerprint_case,
    nonzero_bbox,
    samples_per_case,
)
from autoseg.fingerprint.model import DatasetFingerprint
from autoseg.io.dataset import DatasetSpec

SPEC = DatasetSpec.from_json({"channel_names": {"0": "T1", "1": "CT"}, "file_ending": ".nii.gz",
                              "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 1})


def test_crop_box_is_the_nonzero_region_of_any_channel():
    img = np.zeros((2, 10, 12, 14), np.float32)
    img[0, 2:5, 3:6, 4:9] = 1
    img[1, 7, 1, 4] = -3  # negative values are "nonzero" too
    box = nonzero_bbox(img)
    assert [(s.start, s.stop) for s in box] == [(2, 8), (1, 6), (4, 9)]
    assert [(s.start, s.stop) for s in nonzero_bbox(np.zeros((1, 3, 4, 5)))] == [(0, 3), (0, 4), (0, 5)]


def test_components_are_counted_per_label_with_full_connectivity():
    lab = np.zeros((9, 9, 9), np.uint8)
    lab[1:3, 1:3, 1:3] = 1          # 8 voxels
    lab[5, 5, 5] = 1                # 1 voxel
    lab[6, 6, 6] = 1                # touches the previous one diagonally: same lesion
    lab[0, 8, 0] = 2
    sizes = component_sizes(lab, (1, 2, 3))
    assert sizes == {1: (8, 2), 2: (1,), 3: ()}


def test_case_statistics_use_foreground_only_and_record_crop_and_counts():
    img = np.zeros((2, 6, 6, 6), np.float32)
    img[:, 1:5, 1:5, 1:5] = 10.0
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[2:4, 2:4, 2:4] = 1
    img[0][lab == 1] = 100.0
    fp, samples, moments = fingerprint_case("c1", img, lab, (2.0, 1.0, 1.0), SPEC, 50, seed=0)
    assert fp.shape == (6, 6, 6) and fp.shape_after_crop == (4, 4, 4)
    assert fp.spacing == (2.0, 1.0, 1.0)
    assert fp.class_voxels == {0: 208, 1: 8, 2: 0}
    assert samples.shape == (2, 50) and np.all(samples[0] == 100) and np.all(samples[1] == 10)
    assert moments[0, 0] == 8 and moments[0, 1] == 800
    # drift percentiles are over the nonzero region (64 voxels, 8 of them at 100), not the label foreground
    assert fp.intensity_percentiles == ((10.0, 10.0, 100.0), (10.0, 10.0, 10.0))


def test_2d_cases_get_a_leading_dummy_axis_with_the_largest_spacing():
    img = np.ones((1, 5, 7), np.float32)
    lab = np.zeros((5, 7), np.uint8)
    fp, samples, _ = fingerprint_case("c", img, lab, (0.5, 0.5), SPEC, 10, seed=0)
    assert fp.shape == (1, 5, 7) and fp.spacing[0] > 100 * fp.spacing[1]
    assert samples.shape == (1, 0)  # no foreground, no samples


def test_dataset_intensities_weight_every_case_equally():
    # case A: 1000 foreground voxels at 0; case B: 10 voxels at 10 -> equal weights give mean 5
    mA = np.array([[1000, 0.0, 0.0, 0.0, 0.0]])
    mB = np.array([[10, 100.0, 1000.0, 10.0, 10.0]])
    sA, sB = np.zeros((1, 100), np.float32), np.full((1, 100), 10.0, np.float32)
    (st,) = combine_intensities([sA, sB], [mA, mB], 1)
    assert st.mean == pytest.approx(5.0) and st.std == pytest.approx(5.0)
    assert st.min == 0 and st.max == 10 and st.percentile_00_5 == 0 and st.percentile_99_5 == 10


def test_sample_budget_is_bounded_for_any_dataset_size():
    assert samples_per_case(1) * 1 <= 200_000
    assert samples_per_case(100_000) >= 1000
    assert samples_per_case(1000) * 1000 <= 10_000_000


def _tiny_dataset(root, n=3):
    from autoseg.io.image import Geometry, write_image, write_label

    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    g = Geometry.from_array_spacing((3.0, 1.0, 1.0))
    for i in range(n):
        img = rng.normal(50, 5, (1, 8, 10, 10)).astype(np.float32)
        lab = np.zeros((8, 10, 10), np.uint8)
        lab[2:5, 3:6, 3:6] = 1
        write_image(root / "imagesTr" / f"c{i}_0000.nii.gz", img, g)
        write_label(root / "labelsTr" / f"c{i}.nii.gz", lab, g)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "labels": {"background": 0, "t": 1},
                                                   "numTraining": n, "file_ending": ".nii.gz"}))
    return root


def test_fingerprint_api_saves_json_and_reuses_it_while_files_are_unchanged(tmp_path):
    import autoseg.api as api

    ds = _tiny_dataset(tmp_path / "ds")
    fp = api.fingerprint(ds, workdir=tmp_path / "w", progress=False)
    saved = tmp_path / "w" / "fingerprint.json"
    assert saved.is_file()
    assert DatasetFingerprint.load(saved) == fp
    assert fp.median_spacing == (3.0, 1.0, 1.0) and len(fp.cases) == 3
    assert 40 < fp.intensity[0].mean < 60
    assert all(len(c.intensity_percentiles) == 1 and 40 < c.intensity_percentiles[0][1] < 60 for c in fp.cases)
    assert json.loads(saved.read_text())["cases"][0]["intensity_percentiles"] == [list(fp.cases[0].intensity_percentiles[0])]
    before = saved.stat().st_mtime_ns
    assert api.fingerprint(ds, workdir=tmp_path / "w", progress=False) == fp
    assert saved.stat().st_mtime_ns == before  # reused, not recomputed
    (ds / "labelsTr" / "c0.nii.gz").unlink()
    from autoseg.errors import DatasetIntegrityError

    with pytest.raises(DatasetIntegrityError, match="c0"):
        api.fingerprint(ds, workdir=tmp_path / "w", progress=False)
