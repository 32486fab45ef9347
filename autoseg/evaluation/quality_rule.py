"""The per-case quality table ``predict`` writes: quality scores, input drift, and a flag.

A case is flagged when its quality score is at or below the threshold ``find-best`` learnt on the
cross-validation cases (``selection/quality.json``, a :class:`QualityRule`), or when its input drifts outside
the training data (spacing, size, intensities, channel names). The table says why, so a reader knows which
cases to look at first.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autoseg.errors import FileFormatError
from autoseg.io.atomic import write_json_atomic, write_text_atomic

#: the table, in the prediction folder
QUALITY_CSV = "quality.csv"
QUALITY_JSON = "quality.json"
#: columns of the table, in order
COLUMNS = ("case", "flagged", "reasons", "quality_score", "combined", "tta_agreement", "fold_agreement",
           "confidence", "expected_dice", "error_head", "error_head_tta", "drift")


@dataclass(frozen=True)
class QualityRule:
    """How a case's quality score becomes a flag, as learnt on cross-validation by ``find-best``.

    Attributes:
        score: which score (``combined``, ``tta_agreement``, ``confidence``, ``expected_dice``, or with a learned
            error head ``error_head`` or ``error_head_tta``; higher = better).
        threshold: cases with a score at or below it are flagged.
        fraction: the share of worst CV cases the threshold was set to catch.
        spearman: per score, Spearman correlation between ``1 - score`` and the CV error ``1 - Dice``.
        precision: share of flagged CV cases that were among the worst ``fraction``.
        recall: share of the worst ``fraction`` of CV cases that were flagged.
        n_cases: CV cases it was learnt on.
        candidate: the pipeline it was learnt for (e.g. ``3d_fullres`` or ``2d+3d_fullres``).
    """

    score: str
    threshold: float
    fraction: float = 0.1
    spearman: dict[str, float | None] = field(default_factory=dict)
    precision: float | None = None
    recall: float | None = None
    n_cases: int = 0
    candidate: str = ""

    def is_low(self, scores: Mapping[str, float | None]) -> bool:
        value = scores.get(self.score)
        return value is not None and not math.isnan(value) and value <= self.threshold

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> QualityRule:
        """Raises: FileFormatError: not a quality rule file (the message says how to recreate it)."""
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(score=str(d["score"]), threshold=float(d["threshold"]), fraction=float(d.get("fraction", .1)),
                       spearman={str(k): (None if v is None else float(v)) for k, v in d.get("spearman", {}).items()},
                       precision=d.get("precision"), recall=d.get("recall"), n_cases=int(d.get("n_cases", 0)),
                       candidate=str(d.get("candidate", "")))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise FileFormatError(f"{path}: not a readable quality rule ({err}); rerun `autoseg find-best` to "
                                  "learn it again.") from err


def quality_row(case_id: str, scores: Mapping[str, float | None] | None, drift: Sequence[str],
                rule: QualityRule | None) -> dict[str, Any]:
    """One row of the quality table.

    Args:
        case_id: the case.
        scores: its uncertainty scores (None when predicted without ``--uncertainty``).
        drift: drift findings, one short text each (quantity, value, training range).
        rule: the learnt threshold, or None (then only drift flags a case).
    """
    scores = dict(scores or {})
    reasons = []
    quality = scores.get(rule.score if rule is not None else "combined")
    if rule is not None and rule.is_low(scores):
        reasons.append(f"{rule.score} {quality:.3f} <= {rule.threshold:.3f} (threshold learnt on CV)")
    if drift:
        reasons.append(f"input outside the training data ({len(drift)} finding(s))")
    return {"case": case_id, "flagged": bool(reasons), "reasons": "; ".join(reasons), "quality_score": quality,
            **{k: scores.get(k) for k in COLUMNS[4:-1]}, "drift": list(drift)}


def write_quality_table(folder: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Merge ``rows`` into ``folder/quality.json`` (earlier runs' cases are kept) and rewrite ``quality.csv``.

    Returns:
        The CSV path.
    """
    folder = Path(folder)
    merged: dict[str, Any] = {}
    if (folder / QUALITY_JSON).is_file():
        try:
            old = json.loads((folder / QUALITY_JSON).read_text(encoding="utf-8"))
            merged = dict(old.get("cases", {})) if isinstance(old, dict) else {}
        except (OSError, ValueError):
            merged = {}
    for r in rows:
        merged[str(r["case"])] = dict(r)
    merged = dict(sorted(merged.items()))
    write_json_atomic(folder / QUALITY_JSON, {"columns": list(COLUMNS), "cases": merged})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in merged.values():
        w.writerow([_cell(r.get(c)) for c in COLUMNS])
    write_text_atomic(folder / QUALITY_CSV, buf.getvalue())
    return folder / QUALITY_CSV


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4f}"
    if isinstance(v, (list, tuple)):
        return " | ".join(str(x) for x in v)
    return str(v)
