"""Learning postprocessing rules on cross-validation predictions (the rules and their order are described in
:mod:`autoseg.ensemble.postprocessing`): each candidate step is scored on every CV case, and kept only where it
raises the CV mean Dice by the acceptance rule of its kind. Every candidate is recorded in ``tried``."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from autoseg.ensemble.components import (
    LoadedCase,
    ScoreTask,
    apply_step,
    check_classes,
    load_case,
    parent_class,
    score_task,
)
from autoseg.ensemble.postprocessing import PostprocessingRules
from autoseg.errors import DatasetError
from autoseg.parallel import imap_ordered

CACHE_BYTES = 2 * 1024**3  # CV arrays kept in memory between passes up to this total; the rest is re-read
MAX_THRESHOLDS = 20
_TOL = 1e-9

@dataclass(eq=False)
class CasePair:
    """One CV case: a prediction and its reference, as files or arrays (numpy axis order).

    ``spacing`` (numpy order, mm) defaults to the prediction file's, else the reference's, else 1.
    """

    case_id: str
    pred_path: str | os.PathLike[str] | None = None
    ref_path: str | os.PathLike[str] | None = None
    pred: np.ndarray | None = None
    ref: np.ndarray | None = None
    spacing: Sequence[float] | None = None


class _Learner:
    def __init__(self, cases: Sequence[CasePair], classes: dict[str, tuple[int, ...]], ignore_label: int | None,
                 jobs: int, progress: bool) -> None:
        self.classes, self.ignore, self.jobs, self.progress = classes, ignore_label, jobs, progress
        self.cases, self.steps, self.tried = list(cases), [], []
        in_memory = [c.pred is not None and c.ref is not None for c in self.cases]
        self.cache: list[LoadedCase | None] = [load_case(c) if m else None for c, m in zip(self.cases, in_memory)]
        todo = [c for c, m in zip(self.cases, in_memory) if not m]
        total = 0
        loaded = imap_ordered(load_case, todo, jobs=jobs, desc="postprocessing: load", progress=progress,
                              label=lambda c: c.case_id)
        slots = [i for i, m in enumerate(in_memory) if not m]
        for i, item in zip(slots, loaded):
            size = item.pred.nbytes + item.ref.nbytes
            if total + size <= CACHE_BYTES:
                self.cache[i], total = item, total + size

    def evaluate(self, candidates: Sequence[tuple[dict[str, Any], ...]], fp_class: str | None = None,
                 desc: str = "") -> tuple[np.ndarray, np.ndarray]:
        tasks = [ScoreTask(cached if cached is not None else case, () if cached is not None else tuple(self.steps),
                       tuple(candidates), self.classes, self.ignore, fp_class)
                 for case, cached in zip(self.cases, self.cache)]
        results = list(imap_ordered(score_task, tasks, jobs=self.jobs, desc=f"postprocessing: {desc}",
                                    progress=self.progress, label=lambda t: getattr(t.case, "case_id", "case")))
        scores = np.stack([r[0] for r in results], axis=1)  # candidate x case x column
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            means = np.nanmean(scores, axis=1)
        return means, np.concatenate([r[1] for r in results])

    def commit(self, step: dict[str, Any]) -> None:
        self.steps.append(step)
        for c in self.cache:
            if c is not None:
                apply_step(c.pred, step, self.classes, c.spacing)

    def summary(self, row: np.ndarray) -> dict[str, float | None]:
        return {**{name: _num(v) for name, v in zip(self.classes, row[:-1])}, "mean": _num(_class_mean(row))}

    def try_step(self, step: dict[str, Any], current: np.ndarray, target: int | None, desc: str
                 ) -> tuple[bool, np.ndarray]:
        """Score one candidate step on top of the accepted ones, record it, keep it if it passes; returns
        whether it was kept and the score row after it (or ``current``)."""
        after = self.evaluate([(step,)], desc=desc)[0][0]
        ok, why = _verdict(current, after, target, list(self.classes))
        self.record(step, current, after, ok, why)
        if ok:
            self.commit(step)
        return ok, after if ok else current

    def record(self, step: dict[str, Any], before: np.ndarray, after: np.ndarray, accepted: bool, reason: str) -> None:
        self.tried.append({"step": step, "before": self.summary(before), "after": self.summary(after),
                           "foreground_before": _num(before[-1]), "foreground_after": _num(after[-1]),
                           "accepted": accepted, "reason": reason})


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 6)


def _better(new: float, old: float) -> bool:
    if np.isnan(old):
        return False
    return bool(np.isnan(new) or new > old + _TOL)  # NaN after a number: every false positive gone


def _not_worse(new: float, old: float) -> bool:
    if np.isnan(new):
        return True
    return bool(not np.isnan(old) and new >= old - _TOL)


def _class_mean(row: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(row[:-1]))


def _verdict(before: np.ndarray, after: np.ndarray, target: int | None, names: Sequence[str]) -> tuple[bool, str]:
    """Acceptance: ``target`` (class index) improves and the class mean holds, or (None) the foreground or
    the class mean improves and no class decreases."""
    if target is not None:
        if not _better(after[target], before[target]):
            return False, f"{names[target]} did not improve"
        if not _not_worse(_class_mean(after), _class_mean(before)):
            return False, "the mean over classes decreased"
        return True, f"{names[target]} improved and the mean over classes did not decrease"
    worse = [n for i, n in enumerate(names) if not _not_worse(after[i], before[i])]
    if worse:
        return False, f"{', '.join(worse)} decreased"
    if _better(after[-1], before[-1]):
        return True, "the foreground improved and no class decreased"
    if _better(_class_mean(after), _class_mean(before)):
        return True, "the mean over classes improved and no class decreased"
    return False, "neither the foreground nor the mean over classes improved"


def _thresholds(volumes: np.ndarray) -> list[float]:
    vols = np.unique(volumes)
    if vols.size > MAX_THRESHOLDS:
        vols = np.unique(np.quantile(vols, np.linspace(0, 1, MAX_THRESHOLDS), method="nearest"))
    return [float(v) * (1 + 1e-6) + 1e-9 for v in vols]  # just above: removes that component and smaller ones


def learn_postprocessing(cases: Sequence[CasePair], classes: Mapping[str, Sequence[int] | int], *,
                         ignore_label: int | None = None, jobs: int = 1, progress: bool = False) -> PostprocessingRules:
    """Learn postprocessing rules on CV predictions, keeping each only where it raises the CV mean Dice.

    Args:
        cases: prediction/reference pairs (files are read lazily; at most ~2 GB of cropped arrays are kept in
            memory between passes, the rest is re-read).
        classes: class name -> label values, e.g. ``{"liver": (1,), "tumour": (2,)}`` or BraTS regions
            ``{"whole": (1, 2, 3), "core": (1, 3), "enhancing": (3,)}``.
        ignore_label: reference label excluded from Dice (None: none).
        jobs: processes evaluating cases in parallel.
        progress: show progress bars.

    Returns:
        The rules (possibly empty) with the CV Dice before and after, and every candidate tried.

    Raises:
        DatasetError: no cases, invalid classes, a missing prediction or reference, or mismatched shapes.
        ImageReadError: a file cannot be read.
    """
    cls = check_classes(classes, DatasetError)
    if not cases:
        raise DatasetError("learn_postprocessing: no CV cases given; postprocessing is learnt on cross-validation "
                           "predictions, so run the cross-validation folds first.")
    names = list(cls)
    lr = _Learner(cases, cls, ignore_label, jobs, progress)
    step = {"rule": "largest_component_all"}
    means, _ = lr.evaluate([(), (step,)], desc="largest foreground component")
    start = current = means[0]
    ok, why = _verdict(current, means[1], None, names)
    lr.record(step, current, means[1], ok, why)
    if ok:
        lr.commit(step)
        current = means[1]
    largest = set()
    for i, name in enumerate(names):
        ok, current = lr.try_step({"rule": "largest_component", "class": name}, current, i,
                                  f"largest {name} component")
        if ok:
            largest.add(name)
    for i, name in enumerate(names):
        if name in largest:
            continue
        fp = lr.evaluate([], fp_class=name, desc=f"{name} false positives")[1]
        if fp.size == 0:
            lr.tried.append({"step": {"rule": "min_size", "class": name}, "accepted": False,
                             "reason": f"every predicted {name} component touches the reference; nothing to remove"})
            continue
        steps = [{"rule": "min_size", "class": name, "min_volume_mm3": t} for t in _thresholds(fp)]
        rows = lr.evaluate([(s,) for s in steps], desc=f"{name} minimum size")[0]
        verdicts = [_verdict(current, r, i, names) for r in rows]
        best = max((k for k in range(len(steps)) if verdicts[k][0]), default=None,
                   key=lambda k: (rows[k][i] if np.isfinite(rows[k][i]) else np.inf, -k))
        for k, (s, r) in enumerate(zip(steps, rows)):
            ok, why = verdicts[k]
            lr.record(s, current, r, k == best, why if k == best or not ok else f"{why}, but a better size was chosen")
        if best is not None:
            lr.commit(steps[best])
            current = rows[best]
    for i, name in enumerate(names):
        if parent_class(cls, name) is None:
            continue
        _, current = lr.try_step({"rule": "nested_consistency", "class": name}, current, None, f"{name} nesting")
    return PostprocessingRules(cls, tuple(lr.steps), "dice", lr.summary(start), lr.summary(current), tuple(lr.tried))
