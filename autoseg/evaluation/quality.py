"""Does the quality score mean something? Check it against the real errors of the cross-validation cases.

For each case of the chosen pipeline's CV predictions we know its quality scores (saved by validation, see
:mod:`autoseg.inference.uncertainty`) and its real error ``1 - Dice`` (mean over foreground classes). This
module reports the Spearman rank correlation between ``1 - score`` (the uncertainty) and the error for each
score, picks the score that ranks errors best, and sets the flag threshold so that as many CV cases are
flagged as there are cases in the worst ``fraction`` (default 10%); the precision and recall of that
threshold at catching the worst cases are reported too. A quantile threshold, not one fit to the errors, so
the reported precision/recall are not tuned on the same cases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from autoseg.evaluation.quality_rule import QualityRule
from autoseg.evaluation.summary import EvaluationSummary
from autoseg.inference.uncertainty import QUALITY_SCORES

#: fewer CV cases than this: keep the default score instead of choosing one by its correlation
MIN_CASES_TO_CHOOSE = 5


def case_errors(summary: EvaluationSummary, metric: str = "dice") -> dict[str, float]:
    """Per case ``1 - mean over classes of the metric`` (classes absent from both masks left out; a case where
    every class is absent from both has error 0)."""
    out = {}
    for cid, per_class in summary.cases.items():
        vals = [v.get(metric) for v in per_class.values() if isinstance(v, Mapping)]
        vals = [float(v) for v in vals if v is not None and not math.isnan(float(v))]
        out[cid] = 1.0 - float(np.mean(vals)) if vals else 0.0
    return out


def spearman(uncertainty: Sequence[float], errors: Sequence[float]) -> float | None:
    """Spearman rank correlation (None with fewer than 3 values or a constant input)."""
    from scipy.stats import spearmanr

    if len(uncertainty) < 3 or np.ptp(uncertainty) == 0 or np.ptp(errors) == 0:
        return None
    rho = float(spearmanr(uncertainty, errors).statistic)
    return None if math.isnan(rho) else rho


def calibrate_quality(scores: Mapping[str, Mapping[str, float | None]], errors: Mapping[str, float], *,
                      fraction: float = 0.1, score: str | None = None, candidate: str = "") -> QualityRule | None:
    """Learn the flag threshold and report how well each score ranks the real errors.

    Args:
        scores: case -> quality scores (higher = more trustworthy).
        errors: case -> real error (``1 - Dice``).
        fraction: share of worst cases the flag should catch.
        score: the score to threshold; None = the one with the highest Spearman correlation on these cases
            (``combined`` with fewer than :data:`MIN_CASES_TO_CHOOSE` cases).
        candidate: name of the pipeline, recorded.

    Returns:
        The rule, or None when no case has both a score and an error.

    Example:
        >>> s = {f"c{i}": {"combined": 1 - i / 10} for i in range(10)}
        >>> e = {f"c{i}": i / 20 for i in range(10)}
        >>> r = calibrate_quality(s, e)
        >>> r.spearman["combined"], r.threshold, r.precision, r.recall
        (1.0, 0.1, 1.0, 1.0)
    """
    rho: dict[str, float | None] = {}
    for name in QUALITY_SCORES:
        cases = _usable(scores, errors, name)
        rho[name] = spearman([1.0 - float(scores[c][name]) for c in cases], [errors[c] for c in cases])  # type: ignore[arg-type]
    if score is None:
        ranked = [n for n in QUALITY_SCORES if rho[n] is not None]
        enough = len(_usable(scores, errors, QUALITY_SCORES[0])) >= MIN_CASES_TO_CHOOSE
        score = max(ranked, key=lambda n: rho[n]) if ranked and enough else QUALITY_SCORES[0]  # type: ignore[arg-type,return-value]
    cases = _usable(scores, errors, score)
    if not cases:
        available = [n for n in QUALITY_SCORES if _usable(scores, errors, n)]
        if not available:
            return None
        score = available[0]
        cases = _usable(scores, errors, score)
    n_flag = max(1, int(round(fraction * len(cases))))
    values = sorted(float(scores[c][score]) for c in cases)  # type: ignore[arg-type]
    threshold = values[n_flag - 1]
    worst = set(sorted(cases, key=lambda c: (-errors[c], c))[:n_flag])
    flagged = {c for c in cases if float(scores[c][score]) <= threshold}  # type: ignore[arg-type]
    hit = len(flagged & worst)
    return QualityRule(score=score, threshold=threshold, fraction=fraction, spearman=rho,
                       precision=hit / len(flagged) if flagged else None, recall=hit / len(worst),
                       n_cases=len(cases), candidate=candidate)


def _usable(scores: Mapping[str, Mapping[str, float | None]], errors: Mapping[str, float], name: str) -> list[str]:
    return sorted(c for c in errors if c in scores and scores[c].get(name) is not None
                  and not math.isnan(float(scores[c][name])))  # type: ignore[arg-type]


def describe(rule: QualityRule) -> list[str]:
    """Lines for the ``find-best`` report."""
    rho = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in rule.spearman.items())
    pr = (f"precision {rule.precision:.2f}, recall {rule.recall:.2f}" if rule.precision is not None
          else "precision n/a")
    return [f"quality flag (CV, {rule.n_cases} case(s)): Spearman(1 - score, 1 - Dice): {rho}",
            f"  flag when {rule.score} <= {rule.threshold:.4f}: catches the worst {rule.fraction:.0%} with {pr}"]
