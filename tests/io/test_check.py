"""The integrity check: every problem kind is reported, all at once, with the file, values and a fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autoseg.errors import DatasetIntegrityError
from autoseg.io.check import check_dataset
from autoseg.io.image import Geometry, write_image, write_label

G = Geometry.from_array_spacing((2.0, 1.0, 1.0))


def make(root: Path, n: int = 3, channels: int = 2, labels=None, shape=(6, 8, 8)) -> Path:
    """A clean tiny dataset: ``n`` cases, ``channels`` channels, a cube of label 1 in each case."""
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n):
        for c in range(channels):
            write_image(root / "imagesTr" / f"c{i}_{c:04d}.nii.gz",
                        rng.normal(10, 1, (1, *shape)).astype(np.float32), G)
        seg = np.zeros(shape, np.uint8)
        seg[1:3, 2:4, 2:4] = 1
        write_label(root / "labelsTr" / f"c{i}.nii.gz", seg, G)
    js = {"channel_names": {str(c): f"ch{c}" for c in range(channels)},
          "labels": labels or {"background": 0, "tumour": 1}, "numTraining": n, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(js))
    return root


def kinds(report, severity=None):
    return {(p.kind, p.case_id) for p in report.problems if severity is None or p.severity == severity}


def only(report, kind):
    found = [p for p in report.problems if p.kind == kind]
    assert found, report.format_table()
    return found[0]


def test_clean_dataset_is_ok(tmp_path):
    r = check_dataset(make(tmp_path / "d"), progress=False)
    assert r.ok and r.problems == [] and r.n_cases == 3
    r.raise_for_errors()  # no error, no exception


def test_missing_channel_and_missing_label(tmp_path):
    ds = make(tmp_path / "d")
    (ds / "imagesTr" / "c1_0001.nii.gz").unlink()
    (ds / "labelsTr" / "c2.nii.gz").unlink()
    r = check_dataset(ds, progress=False)
    p = only(r, "missing_channel")
    assert p.severity == "error" and p.case_id == "c1" and p.path.name == "c1_0001.nii.gz"
    p = only(r, "missing_label")
    assert p.case_id == "c2" and "c2.nii.gz" in p.message
    assert {("missing_channel", "c1"), ("missing_label", "c2")} <= kinds(r, "error")  # both at once


def test_case_count_differs_from_num_training(tmp_path):
    ds = make(tmp_path / "d")
    js = json.loads((ds / "dataset.json").read_text())
    js["numTraining"] = 5
    (ds / "dataset.json").write_text(json.dumps(js))
    p = only(check_dataset(ds, progress=False), "num_training")
    assert p.severity == "error" and "5" in p.message and "3" in p.message and '"numTraining": 3' in p.fix


def test_shape_and_spacing_mismatch_are_errors_origin_is_a_warning(tmp_path):
    ds = make(tmp_path / "d")
    write_image(ds / "imagesTr" / "c0_0001.nii.gz", np.ones((1, 6, 8, 9), np.float32), G)
    write_image(ds / "imagesTr" / "c1_0001.nii.gz", np.ones((1, 6, 8, 8), np.float32),
                Geometry.from_array_spacing((3.0, 1.0, 1.0)))
    shifted = Geometry(G.spacing, (5.0, 0.0, 0.0), G.direction)
    write_image(ds / "imagesTr" / "c2_0001.nii.gz", np.ones((1, 6, 8, 8), np.float32), shifted)
    r = check_dataset(ds, progress=False)
    shape = only(r, "shape")
    assert shape.case_id == "c0" and "(6, 8, 9)" in shape.message and shape.severity == "error"
    geo = {p.case_id: p for p in r.problems if p.kind == "geometry"}
    assert geo["c1"].severity == "error" and "spacing" in geo["c1"].message
    assert geo["c2"].severity == "warning" and "origin" in geo["c2"].message
    strict = check_dataset(ds, progress=False, strict_geometry=True)
    assert any(p.kind == "geometry" and p.case_id == "c2" and p.severity == "error" for p in strict.problems)


def test_undeclared_labels_are_named_and_255_masks_get_a_hint(tmp_path):
    ds = make(tmp_path / "d")
    seg = np.zeros((6, 8, 8), np.uint8)
    seg[0, 0, 0] = 255
    write_label(ds / "labelsTr" / "c0.nii.gz", seg, G)
    seg[0, 0, 0] = 7
    write_label(ds / "labelsTr" / "c1.nii.gz", seg, G)
    r = check_dataset(ds, progress=False)
    by_case = {p.case_id: p for p in r.problems if p.kind == "label_values"}
    assert "[255]" in by_case["c0"].message and "map 255 to 1" in by_case["c0"].fix
    assert "[7]" in by_case["c1"].message and "declare" in by_case["c1"].fix


def test_non_integer_and_negative_labels(tmp_path):
    ds = make(tmp_path / "d")
    soft = np.zeros((6, 8, 8), np.float32)
    soft[1, 1, 1] = 0.5
    write_image(ds / "labelsTr" / "c0.nii.gz", soft, G)
    neg = np.zeros((6, 8, 8), np.int16)
    neg[1, 1, 1] = -1
    write_image(ds / "labelsTr" / "c1.nii.gz", neg, G)
    r = check_dataset(ds, progress=False)
    by_case = {p.case_id: p for p in r.problems if p.kind == "label_values"}
    assert "0.5" in by_case["c0"].message and "nearest" in by_case["c0"].fix
    assert "-1" in by_case["c1"].message


def test_nan_and_inf_voxels_are_errors(tmp_path):
    # NRRD keeps NaN; ITK's NIfTI reader turns NaN into 0, so NIfTI files can only show inf.
    root = tmp_path / "n"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    bad = np.ones((1, 6, 8, 8), np.float32)
    bad[0, 0, 0, 0] = np.inf
    bad[0, 1, 0, 0] = np.nan
    write_image(root / "imagesTr" / "a_0000.nrrd", bad, G)
    write_label(root / "labelsTr" / "a.nrrd", np.ones((6, 8, 8), np.uint8), G)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "x"}, "numTraining": 1,
                                                   "labels": {"background": 0, "t": 1}, "file_ending": ".nrrd"}))
    p = only(check_dataset(root, progress=False), "nan_inf")
    assert p.severity == "error" and "2 voxels" in p.message and p.path.name == "a_0000.nrrd"


def test_4d_channel_file_is_wrong_dimensionality(tmp_path):
    ds = make(tmp_path / "d", channels=1)
    write_image(ds / "imagesTr" / "c0_0000.nii.gz", np.ones((3, 6, 8, 8), np.float32), G)
    p = only(check_dataset(ds, progress=False), "dimensionality")
    assert p.case_id == "c0" and "3 channels" in p.message and "convert-msd" in p.fix


def test_a_2d_case_in_a_3d_dataset(tmp_path):
    ds = make(tmp_path / "d", channels=1)
    g2 = Geometry.from_array_spacing((1.0, 1.0))
    write_image(ds / "imagesTr" / "c2_0000.nii.gz", np.ones((1, 8, 8), np.float32), g2)
    write_label(ds / "labelsTr" / "c2.nii.gz", np.ones((8, 8), np.uint8), g2)
    p = only(check_dataset(ds, progress=False), "dimensionality")
    assert p.case_id == "c2" and "2D" in p.message and "3D" in p.message


@pytest.mark.parametrize("content", [b"", b"not an image at all"])
def test_unreadable_files_are_reported_not_raised(tmp_path, content):
    ds = make(tmp_path / "d")
    (ds / "imagesTr" / "c0_0000.nii.gz").write_bytes(content)
    p = only(check_dataset(ds, progress=False), "unreadable")
    assert p.severity == "error" and p.path.name == "c0_0000.nii.gz"


def test_truncated_file_is_reported(tmp_path):
    ds = make(tmp_path / "d", shape=(16, 32, 32))
    f = ds / "imagesTr" / "c1_0000.nii.gz"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    p = only(check_dataset(ds, progress=False), "unreadable")
    assert p.case_id == "c1" and "truncated" in p.message


def test_empty_label_is_a_warning_and_absent_class_is_named(tmp_path):
    ds = make(tmp_path / "d", labels={"background": 0, "tumour": 1, "oedema": 2})
    write_label(ds / "labelsTr" / "c0.nii.gz", np.zeros((6, 8, 8), np.uint8), G)
    r = check_dataset(ds, progress=False)
    assert r.ok
    assert only(r, "empty_label").case_id == "c0"
    assert "oedema" in only(r, "absent_class").message


def test_duplicate_cases_are_found_by_content(tmp_path):
    ds = make(tmp_path / "d", channels=1)
    (ds / "imagesTr" / "c2_0000.nii.gz").write_bytes((ds / "imagesTr" / "c0_0000.nii.gz").read_bytes())
    p = only(check_dataset(ds, progress=False), "duplicate")
    assert p.case_id == "c2" and "c0" in p.message


def test_stray_files_and_bad_dataset_json(tmp_path):
    ds = make(tmp_path / "d")
    (ds / "imagesTr" / "c0_0000.nii").write_bytes(b"x")
    (ds / "labelsTr" / "orphan.nii.gz").write_bytes(b"x")
    r = check_dataset(ds, progress=False)
    strays = {p.path.name for p in r.problems if p.kind == "stray_file"}
    assert strays == {"c0_0000.nii", "orphan.nii.gz"}
    (ds / "dataset.json").write_text('{"labels": {"background": 0}}')
    r = check_dataset(ds, progress=False)
    p = only(r, "dataset_json")
    assert not r.ok and "channel_names" in p.message


def test_every_problem_reported_in_one_table_and_raise(tmp_path):
    ds = make(tmp_path / "d")
    (ds / "labelsTr" / "c0.nii.gz").unlink()
    (ds / "imagesTr" / "c1_0001.nii.gz").unlink()
    r = check_dataset(ds, progress=False)
    table = r.format_table()
    assert "c0.nii.gz" in table and "c1_0001.nii.gz" in table and "2 errors" in table
    with pytest.raises(DatasetIntegrityError) as exc:
        r.raise_for_errors()
    assert exc.value.report is r and "c1_0001.nii.gz" in str(exc.value)


def test_check_never_changes_the_dataset_and_parallel_gives_the_same_report(tmp_path):
    ds = make(tmp_path / "d", n=4)
    (ds / "labelsTr" / "c3.nii.gz").unlink()
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in ds.rglob("*") if p.is_file()}
    serial = check_dataset(ds, progress=False)
    parallel = check_dataset(ds, jobs=2, progress=False)
    assert serial.problems == parallel.problems
    assert before == {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in ds.rglob("*") if p.is_file()}
