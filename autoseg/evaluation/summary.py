"""The result of an evaluation: every metric of every case and class, aggregated (mean, median, quartiles,
foreground mean), saved as ``summary.json`` and ``cases.csv`` and printed as a table.

Means ignore NaN cases (both masks empty); ``foreground_mean`` averages the per-class means and is NaN when one
of them is NaN, as in nnU-Net. JSON stores NaN as ``null``; infinite values are refused.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoseg.errors import FileFormatError
from autoseg.evaluation.metrics import ClassSpec, class_values
from autoseg.io.atomic import read_json, write_json_atomic, write_text_atomic

SUMMARY_VERSION = 1
DEFAULT_TABLE_METRICS = ("dice", "hd95", "nsd", "lesion_dice", "lesion_hd95")


def _stat(values: Sequence[float], fn: Any) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(fn(arr)) if arr.size else math.nan


def _num(v: float) -> str:
    if math.isnan(v):
        return "nan"
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 10 else f"{v:.3f}"


def to_json_value(v: Any, where: str) -> Any:
    """JSON-safe copy: NaN -> None, tuples -> lists, numpy scalars -> Python; infinity is refused."""
    if isinstance(v, Mapping):
        return {str(k): to_json_value(x, f"{where}/{k}") for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_json_value(x, where) for x in v]
    if isinstance(v, (bool, np.bool_, int, np.integer)):
        return bool(v) if isinstance(v, (bool, np.bool_)) else int(v)
    if isinstance(v, (float, np.floating)) and math.isinf(v):
        raise ValueError(f"{where}: infinite value; metrics must be finite or NaN to be stored as JSON.")
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(v) else float(v)
    return v


def _class_to_json(v: ClassSpec) -> int | list[int]:
    return list(v) if isinstance(v, tuple) else int(v)


def normalise_classes(classes: Mapping[str, Any]) -> dict[str, ClassSpec]:
    out: dict[str, ClassSpec] = {}
    for name, value in classes.items():
        vals = class_values(value)
        out[str(name)] = vals if isinstance(value, (list, tuple)) and len(vals) > 1 else vals[0]
    return out


@dataclass
class EvaluationSummary:
    """Metrics of every case and class, with the settings that produced them.

    Attributes:
        classes: class name -> label value or region (tuple of label values).
        cases: case id -> class name -> metric name -> value (NaN where undefined).
        settings: tolerance, lesion options, ignore label, implementation description, folders.
        notes: remarks about the pairing (skipped cases, predictions without reference).
    """

    classes: dict[str, ClassSpec]
    cases: dict[str, dict[str, dict[str, float]]]
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> list[str]:
        """Metric names present, in first-seen order."""
        seen: dict[str, None] = {}
        for per_class in self.cases.values():
            for values in per_class.values():
                seen.update(dict.fromkeys(values))
        return list(seen)

    def _check_class(self, cls: str) -> None:
        if cls not in self.classes:
            raise KeyError(f"unknown class {cls!r}; the summary holds {list(self.classes)}.")

    def per_case(self, metric: str, cls: str) -> list[float]:
        """The metric of class ``cls`` for every case, in case order (NaN where absent)."""
        self._check_class(cls)
        return [float(c.get(cls, {}).get(metric, math.nan)) for c in self.cases.values()]

    def mean(self, metric: str, cls: str) -> float:
        """Mean of the metric over cases, ignoring NaN (NaN when no case has a value)."""
        return _stat(self.per_case(metric, cls), np.mean)

    def median(self, metric: str, cls: str) -> float:
        """Median of the metric over cases, ignoring NaN."""
        return _stat(self.per_case(metric, cls), np.median)

    def foreground_mean(self, metric: str) -> float:
        """Mean over classes of the per-class means; NaN when a class mean is NaN (nnU-Net convention)."""
        means = [self.mean(metric, c) for c in self.classes]
        return float(np.mean(means)) if means else math.nan

    def to_json(self) -> dict[str, Any]:
        """The ``summary.json`` object (NaN -> null).

        Raises:
            ValueError: a value is infinite.
        """
        metrics = self.metrics
        d = {
            "version": SUMMARY_VERSION,
            "classes": {k: _class_to_json(v) for k, v in self.classes.items()},
            "settings": self.settings,
            "notes": list(self.notes),
            "mean": {c: {m: self.mean(m, c) for m in metrics} for c in self.classes},
            "foreground_mean": {m: self.foreground_mean(m) for m in metrics},
            "median": {c: {m: self.median(m, c) for m in metrics} for c in self.classes},
            "cases": self.cases,
        }
        return to_json_value(d, "summary")

    @classmethod
    def from_json(cls, d: Mapping[str, Any], source: str = "summary.json") -> EvaluationSummary:
        """Rebuild a summary from :meth:`to_json` output (null -> NaN).

        Raises:
            FileFormatError: not a summary object, or of an unknown version.
        """
        if not isinstance(d, Mapping) or d.get("version") != SUMMARY_VERSION:
            found = d.get("version") if isinstance(d, Mapping) else type(d).__name__
            raise FileFormatError(f"{source}: not an autoseg evaluation summary of version {SUMMARY_VERSION} "
                                  f"(found {found!r}). Re-run the evaluation to regenerate it.")
        try:
            cases = {str(case): {str(c): {str(m): (math.nan if v is None else v) for m, v in vals.items()}
                                 for c, vals in per_class.items()} for case, per_class in d["cases"].items()}
            return cls(classes=normalise_classes(d["classes"]), cases=cases,
                       settings=dict(d.get("settings", {})), notes=list(d.get("notes", [])))
        except (KeyError, AttributeError, TypeError, ValueError) as err:
            raise FileFormatError(f"{source}: malformed evaluation summary ({err}). Re-run the evaluation "
                                  "to regenerate it.") from err

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_json` to ``path`` atomically."""
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EvaluationSummary:
        """Read a ``summary.json`` written by :meth:`save`.

        Raises:
            FileFormatError: missing, unreadable or malformed file.
        """
        d = read_json(path, FileFormatError, "Re-run the evaluation to regenerate it.")
        return cls.from_json(d, source=str(path))

    def write_csv(self, path: str | os.PathLike[str]) -> None:
        """One row per case: ``case`` then ``<class>/<metric>`` for every class and metric (NaN as ``nan``)."""
        metrics = self.metrics
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["case"] + [f"{c}/{m}" for c in self.classes for m in metrics])
        for case, per_class in self.cases.items():
            row = [case]
            for c in self.classes:
                for m in metrics:
                    v = per_class.get(c, {}).get(m, math.nan)
                    row.append(str(int(v)) if isinstance(v, (int, np.integer)) else repr(float(v)))
            writer.writerow(row)
        write_text_atomic(path, buf.getvalue())

    def format_table(self, metrics: Sequence[str] = DEFAULT_TABLE_METRICS) -> str:
        """A text table: one row per class plus ``mean``; each cell ``mean  median [q1, q3]`` over cases.

        NaN cases are ignored. The ``mean`` row shows the foreground mean (mean of class means) and the
        median and quartiles of each case's class-averaged value. Metrics absent from the summary are
        left out.
        """
        present = set(self.metrics)
        metrics = [m for m in metrics if m in present]

        def cell(mean: float, values: Sequence[float]) -> str:
            q1, med, q3 = (_stat(values, lambda a, q=q: np.percentile(a, q)) for q in (25, 50, 75))
            return f"{_num(mean)}  {_num(med)} [{_num(q1)}, {_num(q3)}]"

        rows = [["class"] + list(metrics)]
        for c in self.classes:
            rows.append([c] + [cell(self.mean(m, c), self.per_case(m, c)) for m in metrics])
        mean_row = ["mean"]
        for m in metrics:
            per_class = np.array([self.per_case(m, c) for c in self.classes], dtype=np.float64)
            case_avg = [_stat(col, np.mean) for col in per_class.T]
            mean_row.append(cell(self.foreground_mean(m), case_avg))
        rows.append(mean_row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        header = f"{len(self.cases)} cases; each cell: mean  median [q1, q3] over cases (NaN ignored)"
        return "\n".join([header] + lines)
