"""Per-class case metrics: hand-computed values, regions, ignore label and edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from autoseg.evaluation.metrics import EvaluationError, case_metrics, classes_from_labels
from autoseg.evaluation.surface import image_diagonal_mm, surface_metrics

# 2D maps, spacing (2.0, 0.5) mm -> 1 mm2 per pixel (volumes in "ml" = pixels / 1000)
REF = np.array([
    [0, 1, 1, 1, 0, 0],
    [0, 0, 2, 2, 0, 0],
    [0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 9, 9],
])
PRED = np.array([
    [1, 1, 1, 0, 0, 0],
    [0, 0, 2, 1, 0, 0],
    [0, 0, 0, 0, 0, 4],
    [0, 0, 0, 0, 1, 1],
])
SP = (2.0, 0.5)


def test_hand_computed_label_and_region():
    m = case_metrics(PRED, REF, {"one": 1, "both": (1, 2)}, SP, ignore_label=9, lesion_wise=False)
    one = m["one"]
    # label 1: ref (0,1),(0,2),(0,3); pred (0,0),(0,1),(0,2),(1,3) ((3,4),(3,5) lie on ignored voxels)
    assert (one["tp"], one["fp"], one["fn"]) == (2, 2, 1)
    assert one["dice"] == pytest.approx(4 / 7)
    assert one["iou"] == pytest.approx(2 / 5)
    assert one["precision"] == pytest.approx(1 / 2)
    assert one["recall"] == pytest.approx(2 / 3)
    assert one["volume_pred_ml"] == pytest.approx(4 / 1000)
    assert one["volume_ref_ml"] == pytest.approx(3 / 1000)
    # region {1, 2}: ref 5 pixels, pred 5 pixels, overlap 4
    both = m["both"]
    assert (both["tp"], both["fp"], both["fn"]) == (4, 1, 1)
    assert both["dice"] == pytest.approx(8 / 10)
    assert set(one) == {"dice", "iou", "precision", "recall", "hd95", "assd", "nsd", "volume_pred_ml",
                        "volume_ref_ml", "tp", "fp", "fn"}
    # surface metrics use the masks after the ignore label is removed
    valid = REF != 9
    want = surface_metrics(np.isin(PRED, (1, 2)) & valid, np.isin(REF, (1, 2)), SP)
    assert {k: both[k] for k in ("hd95", "assd", "nsd")} == want


def test_surface_values_for_a_simple_shift():
    ref = np.zeros((5, 9), int)
    pred = np.zeros_like(ref)
    ref[2, 2:5] = 1
    pred[2, 3:6] = 1
    m = case_metrics(pred, ref, {"a": 1}, (1.0, 0.5), lesion_wise=False, tolerance_mm=0.25)["a"]
    # each segment's end voxel is 0.5 mm from the other's nearest voxel; the rest coincide. Directed
    # distances [0, 0, 0.5]: the 95th percentile interpolates linearly at rank 1.9 -> 0.45
    assert m["hd95"] == pytest.approx(0.45)
    assert m["assd"] == pytest.approx(1.0 / 6)
    assert m["nsd"] == pytest.approx(4 / 6)


def test_ignore_label_removes_voxels_from_both_masks():
    without = case_metrics(PRED, REF, {"one": 1}, SP, lesion_wise=False)["one"]
    assert (without["tp"], without["fp"], without["fn"]) == (2, 4, 1)
    with_ignore = case_metrics(PRED, REF, {"one": 1}, SP, ignore_label=9, lesion_wise=False)["one"]
    assert with_ignore["fp"] == 2


def test_edge_cases():
    m = case_metrics(PRED, REF, {"absent": 7, "pred_only": 4, "ref_only": 9}, SP)
    absent = m["absent"]
    for key in ("dice", "iou", "precision", "recall", "hd95", "assd", "nsd"):
        assert math.isnan(absent[key]), key
    assert absent["lesion_dice"] == 1.0 and absent["lesion_hd95"] == 0.0
    diag = image_diagonal_mm(REF.shape, SP)
    p = m["pred_only"]
    assert p["dice"] == 0.0 and p["iou"] == 0.0 and p["precision"] == 0.0 and math.isnan(p["recall"])
    assert p["hd95"] == pytest.approx(diag) and p["assd"] == pytest.approx(diag) and p["nsd"] == 0.0
    assert p["n_false_positives"] == 1 and p["lesion_dice"] == 0.0
    r = m["ref_only"]
    assert r["dice"] == 0.0 and r["recall"] == 0.0 and math.isnan(r["precision"])
    assert r["hd95"] == pytest.approx(diag) and r["n_ref_lesions"] == 1 and r["n_detected"] == 0


def test_lesion_keys_and_options():
    ref = np.zeros((12, 12, 12), np.uint8)
    pred = np.zeros_like(ref)
    ref[2:5, 2:5, 2:5] = 1
    pred[2:5, 2:5, 2:5] = 1
    pred[9, 9, 9] = 1  # one-voxel false positive
    m = case_metrics(pred, ref, {"t": 1}, (1.0, 1.0, 1.0))["t"]
    assert m["n_false_positives"] == 1 and m["lesion_dice"] == pytest.approx(0.5)
    assert "sensitivity_3-10mm" in m and "n_ref_lt3mm" in m
    m = case_metrics(pred, ref, {"t": 1}, (1.0, 1.0, 1.0), lesion_kwargs={"min_volume_voxels": 2})["t"]
    assert m["n_false_positives"] == 0 and m["lesion_dice"] == 1.0
    with pytest.raises(EvaluationError, match="lesion-wise options"):
        case_metrics(pred, ref, {"t": 1}, (1.0, 1.0, 1.0), lesion_kwargs={"dilation": -2})


def test_invalid_inputs():
    with pytest.raises(EvaluationError, match="shape"):
        case_metrics(PRED, REF[:2], {"one": 1}, SP)
    with pytest.raises(EvaluationError, match="spacing"):
        case_metrics(PRED, REF, {"one": 1}, (1.0, 1.0, 1.0))


def test_classes_from_labels():
    labels = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enh": 3, "single": [4], "ignore": 5}
    assert classes_from_labels(labels) == {"whole": (1, 2, 3), "core": (2, 3), "enh": 3, "single": 4}
    assert classes_from_labels({"bg": 0, "liver": 1, "tumour": "2"}) == {"liver": 1, "tumour": 2}
    with pytest.raises(EvaluationError, match="tumour"):
        classes_from_labels({"background": 0, "tumour": "big"})
