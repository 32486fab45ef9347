"""Deletion/insertion curves and AUCs, mass inside the reference, and the baselines, on hand-worked examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from autoseg.evaluation.explanation_scores import (
    FRACTIONS,
    ExplanationEvaluation,
    MapScore,
    auc,
    blanking_curve,
    distance_map,
    mass_inside,
    ranking,
    score_map,
)
from autoseg.evaluation.metrics import EvaluationError


def test_deletion_and_insertion_auc_match_a_hand_worked_example():
    saliency = np.array([4.0, 3.0, 2.0, 1.0])
    ref = np.array([True, True, False, False])

    def dice_of(keep):  # the share of the two reference voxels still present
        return keep[ref].mean()

    f = [0.0, 0.25, 0.5, 0.75, 1.0]
    rng = np.random.default_rng(0)
    deletion = blanking_curve(saliency, dice_of, f, insertion=False, rng=rng)
    insertion = blanking_curve(saliency, dice_of, f, insertion=True, rng=rng)
    assert deletion == [1.0, 0.5, 0.0, 0.0, 0.0] and insertion == [0.0, 0.5, 1.0, 1.0, 1.0]
    # in units of the 2-voxel mask, twice the fractions blank the same voxels
    assert blanking_curve(saliency, dice_of, [2 * v for v in f], insertion=False, rng=rng, unit=2) == deletion
    # trapezoids of width 0.25: (1 + .5)/2 * .25 + (.5 + 0)/2 * .25 = 0.25; (0 + .5)/2 * .25 + ... = 0.75
    assert auc(f, deletion) == pytest.approx(0.25) and auc(f, insertion) == pytest.approx(0.75)
    assert auc([0.0, 0.5], [1.0, 0.0]) == pytest.approx(0.5)  # normalised by the span
    assert mass_inside(np.array([4.0, 3.0, 2.0, -5.0]), ref) == pytest.approx(7 / 9)  # negatives ignored
    assert math.isnan(mass_inside(np.zeros(4), ref))
    with pytest.raises(EvaluationError):
        auc([0.0, 0.0], [1.0, 1.0])


def test_curves_count_in_reference_volumes_on_a_hand_worked_example():
    assert FRACTIONS == (0.0, 0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
    saliency = np.arange(16.0, 0.0, -1.0)  # a perfect map: the 8 reference voxels rank first
    ref = saliency > 8
    score = score_map("c", "tumour", "m", saliency, ref, lambda keep: keep[ref].mean())
    # 0, 1, 2, 4, 6, 8, 12, 16 voxels blanked (or kept): 0 .. 2 times the 8-voxel mask
    assert score.deletion == (1.0, 0.875, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0)
    assert score.insertion == (0.0, 0.125, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0)
    # deletion: (1.875 * .125 + 1.625 * .125 + 1.25 * .25 + .75 * .25 + .25 * .25) / 2 = 0.5 / 2, over a span of 2
    assert score.deletion_auc == pytest.approx(0.25) and score.insertion_auc == pytest.approx(0.75)
    assert score.mass_inside == pytest.approx(sum(range(9, 17)) / sum(range(1, 17)))


def test_ties_are_ranked_at_random_and_distance_baseline_peaks_on_the_mask():
    flat = np.zeros(1000)
    orders = [ranking(flat, np.random.default_rng(s)) for s in (0, 1)]
    assert sorted(orders[0]) == list(range(1000)) and (orders[0] != orders[1]).any()
    mask = np.zeros((5, 9), bool)
    mask[2, 2] = True
    d = distance_map(mask, (1.0, 2.0))
    assert d[2, 2] == 1.0 and d[3, 2] == pytest.approx(0.5) and d[2, 3] == pytest.approx(1 / 3)


def test_verdict_names_the_metrics_a_method_does_not_win():
    def s(method, dele, ins, mass):
        return MapScore("c", "tumour", method, (1.0, dele, dele), (0.0, ins, ins), mass)
    ev = ExplanationEvaluation([s("random", 0.9, 0.1, 0.1), s("distance", 0.2, 0.8, 0.9),
                                s("good", 0.1, 0.9, 0.95), s("weak", 0.5, 0.5, 0.5)])
    assert ev.not_beating() == {"good": [], "weak": ["deletion_auc vs distance", "insertion_auc vs distance",
                                                     "mass_inside vs distance"]}
    table = ev.format_table()
    assert "good: beats both baselines" in table and "weak: does NOT beat" in table


class _ThresholdModel:
    """Stands in for a predictor: class 1 wherever channel 0 is positive."""

    def logits(self, data):
        return np.stack([-data[0], data[0]])

    def export(self, logits, props):
        return logits.argmax(0), None


def test_score_case_ranks_a_map_on_the_mask_above_random_and_scores_the_baselines():
    from types import SimpleNamespace

    from autoseg.evaluation.spatial_explain import Target, _Case, score_case

    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    data = np.where(mask, 1.0, -1.0).astype(np.float32)[None]
    pre = SimpleNamespace(data=data, properties=SimpleNamespace(target_spacing_t=(1.0, 1.0)))
    seg = mask.astype(np.uint8)
    case = _Case("c", data, None, pre, seg, mask[None], mask[None], seg, mask[None], seg)
    scores = score_case(_ThresholdModel(), case, [Target("tumour", (1,), 1)], {"oracle": mask[None] * 1.0})
    by = {s.method: s for s in scores}
    assert set(by) == {"random", "distance", "oracle"}
    # 9 of 64 voxels: blanking 1/8 and 1/4 of the mask (1 and 2 voxels) leaves 8 and 7: Dice 16/17 and 14/16
    assert by["oracle"].deletion[:3] == pytest.approx((1.0, 16 / 17, 14 / 16)) and by["oracle"].mass_inside == 1.0
    assert by["oracle"].deletion[5:] == (0.0, 0.0, 0.0)  # the whole mask blanked
    assert by["oracle"].deletion_auc < by["random"].deletion_auc
    assert by["oracle"].insertion_auc > by["random"].insertion_auc
    assert by["distance"].deletion == by["oracle"].deletion  # ranks the mask first too
