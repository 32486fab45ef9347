"""Lesion-wise metrics (BraTS 2023 rules) on hand-made arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from autoseg.evaluation.lesions import equivalent_diameter_mm, lesion_metrics, size_bin_names

SP = (1.0, 1.0, 1.0)


def two_lesions_one_spurious():
    ref = np.zeros((20, 20, 20), bool)
    pred = np.zeros_like(ref)
    ref[2:5, 2:5, 2:5] = True  # lesion A, 27 voxels: predicted shifted by one voxel -> Dice 2/3, HD95 1
    pred[2:5, 2:5, 3:6] = True
    ref[10:12, 10:12, 10:12] = True  # lesion B, 8 voxels: missed
    pred[15:17, 2:4, 15:17] = True  # spurious blob far from any lesion
    return pred, ref


def test_detected_missed_and_false_positive():
    pred, ref = two_lesions_one_spurious()
    res = lesion_metrics(pred, ref, SP)
    s = res.summary
    assert s["n_ref_lesions"] == 2 and s["n_detected"] == 1 and s["n_false_positives"] == 1
    assert s["lesion_dice"] == pytest.approx((2 / 3 + 0 + 0) / 3)
    assert s["lesion_hd95"] == pytest.approx((1.0 + 374.0 + 374.0) / 3)
    assert s["lesion_sensitivity"] == 0.5
    assert s["lesion_precision"] == 0.5
    a, b = res.lesions
    assert (a.volume_voxels, a.detected, b.volume_voxels, b.detected) == (27, True, 8, False)
    assert a.dice == pytest.approx(2 / 3) and a.hd95 == 1.0
    assert b.dice == 0.0 and b.hd95 == 374.0
    assert res.false_positive_volumes_mm3 == [8.0]
    # a different penalty changes only missed lesions and false positives
    s2 = lesion_metrics(pred, ref, SP, penalty_mm=100.0).summary
    assert s2["lesion_hd95"] == pytest.approx((1.0 + 200.0) / 3)


def test_size_bins():
    pred, ref = two_lesions_one_spurious()
    s = lesion_metrics(pred, ref, SP).summary
    # A: 27 mm3 -> (6*27/pi)^(1/3) = 3.72 mm; B: 8 mm3 -> 2.48 mm
    assert (s["n_ref_lt3mm"], s["n_ref_3-10mm"], s["n_ref_10-15mm"], s["n_ref_ge15mm"]) == (1, 1, 0, 0)
    assert s["sensitivity_lt3mm"] == 0.0 and s["sensitivity_3-10mm"] == 1.0
    assert math.isnan(s["sensitivity_10-15mm"]) and math.isnan(s["sensitivity_ge15mm"])
    # with 2 mm voxels the volumes are 8x larger: A 7.44 mm, B 4.96 mm
    res = lesion_metrics(pred, ref, (2.0, 2.0, 2.0))
    assert [round(les.diameter_mm, 2) for les in res.lesions] == [7.44, 4.96]
    assert res.summary["n_ref_3-10mm"] == 2 and res.summary["sensitivity_3-10mm"] == 0.5
    # custom edges; a diameter equal to an edge falls in the upper bin
    assert size_bin_names((2.5, 7.44)) == ["lt2.5mm", "2.5-7.44mm", "ge7.44mm"]
    s = lesion_metrics(pred, ref, SP, size_bins_mm=(2.5,)).summary
    assert (s["n_ref_lt2.5mm"], s["n_ref_ge2.5mm"]) == (1, 1)
    edge = equivalent_diameter_mm(27.0, 3)
    s = lesion_metrics(pred, ref, SP, size_bins_mm=(edge,)).summary
    assert s[f"n_ref_ge{edge:g}mm"] == 1
    assert "n_ref_lt3mm" not in lesion_metrics(pred, ref, SP, size_bins_mm=()).summary


def test_equivalent_diameter():
    assert equivalent_diameter_mm(4 / 3 * math.pi * 8.0, 3) == pytest.approx(4.0)  # sphere of radius 2
    assert equivalent_diameter_mm(math.pi * 9.0, 2) == pytest.approx(6.0)  # circle of radius 3
    ref = np.zeros((10, 10), bool)
    ref[2:5, 2:6] = True  # 12 px of 0.5 x 2 mm = 12 mm2
    res = lesion_metrics(ref, ref, (0.5, 2.0))
    assert res.lesions[0].diameter_mm == pytest.approx(math.sqrt(4 * 12.0 / math.pi))
    assert res.summary["lesion_dice"] == 1.0 and res.summary["lesion_hd95"] == 0.0


def test_lesions_merged_by_dilation():
    ref = np.zeros((8, 8, 16), bool)
    ref[2:4, 2:4, 2:4] = True
    ref[2:4, 2:4, 5:7] = True  # one empty voxel between: the dilated extents touch -> one lesion
    ref[2:4, 2:4, 10:12] = True  # three empty voxels from the previous one: a separate lesion
    pred = np.zeros_like(ref)
    pred[2:4, 2:4, 2:4] = True  # covers half of the merged lesion
    s = lesion_metrics(pred, ref, SP).summary
    assert s["n_ref_lesions"] == 2 and s["n_detected"] == 1 and s["n_false_positives"] == 0
    res = lesion_metrics(pred, ref, SP)
    assert [les.volume_voxels for les in res.lesions] == [16, 8]
    assert res.lesions[0].dice == pytest.approx(2 * 8 / (16 + 8))
    assert s["lesion_dice"] == pytest.approx(2 / 3 / 2)
    # without dilation the three blocks are three lesions
    s0 = lesion_metrics(pred, ref, SP, dilation=0).summary
    assert s0["n_ref_lesions"] == 3 and s0["n_detected"] == 1
    assert s0["lesion_dice"] == pytest.approx(1 / 3)
    # a wider dilation merges all three
    assert lesion_metrics(pred, ref, SP, dilation=2).summary["n_ref_lesions"] == 1


def test_prediction_touching_the_dilated_extent_counts_as_detection():
    ref = np.zeros((10, 10, 10), bool)
    ref[3:5, 3:5, 3:5] = True
    pred = np.zeros_like(ref)
    pred[3:5, 3:5, 5] = True  # next to the lesion, inside its dilated extent, no voxel overlap
    res = lesion_metrics(pred, ref, SP)
    assert res.summary["n_detected"] == 1 and res.summary["n_false_positives"] == 0
    # lesion -> prediction: 4 surface voxels at 1 mm, 4 at 2 mm (95th percentile 2); back: all 1 mm
    assert res.lesions[0].dice == 0.0 and res.lesions[0].hd95 == 2.0


def test_min_volume():
    ref = np.zeros((20, 20, 20), bool)
    pred = np.zeros_like(ref)
    ref[2:5, 2:5, 2:5] = True  # 27 voxels, kept
    pred[2:5, 2:5, 2:5] = True
    ref[10:12, 10:12, 10] = True  # 4 voxels < 5: dropped; its dilated extent is [9:13, 9:13, 9:12]
    pred[9:12, 10:12, 11] = True  # 6 voxels entirely inside that extent: dropped as well
    pred[11:13, 15:18, 15] = True  # 6 voxels elsewhere: a false positive
    pred[16, 2, 2:5] = True  # 3 voxels < 5: dropped
    res = lesion_metrics(pred, ref, SP, min_volume_voxels=5)
    s = res.summary
    assert s["n_ref_lesions"] == 1 and s["n_detected"] == 1 and s["n_false_positives"] == 1
    assert res.n_dropped_ref == 1 and res.n_dropped_pred == 2
    assert s["lesion_dice"] == pytest.approx(0.5) and s["lesion_hd95"] == pytest.approx(374.0 / 2)
    assert s["lesion_precision"] == 0.5
    # a predicted component reaching out of the dropped lesion's extent is kept (and is a false positive)
    pred[9:12, 10:12, 12] = True
    assert lesion_metrics(pred, ref, SP, min_volume_voxels=5).summary["n_false_positives"] == 2
    # without the threshold everything counts
    s = lesion_metrics(pred, ref, SP).summary
    assert s["n_ref_lesions"] == 2 and s["n_false_positives"] == 2


def test_empty_cases():
    empty = np.zeros((6, 6, 6), bool)
    s = lesion_metrics(empty, empty, SP).summary
    assert s["lesion_dice"] == 1.0 and s["lesion_hd95"] == 0.0
    assert s["n_ref_lesions"] == s["n_detected"] == s["n_false_positives"] == 0
    assert math.isnan(s["lesion_sensitivity"]) and math.isnan(s["lesion_precision"])
    blob = empty.copy()
    blob[1:3, 1:3, 1:3] = True
    s = lesion_metrics(blob, empty, SP).summary
    assert s["lesion_dice"] == 0.0 and s["lesion_hd95"] == 374.0 and s["n_false_positives"] == 1
    assert s["lesion_precision"] == 0.0 and math.isnan(s["lesion_sensitivity"])
    s = lesion_metrics(empty, blob, SP).summary
    assert s["lesion_dice"] == 0.0 and s["lesion_hd95"] == 374.0 and s["lesion_sensitivity"] == 0.0


def test_invalid_options():
    m = np.zeros((4, 4), bool)
    with pytest.raises(ValueError, match="dilation"):
        lesion_metrics(m, m, (1.0, 1.0), dilation=-1)
    with pytest.raises(ValueError, match="ascending"):
        lesion_metrics(m, m, (1.0, 1.0), size_bins_mm=(10.0, 3.0))
