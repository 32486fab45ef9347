"""The dataset integrity check: every problem a user can make is reported at once, with case, file and fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.errors import DatasetIntegrityError
from autoseg.io.check import CheckReport, Problem, check_case, check_dataset
from autoseg.io.dataset import load_dataset
from autoseg.io.image import Geometry, write_image, write_label

SHAPE = (8, 8, 8)
GEO = Geometry.identity(3, (1.0, 1.0, 2.0))


# ----------------------------------------------------------------------------------------------- helpers
def write_json(root: Path, **fields) -> None:
    d = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "tumour": 1}, "numTraining": 3,
         "file_ending": ".nii.gz"}
    d.update(fields)
    (root / "dataset.json").write_text(json.dumps(d))


def make_dataset(root: Path, n_cases: int = 3, channels: tuple[str, ...] = ("MR",),
                 labels: dict | None = None, ending: str = ".nii.gz", seed: int = 0) -> Path:
    """A clean dataset: random images, each label value present as a small block in every case."""
    labels = labels or {"background": 0, "tumour": 1}
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(seed)
    fg = sorted({v for v in labels.values() if isinstance(v, int) and v > 0})
    for i in range(n_cases):
        cid = f"case_{i:03d}"
        for c in range(len(channels)):
            write_image(root / "imagesTr" / f"{cid}_{c:04d}{ending}", rng.normal(size=SHAPE).astype(np.float32), GEO)
        seg = np.zeros(SHAPE, np.uint8)
        for j, v in enumerate(fg):
            seg[j, 2:5, 2:5] = v
        write_label(root / "labelsTr" / f"{cid}{ending}", seg, GEO)
    write_json(root, channel_names={str(c): n for c, n in enumerate(channels)}, labels=labels, numTraining=n_cases,
               file_ending=ending)
    return root


def image(root: Path, case: int = 0, channel: int = 0) -> Path:
    return root / "imagesTr" / f"case_{case:03d}_{channel:04d}.nii.gz"


def label(root: Path, case: int = 0) -> Path:
    return root / "labelsTr" / f"case_{case:03d}.nii.gz"


def check(root: Path, **kw) -> CheckReport:
    return check_dataset(root, progress=False, **kw)


def only(report: CheckReport, kind: str) -> Problem:
    found = [p for p in report.problems if p.kind == kind]
    assert len(found) == 1, report.format_table()
    return found[0]


@pytest.fixture
def ds(tmp_path) -> Path:
    return make_dataset(tmp_path / "Dataset001_Test")


# ----------------------------------------------------------------------------------------------- clean data
def test_clean_dataset_is_ok_without_problems(ds):
    report = check(ds)
    assert report.ok and report.problems == [] and report.n_cases == 3
    assert report.format_table().splitlines()[-1] == "0 errors, 0 warnings in 3 cases"
    report.raise_for_errors()  # nothing to raise


def test_keep_arrays_hands_on_float_images_and_integer_labels(ds):
    dataset = load_dataset(ds)
    result = check_case(dataset.cases[0], dataset.spec, keep_arrays=True)
    assert result.problems == [] and result.image_hash
    assert result.data.images.dtype == np.float32 and result.data.images.shape == (1, *SHAPE)
    assert result.data.label.dtype.kind == "i" and result.data.label.max() == 1
    assert result.data.geometry.spacing == GEO.spacing
    assert check_case(dataset.cases[0], dataset.spec).data is None
    label(ds, 1).unlink()
    assert check_case(dataset.cases[1], dataset.spec, keep_arrays=True).data is None  # errors: nothing handed on


# ----------------------------------------------------------------------------------------------- missing files
def test_missing_channel_file(tmp_path):
    root = make_dataset(tmp_path / "ds", channels=("T1", "T2"))
    image(root, 1, 1).unlink()
    p = only(check(root), "missing_channel")
    assert (p.severity, p.case_id, p.path) == ("error", "case_001", image(root, 1, 1))
    assert "case_001_0001.nii.gz" in p.message and "1 of 2" in p.message


def test_missing_label(ds):
    label(ds, 2).unlink()
    p = only(check(ds), "missing_label")
    assert (p.severity, p.case_id, p.path) == ("error", "case_002", label(ds, 2))


def test_case_listed_in_dataset_json_but_absent(ds):
    listing = {f"case_{i:03d}": {"images": [f"imagesTr/case_{i:03d}_0000.nii.gz"],
                                 "label": f"labelsTr/case_{i:03d}.nii.gz"} for i in range(3)}
    listing["ghost"] = {"images": ["imagesTr/ghost_0000.nii.gz"], "label": "labelsTr/ghost.nii.gz"}
    write_json(ds, numTraining=4, dataset=listing)
    report = check(ds)
    p = only(report, "missing_case")
    assert (p.severity, p.case_id) == ("error", "ghost") and "ghost_0000.nii.gz" in p.message
    assert len(report.errors) == 1


def test_num_training_differs_from_cases_found(ds):
    write_json(ds, numTraining=5)
    p = only(check(ds), "num_training")
    assert p.severity == "error" and "5" in p.message and "3" in p.message and '"numTraining": 3' in p.fix


def test_no_cases_at_all(tmp_path):
    root = tmp_path / "empty"
    (root / "imagesTr").mkdir(parents=True)
    write_json(root, numTraining=0)
    report = check(root)
    assert not report.ok and only(report, "no_cases").severity == "error"


def test_stray_files_are_named(ds):
    wrong_ending = ds / "imagesTr" / "case_009_0000.nii"
    no_suffix = ds / "imagesTr" / "case_010.nii.gz"
    orphan_label = ds / "labelsTr" / "case_011.nii.gz"
    for p in (wrong_ending, no_suffix, orphan_label):
        p.write_bytes(b"x")
    report = check(ds)
    strays = {p.path: p for p in report.problems if p.kind == "stray_file"}
    assert set(strays) == {wrong_ending, no_suffix, orphan_label} and report.ok
    assert all(p.severity == "warning" for p in strays.values())
    assert "'.nii.gz'" in strays[wrong_ending].message and "case_010_0000.nii.gz" in strays[no_suffix].fix
    assert "no images" in strays[orphan_label].message
    assert "imagesTr/case_009_0000.nii" in report.format_table()


# ----------------------------------------------------------------------------------------------- dataset.json
def test_dataset_json_missing_field_is_one_error_not_a_crash(ds):
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "numTraining": 3}))
    report = check(ds)
    p = only(report, "dataset_json")
    assert len(report.problems) == 1 and p.severity == "error" and p.path == ds / "dataset.json"
    assert "labels" in p.message and "file_ending" in p.message


def test_dataset_json_wrong_type_and_invalid_json(ds):
    write_json(ds, numTraining="three")
    assert "numTraining" in only(check(ds), "dataset_json").message
    (ds / "dataset.json").write_text("{not json")
    assert "not valid JSON" in only(check(ds), "dataset_json").message


def test_missing_dataset_folder_is_reported(tmp_path):
    report = check(tmp_path / "nope")
    assert not report.ok and only(report, "layout").severity == "error"


def test_label_gaps_are_a_warning_only(tmp_path):
    root = make_dataset(tmp_path / "ds", labels={"background": 0, "liver": 1, "tumour": 3})
    report = check(root)
    p = only(report, "label_gaps")
    assert report.ok and p.severity == "warning" and "[2]" in p.message and "nnU-Net" in p.fix


def test_ignore_label_must_be_max_plus_one(tmp_path):
    root = make_dataset(tmp_path / "ds", labels={"background": 0, "tumour": 1, "ignore": 5})
    p = only(check(root), "label_declaration")
    assert p.severity == "error" and "5" in p.message and '"ignore": 2' in p.fix


def test_class_absent_from_every_case(ds):
    write_json(ds, labels={"background": 0, "tumour": 1, "edema": 2})
    report = check(ds)
    p = only(report, "absent_class")
    assert report.ok and p.severity == "warning" and "'edema'" in p.message and "2" in p.message


# ----------------------------------------------------------------------------------------------- label values
def test_0_255_mask_names_the_value_and_hints_map_to_1(ds):
    seg = np.zeros(SHAPE, np.uint8)
    seg[2:4, 2:4, 2:4] = 255
    write_label(label(ds, 1), seg, GEO)
    p = only(check(ds), "label_values")
    assert (p.severity, p.case_id, p.path) == ("error", "case_001", label(ds, 1))
    assert "255 (8 voxels)" in p.message and "map 255 to 1" in p.fix


def test_undeclared_label_values_are_named(ds):
    seg = np.zeros(SHAPE, np.uint8)
    seg[0], seg[1], seg[2] = 1, 4, 7
    write_label(label(ds, 0), seg, GEO)
    p = only(check(ds), "label_values")
    assert "4 (64 voxels)" in p.message and "7 (64 voxels)" in p.message and "declared: [0, 1]" in p.message


def test_anti_aliased_float_labels(ds):
    seg = np.zeros(SHAPE, np.float32)
    seg[2:5, 2:5, 2:5] = 1.0
    seg[1, 2:5, 2:5] = 0.25
    write_image(label(ds, 0), seg, GEO)
    p = only(check(ds), "label_not_integer")
    assert p.severity == "error" and p.case_id == "case_000" and "0.25" in p.message
    assert "round" in p.fix and "threshold" in p.fix


def test_whole_float_labels_are_accepted(ds):
    seg = np.zeros(SHAPE, np.float32)
    seg[2:5, 2:5, 2:5] = 1.0
    write_image(label(ds, 0), seg, GEO)
    assert check(ds).problems == []


def test_negative_label_values(ds):
    seg = np.zeros(SHAPE, np.int16)
    seg[0], seg[1] = -1, 1
    write_image(label(ds, 2), seg, GEO)
    p = only(check(ds), "negative_label")
    assert (p.severity, p.case_id) == ("error", "case_002") and "-1" in p.message


def test_empty_label_is_a_warning(ds):
    write_label(label(ds, 0), np.zeros(SHAPE, np.uint8), GEO)
    report = check(ds)
    p = only(report, "empty_label")
    assert report.ok and (p.severity, p.case_id, p.path) == ("warning", "case_000", label(ds, 0))


# ----------------------------------------------------------------------------------------------- voxels and geometry
def test_nan_and_inf_voxels(tmp_path):
    root = make_dataset(tmp_path / "ds", ending=".nrrd")
    arr = np.zeros(SHAPE, np.float32)
    arr[0, 0, :3] = np.nan
    arr[1, 1, 1] = np.inf
    path = root / "imagesTr" / "case_001_0000.nrrd"
    write_image(path, arr, GEO)
    p = only(check(root), "nan_inf")
    assert (p.severity, p.case_id, p.path) == ("error", "case_001", path)
    assert "3 NaN and 1 inf" in p.message


def test_nan_in_nifti_is_a_warning_because_simpleitk_reads_it_as_zero(ds):
    arr = np.ones(SHAPE, np.float32)
    arr[0, 0, :2] = np.nan
    arr[0, 1, 0] = -np.inf
    write_image(image(ds, 2), arr, GEO)
    report = check(ds)
    p = only(report, "nan_inf")
    assert report.ok and p.severity == "warning"  # training sees zeros there: usable, but the user should know
    assert (p.case_id, p.path) == ("case_002", image(ds, 2)) and "2 NaN and 1 inf" in p.message
    assert "read as 0" in p.message
    assert check(ds, scan_nifti_nan=False).problems == []  # the fast path sees only the zeros


def test_all_background_dataset_is_an_error(ds):
    for i in range(3):
        write_label(label(ds, i), np.zeros(SHAPE, np.uint8), GEO)
    report = check(ds)
    p = only(report, "all_background")
    assert not report.ok and p.path == ds / "labelsTr" and "nothing to learn" in p.message


def test_undeclared_channel_file_and_nifti_twin_are_named(ds):
    extra = ds / "imagesTr" / "case_000_0001.nii.gz"
    shutil.copy(image(ds, 0), extra)
    twin = ds / "imagesTr" / "case_001_0000.nii"
    shutil.copy(image(ds, 1), twin)
    report = check(ds)
    by_path = {p.path: p for p in report.problems}
    assert by_path[extra].severity == "warning" and "channel 0001 is not declared" in by_path[extra].message
    assert by_path[twin].severity == "error" and "case_001_0000.nii.gz" in by_path[twin].message


def test_shape_mismatch_between_channel_and_label(ds):
    write_label(label(ds, 0), np.ones((8, 8, 7), np.uint8), GEO)
    p = only(check(ds), "shape")
    assert (p.severity, p.case_id, p.path) == ("error", "case_000", image(ds, 0))
    assert "(8, 8, 8)" in p.message and "(8, 8, 7)" in p.message


def test_spacing_mismatch_is_an_error(ds):
    write_image(image(ds, 0), np.zeros(SHAPE, np.float32), Geometry.identity(3, (1.0, 1.0, 3.0)))
    p = only(check(ds), "geometry")
    assert p.severity == "error" and "spacing" in p.message and "(1, 1, 3)" in p.message and "(1, 1, 2)" in p.message


def test_label_shifted_by_10_mm_or_flipped_on_one_axis_is_refused_with_its_line(ds):
    write_image(image(ds, 0), np.zeros(SHAPE, np.float32), Geometry(GEO.spacing, (10.0, 0.0, 0.0), GEO.direction))
    flipped = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # z flipped, same origin
    write_image(image(ds, 1), np.zeros(SHAPE, np.float32), Geometry(GEO.spacing, GEO.origin, flipped))
    report = check(ds)
    found = {p.case_id: p for p in report.problems if p.kind == "geometry"}
    assert not report.ok and {p.severity for p in found.values()} == {"error"}
    shifted = found["case_000"]
    assert "origin (10, 0, 0) vs (0, 0, 0)" in shifted.message and "10 mm (10 voxels)" in shifted.message
    assert "CopyInformation" in shifted.fix and "--allow-geometry-mismatch" in shifted.fix
    assert "direction" in found["case_001"].message and "28 mm" in found["case_001"].message  # 7 slices of 2 mm, x2
    table = report.format_table()
    assert "case_000" in table and "case_001" in table
    allowed = check(ds, allow_geometry_mismatch=True)
    assert allowed.ok and {p.severity for p in allowed.problems if p.kind == "geometry"} == {"warning"}


def test_cli_check_refuses_a_shifted_label_unless_allowed(ds, capsys):
    from autoseg.cli import main

    write_image(image(ds, 0), np.zeros(SHAPE, np.float32), Geometry(GEO.spacing, (10.0, 0.0, 0.0), GEO.direction))
    assert main(["-q", "check", str(ds)]) == 1
    assert "error" in capsys.readouterr().out
    assert main(["-q", "check", str(ds), "--allow-geometry-mismatch"]) == 0


def test_shift_under_half_a_voxel_is_a_warning_unless_strict(ds):
    write_image(image(ds, 0), np.zeros(SHAPE, np.float32), Geometry(GEO.spacing, (0.1, 0.0, 0.0), GEO.direction))
    p = only(check(ds), "geometry")
    assert p.severity == "warning" and "0.1 mm (0.1 voxels)" in p.message
    assert only(check(ds, strict_geometry=True), "geometry").severity == "error"


def test_plan_refuses_a_shifted_label_and_records_the_override(ds, tmp_path):
    from autoseg.api import plan
    from autoseg.planner.plans import Plans

    write_image(image(ds, 0), np.zeros(SHAPE, np.float32), Geometry(GEO.spacing, (10.0, 0.0, 0.0), GEO.direction))
    with pytest.raises(DatasetIntegrityError, match="more than half a voxel"):
        plan(ds, workdir=tmp_path / "work", preset="cpu", progress=False)
    plans = plan(ds, workdir=tmp_path / "work", preset="cpu", progress=False, allow_geometry_mismatch=True)
    saved = json.loads((tmp_path / "work" / "plans.json").read_text())
    assert saved["allow_geometry_mismatch"] is True and Plans.from_json(saved).allow_geometry_mismatch
    assert any("--allow-geometry-mismatch" in d for d in plans.decisions)


def test_non_positive_spacing_is_an_error(tmp_path):
    root = make_dataset(tmp_path / "ds", ending=".mha")
    path = root / "imagesTr" / "case_001_0000.mha"
    write_image(path, np.zeros(SHAPE, np.float32), GEO, compress=False)
    path.write_bytes(path.read_bytes().replace(b"ElementSpacing = 1 1 2", b"ElementSpacing = -1 1 2"))
    p = only(check(root), "spacing")
    assert (p.severity, p.case_id, p.path) == ("error", "case_001", path) and "-1" in p.message


def test_4d_file_where_3d_is_expected(ds):
    vol = sitk.GetImageFromArray(np.zeros(SHAPE, np.float32))
    sitk.WriteImage(sitk.JoinSeries([vol, vol]), str(image(ds, 1)))
    p = only(check(ds), "dimensionality")
    assert (p.severity, p.case_id, p.path) == ("error", "case_001", image(ds, 1))
    assert "4D" in p.message and "(2, 8, 8, 8)" in p.message


def test_case_dimensionality_differs_from_the_majority(ds):
    write_image(image(ds, 2), np.zeros((8, 8), np.float32), Geometry.identity(2))
    write_label(label(ds, 2), np.ones((8, 8), np.uint8), Geometry.identity(2))
    p = only(check(ds), "dimensionality")
    assert (p.severity, p.case_id) == ("error", "case_002") and "2D" in p.message and "3D" in p.message


def test_rgb_png_holds_all_channels_when_declared(tmp_path):
    root = tmp_path / "rgb"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(3):
        write_image(root / "imagesTr" / f"case_{i:03d}_0000.png", np.full((3, 8, 8), 10 * i, np.uint8),
                    Geometry.identity(2))
        write_label(root / "labelsTr" / f"case_{i:03d}.png", np.eye(8, dtype=np.uint8), Geometry.identity(2))
    write_json(root, channel_names={"0": "R", "1": "G", "2": "B"}, file_ending=".png")
    assert check(root).problems == []
    write_json(root, channel_names={"0": "gray"}, file_ending=".png")
    report = check(root)
    assert len(report.errors) == 3 and {p.kind for p in report.errors} == {"channels"}
    assert "3 values per voxel" in report.errors[0].message and "grayscale" in report.errors[0].fix


def test_unreadable_and_truncated_files(ds):
    image(ds, 0).write_bytes(b"this is not an image at all")
    write_image(image(ds, 1), np.random.default_rng(1).normal(size=(32, 32, 32)).astype(np.float32), GEO)
    data = image(ds, 1).read_bytes()
    image(ds, 1).write_bytes(data[: len(data) // 2])
    report = check(ds)
    bad = {p.case_id: p for p in report.problems if p.kind == "unreadable"}
    assert set(bad) == {"case_000", "case_001"} and all(p.severity == "error" for p in bad.values())
    assert bad["case_000"].path == image(ds, 0) and "truncated" in bad["case_001"].message


def test_duplicate_cases(ds):
    shutil.copy(image(ds, 0), image(ds, 3))
    shutil.copy(label(ds, 0), label(ds, 3))
    write_json(ds, numTraining=4)
    p = only(check(ds), "duplicate")
    assert (p.severity, p.case_id) == ("warning", "case_003") and "case_000" in p.message


# ----------------------------------------------------------------------------------------------- the report
def _broken(root: Path) -> Path:
    """Three different problems in three cases, plus a stray file."""
    label(root, 0).unlink()
    write_label(label(root, 1), np.ones((8, 8, 7), np.uint8), GEO)
    seg = np.zeros(SHAPE, np.uint8)
    seg[:2] = 255
    write_label(label(root, 2), seg, GEO)
    (root / "imagesTr" / "notes.txt").write_text("x")
    return root


def test_every_problem_is_reported_at_once(ds):
    report = check(_broken(ds))
    assert {(p.kind, p.case_id) for p in report.errors} == {
        ("missing_label", "case_000"), ("shape", "case_001"), ("label_values", "case_002")}
    assert [p.kind for p in report.warnings] == ["stray_file"]
    table = report.format_table()
    lines = table.splitlines()
    assert lines[0].split() == ["severity", "case", "file", "problem", "fix"]
    assert lines[-1] == "3 errors, 1 warning in 3 cases"
    assert table.index("case_000") < table.index("notes.txt")  # errors first
    assert "labelsTr/case_002.nii.gz" in table and str(ds) not in table  # paths relative to the dataset


def test_raise_for_errors_carries_the_table(ds):
    report = check(_broken(ds))
    with pytest.raises(DatasetIntegrityError) as exc:
        report.raise_for_errors()
    assert exc.value.report is report
    assert "3 errors" in str(exc.value) and "labelsTr/case_002.nii.gz" in str(exc.value)


def test_table_says_how_many_rows_were_left_out(tmp_path):
    probs = [Problem("warning", "empty_label", f"c{i}", tmp_path / f"labelsTr/c{i}.nii.gz", "m", "f") for i in range(9)]
    report = CheckReport(str(tmp_path), 9, [*probs, Problem("error", "shape", "c9", None, "bad", "fix it")])
    table = report.format_table(max_rows=4)
    assert "6 more problems not shown (0 errors, 6 warnings)" in table
    assert table.splitlines()[2].startswith("error")  # errors come first even when truncated
    out = json.loads(json.dumps(report.to_json()))
    assert out["n_errors"] == 1 and out["problems"][0]["file"] == "labelsTr/c0.nii.gz"


def test_parallel_check_gives_the_same_report(ds):
    _broken(ds)
    assert check(ds, jobs=2).to_json() == check(ds, jobs=1).to_json()


def test_check_never_modifies_the_dataset(ds):
    _broken(ds)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in ds.rglob("*") if p.is_file()}
    check(ds)
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in ds.rglob("*") if p.is_file()}
    assert after == before
