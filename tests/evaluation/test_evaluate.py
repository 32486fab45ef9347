"""Folder evaluation: pairing, regions from dataset.json, summary.json, cases.csv and errors."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from autoseg.evaluation.evaluate import evaluate_folder, evaluate_pairs
from autoseg.evaluation.metrics import EvaluationError, case_metrics
from autoseg.evaluation.summary import EvaluationSummary
from autoseg.io.image import Geometry, write_label

SPACING = (0.5, 1.0, 2.0)  # ITK order (x, y, z); array order (2.0, 1.0, 0.5)
LABELS = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enh": 3}
CLASSES = {"whole": (1, 2, 3), "core": (2, 3), "enh": 3}


def make_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """case -> (prediction, reference)."""
    shape = (4, 6, 8)
    r1 = np.zeros(shape, np.uint8)
    r1[1, 1:3, 1:3] = 1
    r1[1, 1:3, 3:5] = 2
    r1[2, 1:3, 1:3] = 3
    p1 = r1.copy()
    p1[2, 1, 1] = 2  # enh: 3 of 4 voxels -> Dice 6/7; whole and core unchanged -> 1
    r2 = np.zeros(shape, np.uint8)
    r2[0, 0:2, 0:2] = 1
    p2 = r2.copy()
    p2[3, 5, 7] = 3  # whole: Dice 8/9; core and enh: reference empty -> 0
    r3 = np.zeros(shape, np.uint8)  # nothing anywhere -> NaN everywhere
    return {"c1": (p1, r1), "c2": (p2, r2), "c3": (r3.copy(), r3)}


def write_folder(tmp_path, cases, *, ending=".nii.gz", skip_pred=(), pred_spacing=SPACING):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir(parents=True, exist_ok=True)
    ref_dir.mkdir(parents=True, exist_ok=True)
    for cid, (pred, ref) in cases.items():
        write_label(ref_dir / f"{cid}{ending}", ref, Geometry.identity(3, SPACING))
        if cid not in skip_pred:
            write_label(pred_dir / f"{cid}{ending}", pred, Geometry.identity(3, pred_spacing))
    return pred_dir, ref_dir


def write_dataset_json(tmp_path, labels=LABELS):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": labels, "numTraining": 3,
                                "file_ending": ".nii.gz"}))
    return path


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_folder_with_regions_from_dataset_json(tmp_path):
    cases = make_cases()
    pred_dir, ref_dir = write_folder(tmp_path, cases)
    summary = evaluate_folder(pred_dir, ref_dir, dataset_json=write_dataset_json(tmp_path), progress=False)
    assert summary.classes == CLASSES
    assert list(summary.cases) == ["c1", "c2", "c3"]
    assert summary.per_case("dice", "whole")[:2] == [1.0, pytest.approx(8 / 9)]
    assert summary.per_case("dice", "enh")[:2] == [pytest.approx(6 / 7), 0.0]
    assert all(math.isnan(summary.cases["c3"][c]["dice"]) for c in CLASSES)
    # every value equals case_metrics on the arrays with the reference's spacing (numpy order)
    for cid, (pred, ref) in cases.items():
        want = case_metrics(pred, ref, CLASSES, SPACING[::-1])
        for c in CLASSES:
            assert all(same(summary.cases[cid][c][m], v) for m, v in want[c].items())
    # means ignore NaN cases; the foreground mean averages the class means
    assert summary.mean("dice", "whole") == pytest.approx((1 + 8 / 9) / 2)
    assert summary.mean("dice", "core") == pytest.approx(0.5)
    assert summary.mean("dice", "enh") == pytest.approx(3 / 7)
    assert summary.foreground_mean("dice") == pytest.approx(((1 + 8 / 9) / 2 + 0.5 + 3 / 7) / 3)
    assert summary.median("dice", "enh") == pytest.approx(3 / 7)
    assert math.isnan(summary.foreground_mean("no_such_metric"))
    with pytest.raises(KeyError, match="unknown class"):
        summary.mean("dice", "liver")

    # summary.json
    d = json.loads((pred_dir / "summary.json").read_text())
    assert list(d)[:1] == ["version"] and d["version"] == 1
    assert {"classes", "settings", "mean", "foreground_mean", "median", "cases"} <= set(d)
    assert d["classes"] == {"whole": [1, 2, 3], "core": [2, 3], "enh": 3}
    assert d["cases"]["c3"]["whole"]["dice"] is None
    assert d["mean"]["enh"]["dice"] == pytest.approx(3 / 7)
    assert d["foreground_mean"]["dice"] == pytest.approx(summary.foreground_mean("dice"))
    assert "HD95" in d["settings"]["implementation"] and d["settings"]["tolerance_mm"] == 1.0
    assert d["settings"]["lesion"]["penalty_mm"] == 374.0
    loaded = EvaluationSummary.load(pred_dir / "summary.json")
    assert loaded.classes == summary.classes and loaded.settings == summary.settings
    for cid in cases:
        for c in CLASSES:
            assert all(same(loaded.cases[cid][c][m], v) for m, v in summary.cases[cid][c].items())

    # cases.csv: one row per case, "case" then "<class>/<metric>"
    with (pred_dir / "cases.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["c1", "c2", "c3"]
    columns = list(rows[0])
    assert columns[0] == "case" and len(columns) == 1 + len(CLASSES) * len(summary.metrics)
    assert columns[1] == "whole/dice" and "enh/lesion_hd95" in columns
    assert float(rows[1]["whole/dice"]) == pytest.approx(8 / 9)
    assert rows[2]["core/dice"] == "nan" and rows[0]["enh/tp"] == "3"

    table = summary.format_table()
    lines = table.splitlines()
    assert any(line.startswith("whole") for line in lines) and lines[-1].startswith("mean")
    assert "dice" in lines[1] and "lesion_hd95" in lines[1]
    assert "0.944  0.944 [0.917, 0.972]" in table  # whole Dice: mean, median, quartiles of (1, 8/9)


def test_summary_json_refuses_infinity():
    s = EvaluationSummary(classes={"a": 1}, cases={"x": {"a": {"dice": math.inf}}})
    with pytest.raises(ValueError, match="infinite"):
        s.to_json()


def test_missing_predictions_are_listed(tmp_path):
    pred_dir, ref_dir = write_folder(tmp_path, make_cases(), skip_pred=("c1", "c3"))
    with pytest.raises(EvaluationError, match="2 of 3") as info:
        evaluate_folder(pred_dir, ref_dir, classes={"whole": [1, 2, 3]}, progress=False)
    assert "c1, c3" in str(info.value) and "allow_missing" in str(info.value)
    summary = evaluate_folder(pred_dir, ref_dir, classes={"whole": [1, 2, 3]}, allow_missing=True,
                              output=tmp_path / "out", progress=False)
    assert list(summary.cases) == ["c2"]
    assert "c1, c3" in summary.notes[0]
    assert (tmp_path / "out" / "summary.json").is_file() and (tmp_path / "out" / "cases.csv").is_file()
    assert not (pred_dir / "summary.json").exists()


def test_extra_predictions_are_noted_and_classes_found_in_references(tmp_path):
    cases = make_cases()
    pred_dir, ref_dir = write_folder(tmp_path, cases)
    write_label(pred_dir / "c9.nii.gz", cases["c1"][0], Geometry.identity(3, SPACING))
    summary = evaluate_folder(pred_dir, ref_dir, lesion_wise=False, progress=False)
    assert summary.classes == {"1": 1, "2": 2, "3": 3}
    assert summary.settings["file_ending"] == ".nii.gz" and summary.settings["lesion"] is None
    assert any("c9" in n for n in summary.notes)
    assert "lesion_dice" not in summary.metrics
    assert summary.per_case("dice", "2")[0] == pytest.approx(2 * 4 / (4 + 5))
    assert "lesion_dice" not in summary.format_table()


def test_shape_mismatch_names_both_files(tmp_path):
    cases = make_cases()
    cases["c2"] = (cases["c2"][0][:, :, :6], cases["c2"][1])
    pred_dir, ref_dir = write_folder(tmp_path, cases)
    with pytest.raises(EvaluationError, match="shape") as info:
        evaluate_folder(pred_dir, ref_dir, classes=CLASSES, progress=False)
    msg = str(info.value)
    assert str(pred_dir / "c2.nii.gz") in msg and str(ref_dir / "c2.nii.gz") in msg and "resample" in msg


def test_spacing_mismatch_is_an_error(tmp_path):
    pred_dir, ref_dir = write_folder(tmp_path, make_cases(), pred_spacing=(0.5, 1.0, 2.5))
    with pytest.raises(EvaluationError, match="spacing") as info:
        evaluate_folder(pred_dir, ref_dir, classes=CLASSES, progress=False)
    assert "c1.nii.gz" in str(info.value)
    # a tiny difference (header rounding) is accepted and the reference spacing is used
    pred_dir, ref_dir = write_folder(tmp_path / "b", make_cases(), pred_spacing=(0.5, 1.0, 2.0001))
    summary = evaluate_folder(pred_dir, ref_dir, classes={"whole": (1, 2, 3)}, lesion_wise=False, progress=False)
    assert summary.cases["c1"]["whole"]["volume_ref_ml"] == pytest.approx(12 * 1.0 / 1000)


def test_other_ending_detected_and_pairs_in_worker_processes(tmp_path):
    cases = make_cases()
    pred_dir, ref_dir = write_folder(tmp_path, cases, ending=".nrrd")
    (ref_dir / "notes.txt").write_text("not an image")
    summary = evaluate_folder(pred_dir, ref_dir, classes=CLASSES, lesion_wise=False, progress=False)
    assert summary.settings["file_ending"] == ".nrrd" and list(summary.cases) == ["c1", "c2", "c3"]
    pairs = [(c, pred_dir / f"{c}.nrrd", ref_dir / f"{c}.nrrd") for c in cases]
    parallel = evaluate_pairs(pairs, CLASSES, lesion_kwargs={"min_volume_voxels": 2}, jobs=2, progress=False)
    serial = evaluate_pairs(pairs, CLASSES, lesion_kwargs={"min_volume_voxels": 2}, progress=False)
    assert parallel.to_json() == serial.to_json()
    assert parallel.settings["lesion"]["min_volume_voxels"] == 2
    assert parallel.cases["c2"]["enh"]["n_false_positives"] == 0  # the one-voxel blob is below 2 voxels


def test_pair_errors(tmp_path):
    with pytest.raises(EvaluationError, match="more than once"):
        evaluate_pairs([("a", "p", "r"), ("a", "p", "r")], CLASSES, progress=False)
    with pytest.raises(EvaluationError, match="unknown lesion option"):
        evaluate_pairs([("a", "p", "r")], CLASSES, lesion_kwargs={"dilate": 2}, progress=False)
    with pytest.raises(EvaluationError, match="no classes"):
        evaluate_pairs([("a", "p", "r")], {}, progress=False)
    with pytest.raises(EvaluationError, match="folder not found"):
        evaluate_folder(tmp_path / "nope", tmp_path, progress=False)
    with pytest.raises(EvaluationError, match="no image files"):
        evaluate_folder(tmp_path, tmp_path, progress=False)


def test_ignore_label_from_dataset_json(tmp_path):
    ref = np.zeros((3, 4, 5), np.uint8)
    ref[1, 1:3, 1:3] = 1
    ref[2, :, :] = 2  # ignore
    pred = ref.copy()
    pred[2, 0, 0:4] = 1  # on ignored voxels: not false positives
    pred[0, 0, 0] = 1  # a real false positive
    pred_dir, ref_dir = write_folder(tmp_path, {"a": (pred, ref)})
    ds = write_dataset_json(tmp_path, {"background": 0, "tumour": 1, "ignore": 2})
    summary = evaluate_folder(pred_dir, ref_dir, dataset_json=ds, lesion_wise=False, progress=False)
    assert summary.classes == {"tumour": 1} and summary.settings["ignore_label"] == 2
    m = summary.cases["a"]["tumour"]
    assert (m["tp"], m["fp"], m["fn"]) == (4, 1, 0) and m["dice"] == pytest.approx(8 / 9)
