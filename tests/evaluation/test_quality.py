"""Learning the quality flag on cross-validation: Spearman, the quantile threshold, precision and recall."""

from __future__ import annotations

import numpy as np
import pytest

from autoseg.evaluation.quality import calibrate_quality, case_errors, spearman
from autoseg.evaluation.quality_rule import QualityRule, quality_row, write_quality_table
from autoseg.evaluation.summary import EvaluationSummary


def test_spearman_and_threshold_catch_the_worst_cases():
    rng = np.random.default_rng(0)
    errors = {f"c{i:02d}": float(e) for i, e in enumerate(rng.uniform(0, 0.5, 40))}
    scores = {c: {"tta_agreement": 1 - e + rng.normal(0, 0.01), "confidence": float(rng.uniform()),
                  "expected_dice": 0.5} for c, e in errors.items()}
    rule = calibrate_quality(scores, errors)
    assert rule.score == "tta_agreement"  # the best-ranking score is chosen
    assert rule.spearman["tta_agreement"] > 0.95 and abs(rule.spearman["confidence"]) < 0.5
    assert rule.spearman["expected_dice"] is None  # constant: undefined
    assert rule.n_cases == 40 and rule.recall >= 0.75 and rule.precision >= 0.75
    flagged = [c for c in scores if rule.is_low(scores[c])]
    assert len(flagged) == 4  # 10% of 40


def test_default_score_with_few_cases_and_missing_scores():
    errors = {"a": 0.1, "b": 0.2, "c": 0.3}
    scores = {"a": {"tta_agreement": None, "confidence": 0.9}, "b": {"tta_agreement": None, "confidence": 0.8},
              "c": {"tta_agreement": None, "confidence": 0.7}}
    rule = calibrate_quality(scores, errors)
    assert rule.score == "confidence" and rule.threshold == 0.7  # tta not available: the next usable score
    assert calibrate_quality({}, errors) is None
    assert spearman([1, 2], [1, 2]) is None


def test_case_errors_ignore_empty_classes():
    s = EvaluationSummary(classes={"a": 1, "b": 2}, cases={
        "x": {"a": {"dice": 0.8}, "b": {"dice": float("nan")}},
        "y": {"a": {"dice": float("nan")}, "b": {"dice": float("nan")}}})
    assert case_errors(s) == {"x": pytest.approx(0.2), "y": 0.0}


def test_quality_table_merges_runs_and_explains_flags(tmp_path):
    rule = QualityRule(score="tta_agreement", threshold=0.9)
    low = quality_row("a", {"tta_agreement": 0.85, "confidence": 0.7}, [], rule)
    drift = quality_row("b", {"tta_agreement": 0.95}, ["spacing z 3.0 mm outside 0.9-1.1"], rule)
    fine = quality_row("c", {"tta_agreement": 0.97}, [], rule)
    assert low["flagged"] and "threshold learnt on CV" in low["reasons"]
    assert drift["flagged"] and "outside the training data" in drift["reasons"] and not fine["flagged"]
    write_quality_table(tmp_path, [low, drift])
    path = write_quality_table(tmp_path, [fine])
    text = path.read_text().splitlines()
    assert text[0].startswith("case,flagged,reasons,quality_score") and len(text) == 4
    assert "spacing z 3.0 mm" in text[2]
    rule.save(tmp_path / "rule.json")
    assert QualityRule.load(tmp_path / "rule.json") == rule
