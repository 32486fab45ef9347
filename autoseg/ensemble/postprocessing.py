"""Postprocessing learnt on cross-validation predictions, kept rule by rule only where it raises the CV Dice.

Rules, tried in this order (the learnt order is the order of application):

1. ``largest_component_all``: keep the largest connected component of the foreground (``seg > 0``); kept when
   the foreground mean Dice strictly improves and no class's mean Dice decreases.
2. ``largest_component`` per class (declared order): kept when that class improves and the mean over classes
   does not decrease.
3. ``min_size`` per class (skipped where 2 was kept): remove components smaller than ``min_volume_mm3``
   (physical volume, mm2 for 2D images, so it transfers across resolutions). Candidates are the volumes of
   predicted components that miss the reference (false positives), at most 20; the best for the class is kept
   when it improves the class and the mean over classes does not decrease.
4. ``nested_consistency`` per class inside another class (regions such as BraTS): a component that touches
   no voxel of its parent class outside itself moves to the innermost ancestor it touches, or to 0 (an
   isolated enhancing blob with no tumour around it is removed). Kept when the foreground mean or the mean
   over classes strictly improves and no class decreases.

Removal semantics: voxels removed from class C get the label of C's parent P (the smallest other class whose
labels strictly contain C's): the smallest label of P not in C. BraTS (whole 1,2,3; core 1,3; enhancing 3):
a removed enhancing component becomes 1, a removed core component 2, a removed whole component 0. Without a
parent (plain label datasets) removed voxels become 0. Means over cases ignore NaN cases (class absent from
both prediction and reference), as ``np.nanmean`` does; undefined means are stored as None.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.ensemble.components import (FIX, RULES, LoadedCase, ScoreTask, apply_step, bounding_box, check_classes,
                                         check_step, load_case, parent_class, score_task, step_text)
from autoseg.errors import DatasetError, FileFormatError, ImageReadError, ImageWriteError
from autoseg.io.atomic import read_json, write_json_atomic
from autoseg.io.image import SUPPORTED_ENDINGS, file_ending, read_label, write_label
from autoseg.parallel import imap_ordered

FORMAT, VERSION = "autoseg.postprocessing", 1
CACHE_BYTES = 2 * 1024**3  # CV arrays kept in memory between passes up to this total; the rest is re-read
MAX_THRESHOLDS = 20
_TOL = 1e-9


@dataclass(frozen=True)
class PostprocessingRules:
    """Learnt postprocessing: ``steps`` applied in order, plus the CV record of how they were chosen.

    Attributes:
        classes: class name -> label values (a region lists several).
        steps: the kept rules, e.g. ``{"rule": "min_size", "class": "enhancing", "min_volume_mm3": 12.5}``.
        metric: the CV metric the rules were chosen on.
        before: CV mean Dice per class and ``"mean"`` (over classes) without postprocessing (None: undefined).
        after: the same with the steps applied.
        tried: every candidate evaluated: ``step``, ``before``/``after`` (per class and ``"mean"``),
            ``foreground_before``/``foreground_after``, ``accepted`` and a ``reason``.
    """

    classes: dict[str, tuple[int, ...]]
    steps: tuple[dict[str, Any], ...] = ()
    metric: str = "dice"
    before: dict[str, float | None] = field(default_factory=dict)
    after: dict[str, float | None] = field(default_factory=dict)
    tried: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        classes = check_classes(self.classes, FileFormatError)
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "steps", tuple(check_step(s, classes, f"postprocessing step {i + 1}")
                                                for i, s in enumerate(self.steps)))
        for i, t in enumerate(self.tried):
            step = t.get("step") if isinstance(t, Mapping) else None
            if not isinstance(step, Mapping) or step.get("rule") not in RULES:
                raise FileFormatError(f"postprocessing rules: tried entry {i + 1} lacks a known 'step'. {FIX}")
        object.__setattr__(self, "tried", tuple(dict(t) for t in self.tried))

    @classmethod
    def identity(cls, classes: Mapping[str, Sequence[int] | int]) -> PostprocessingRules:
        """Rules that change nothing."""
        return cls(dict(classes))  # type: ignore[arg-type]

    @property
    def is_empty(self) -> bool:
        """True when no step was kept (applying is a copy)."""
        return not self.steps

    def apply(self, seg: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """Apply the steps to a label map.

        Args:
            seg: label map in numpy axis order (``z, y, x`` or ``y, x``).
            spacing: voxel spacing in the same axis order (mm), used by ``min_size``.

        Returns:
            A new array of the same shape and dtype.

        Raises:
            ValueError: ``spacing`` does not have one value per axis.
        """
        seg = np.asarray(seg)
        if len(spacing) != seg.ndim:
            raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {seg.ndim}D label map; "
                             "give one per array axis (numpy order).")
        out = seg.copy()
        if self.steps:
            view = out[bounding_box(out != 0)]  # nothing outside the foreground's box can change
            for step in self.steps:
                apply_step(view, step, self.classes, spacing)
        return out

    def describe(self, *, tried: bool = False) -> list[str]:
        """One line per kept step with its CV effect (``tried``: one per candidate, kept or not, with why)."""
        entries = self.tried if tried else [
            next((t for t in self.tried if t.get("accepted") and t["step"] == s), {"step": s}) for s in self.steps]
        lines = []
        for entry in entries:
            text = step_text(entry["step"])
            if "before" not in entry:
                lines.append(f"{text}: not tried ({entry.get('reason', '')})" if tried else text)
                continue
            key = "foreground" if entry["step"]["rule"] in ("largest_component_all", "nested_consistency") \
                else entry["step"]["class"]
            b, a = ((entry[f"foreground_{x}"] for x in ("before", "after")) if key == "foreground"
                    else (entry[x].get(key) for x in ("before", "after")))
            line = f"{text}: CV Dice {'(foreground) ' if key == 'foreground' else ''}{_fmt(b)} -> {_fmt(a)}"
            verdict = f" [{'kept' if entry.get('accepted') else 'rejected'}: {entry.get('reason', '')}]"
            lines.append(line + (verdict if tried else ""))
        return lines

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (see :meth:`from_json`)."""
        return {"format": FORMAT, "version": VERSION, "metric": self.metric,
                "classes": {k: list(v) for k, v in self.classes.items()}, "steps": [dict(s) for s in self.steps],
                "before": dict(self.before), "after": dict(self.after), "tried": [dict(t) for t in self.tried]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PostprocessingRules:
        """Rules from :meth:`to_json`'s dict.

        Raises:
            FileFormatError: not a rules object, another version, unknown rule, missing or invalid field.
        """
        if not isinstance(d, Mapping) or "classes" not in d or "steps" not in d:
            raise FileFormatError(f"postprocessing rules must be a JSON object with 'classes' and 'steps'. {FIX}")
        if d.get("version", VERSION) != VERSION:
            raise FileFormatError(f"postprocessing rules of version {d.get('version')!r}; this autoseg reads "
                                  f"version {VERSION}. {FIX}")
        if not isinstance(d["steps"], list) or not isinstance(d.get("tried", []), list) or \
                not all(isinstance(d.get(k, {}), Mapping) for k in ("before", "after")):
            raise FileFormatError(f"postprocessing rules: 'steps' and 'tried' must be lists, 'before' and 'after' "
                                  f"objects. {FIX}")
        return cls(check_classes(d["classes"], FileFormatError), tuple(d["steps"]), str(d.get("metric", "dice")),
                   dict(d.get("before", {})), dict(d.get("after", {})), tuple(d.get("tried", [])))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the rules as JSON, atomically."""
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PostprocessingRules:
        """Read rules written by :meth:`save`.

        Raises:
            FileFormatError: missing, unreadable or malformed file (the message names it).
        """
        d = read_json(path, FileFormatError, FIX)
        try:
            return cls.from_json(d)
        except FileFormatError as err:
            raise FileFormatError(f"{path}: {err}") from err


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# ---------------------------------------------------------------------------------------------- learning


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
        step = {"rule": "largest_component", "class": name}
        after = lr.evaluate([(step,)], desc=f"largest {name} component")[0][0]
        ok, why = _verdict(current, after, i, names)
        lr.record(step, current, after, ok, why)
        if ok:
            lr.commit(step)
            current = after
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
        step = {"rule": "nested_consistency", "class": name}
        after = lr.evaluate([(step,)], desc=f"{name} nesting")[0][0]
        ok, why = _verdict(current, after, None, names)
        lr.record(step, current, after, ok, why)
        if ok:
            lr.commit(step)
            current = after
    return PostprocessingRules(cls, tuple(lr.steps), "dice", lr.summary(start), lr.summary(current), tuple(lr.tried))


# ---------------------------------------------------------------------------------------------- folders


def _postprocess_file(job: tuple[Path, Path, dict[str, Any]]) -> Path:
    src, dst, rules = job
    img = read_label(src)
    write_label(dst, PostprocessingRules.from_json(rules).apply(img.array, img.geometry.array_spacing), img.geometry)
    return dst


def postprocess_folder(input_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str],
                       rules: PostprocessingRules, *, jobs: int = 1, progress: bool = True,
                       overwrite: bool = False) -> list[Path]:
    """Apply ``rules`` to every segmentation file of a folder, writing same-named files with the same geometry.

    Args:
        input_dir: folder of label maps (any supported ending; hidden files and other files are skipped).
        output_dir: where the results go (created; must differ from ``input_dir``).
        rules: the rules to apply.
        jobs: processes in parallel.
        progress: show a progress bar.
        overwrite: rewrite outputs that exist already (default: keep them).

    Returns:
        The output path of every input file, in name order (written now or already present).

    Raises:
        ImageReadError: the input folder is missing, holds no segmentation, or a file cannot be read.
        ImageWriteError: the output folder is the input folder, or a file cannot be written.
    """
    src_dir, dst_dir = Path(input_dir), Path(output_dir)
    if not src_dir.is_dir():
        raise ImageReadError(f"{src_dir}: input folder not found. Give the folder holding the segmentations.")
    if dst_dir.resolve() == src_dir.resolve():
        raise ImageWriteError(f"{dst_dir}: the output folder is the input folder; postprocessing never overwrites "
                              "its inputs. Choose another output folder.")
    files = sorted(p for p in src_dir.iterdir()
                   if p.is_file() and not p.name.startswith(".") and file_ending(p) in SUPPORTED_ENDINGS)
    if not files:
        raise ImageReadError(f"{src_dir}: no segmentation files ({', '.join(SUPPORTED_ENDINGS)}) found. Check the "
                             "input folder.")
    dst_dir.mkdir(parents=True, exist_ok=True)
    outputs = [dst_dir / p.name for p in files]
    todo = [(s, d, rules.to_json()) for s, d in zip(files, outputs) if overwrite or not d.exists()]
    list(imap_ordered(_postprocess_file, todo, jobs=jobs, desc="postprocess", progress=progress,
                      label=lambda j: str(j[0])))
    return outputs


__all__ = ["CasePair", "PostprocessingRules", "RULES", "learn_postprocessing", "postprocess_folder"]
