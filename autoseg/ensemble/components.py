"""What each postprocessing rule does, how rules are validated, and how one CV case is scored.

Components use full connectivity (26 neighbours in 3D, 8 in 2D); arrays are in numpy axis order.
:func:`apply_step` changes a label map in place; removing voxels from a class relabels them to the class's
parent (:func:`fill_label`), so region datasets stay consistent. :func:`score_task` is the worker that
:func:`autoseg.ensemble.learning.learn_postprocessing` runs per case and pass.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from autoseg.errors import DatasetError, FileFormatError
from autoseg.io.image import read_label

Classes = Mapping[str, tuple[int, ...]]
#: rule name -> fields a step of that rule needs besides "rule"
RULES: dict[str, tuple[str, ...]] = {"largest_component_all": (), "largest_component": ("class",),
                                     "min_size": ("class", "min_volume_mm3"), "nested_consistency": ("class",)}
FIX = "Re-learn the rules (autoseg find-best) or correct the file."


def _structure(ndim: int) -> np.ndarray:
    return np.ones((3,) * ndim, dtype=bool)


def _label(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Component ids (0 = outside the mask) and the voxel count of every id (index 0 unused)."""
    lab, n = ndimage.label(mask, structure=_structure(mask.ndim))
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    sizes[0] = 0
    return lab, sizes


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Smallest box holding every True voxel (one voxel at the origin when there is none)."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, min(1, mask.shape[axis])))
    return tuple(box)


def largest_only(mask: np.ndarray) -> np.ndarray:
    """The voxels of ``mask`` outside its largest component (ties: the first in scan order)."""
    lab, sizes = _label(mask)
    if sizes.size <= 2:
        return np.zeros(mask.shape, dtype=bool)
    return mask & (lab != int(np.argmax(sizes)))


def smaller_than(mask: np.ndarray, voxel_volume: float, min_volume: float) -> np.ndarray:
    """The voxels of ``mask`` in components whose volume (voxels x ``voxel_volume``) is below ``min_volume``."""
    lab, sizes = _label(mask)
    small = sizes * voxel_volume < min_volume
    small[0] = False
    return small[lab]


def false_positive_volumes(mask: np.ndarray, ref: np.ndarray, voxel_volume: float) -> np.ndarray:
    """Volumes of the components of ``mask`` that share no voxel with ``ref``."""
    lab, sizes = _label(mask)
    hit = np.zeros(sizes.size, dtype=bool)
    hit[np.unique(lab[mask & ref])] = True
    hit[0] = True
    return sizes[~hit] * float(voxel_volume)


def _touching(lab: np.ndarray, context: np.ndarray) -> np.ndarray:
    """Per component id: whether the component lies next to (or on) a voxel of ``context``."""
    out = np.zeros(int(lab.max()) + 1, dtype=bool)
    if context.any():
        near = ndimage.binary_dilation(context, structure=_structure(lab.ndim))
        out[np.unique(lab[near])] = True
    out[0] = False
    return out


def parent_class(classes: Classes, name: str) -> str | None:
    """The smallest other class whose labels strictly contain ``name``'s (ties: declared order), or None."""
    own = set(classes[name])
    best = None
    for other, labels in classes.items():
        if other != name and own < set(labels) and (best is None or len(labels) < len(classes[best])):
            best = other
    return best


def fill_label(classes: Classes, name: str) -> int:
    """Label given to voxels removed from ``name``: the smallest parent label outside ``name``, else 0."""
    parent = parent_class(classes, name)
    return 0 if parent is None else min(set(classes[parent]) - set(classes[name]))


def _ancestors(classes: Classes, name: str) -> list[str]:
    chain = []
    cur = parent_class(classes, name)
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = parent_class(classes, cur)
    return chain


def _remove(seg: np.ndarray, remove: np.ndarray, value: int) -> None:
    if remove.any():
        seg[remove] = value


def _nested(seg: np.ndarray, classes: Classes, name: str) -> None:
    """Relabel components of ``name`` that do not touch the rest of their parent class.

    Such a component moves up to the innermost ancestor whose other voxels it touches (value: that
    ancestor's smallest label outside the class one level below it), or to 0 when it touches none.
    """
    mask = np.isin(seg, classes[name])
    lab, sizes = _label(mask)
    if sizes.size <= 1:
        return
    target = np.full(sizes.size, -1, dtype=np.int64)  # -1: undecided, -2: keep
    below = set(classes[name])
    for level, anc in enumerate(_ancestors(classes, name)):
        touched = _touching(lab, np.isin(seg, classes[anc]) & ~mask) & (target == -1)
        target[touched] = -2 if level == 0 else min(set(classes[anc]) - below)
        below = set(classes[anc])
    target[target == -1] = 0
    target[0] = -2
    per_voxel = target[lab]
    change = per_voxel != -2
    seg[change] = per_voxel[change]


def apply_step(seg: np.ndarray, step: Mapping[str, Any], classes: Classes, spacing: Sequence[float]) -> None:
    """Apply one validated rule (see :mod:`autoseg.ensemble.postprocessing`) to ``seg`` in place."""
    rule = step["rule"]
    if rule == "largest_component_all":
        _remove(seg, largest_only(seg > 0), 0)
        return
    name = step["class"]
    if rule == "nested_consistency":
        _nested(seg, classes, name)
        return
    mask = np.isin(seg, classes[name])
    if rule == "largest_component":
        _remove(seg, largest_only(mask), fill_label(classes, name))
    elif rule == "min_size":
        voxel = float(np.prod(np.asarray(spacing, dtype=np.float64)))
        _remove(seg, smaller_than(mask, voxel, float(step["min_volume_mm3"])), fill_label(classes, name))
    else:  # validated before; kept as a guard
        raise ValueError(f"unknown postprocessing rule {rule!r}")


def check_classes(classes: Mapping[str, Any], error: type[Exception]) -> dict[str, tuple[int, ...]]:
    """``classes`` as name -> sorted tuple of positive labels; anything else raises ``error``."""
    if not isinstance(classes, Mapping) or not classes:
        raise error(f"postprocessing needs a non-empty mapping of class name -> labels, got {classes!r}.")
    out = {}
    for name, labels in classes.items():
        vals = tuple(labels) if isinstance(labels, (list, tuple)) else (labels,)
        if name == "mean" or not vals or not all(isinstance(v, (int, np.integer)) and v > 0 for v in vals):
            raise error(f"class {name!r}: labels must be positive integers (got {labels!r}) and 'mean' is reserved "
                        "as a class name. Fix the dataset's labels.")
        out[str(name)] = tuple(sorted(int(v) for v in vals))
    return out


def check_step(step: Any, classes: Mapping[str, tuple[int, ...]], where: str) -> dict[str, Any]:
    """The step with only its rule's fields; an unknown rule, missing or invalid field raises FileFormatError."""
    if not isinstance(step, Mapping) or step.get("rule") not in RULES:
        rule = step.get("rule") if isinstance(step, Mapping) else step
        raise FileFormatError(f"{where}: unknown postprocessing rule {rule!r}; known rules: {', '.join(RULES)}. {FIX}")
    missing = [f for f in RULES[step["rule"]] if f not in step]
    if missing:
        raise FileFormatError(f"{where}: rule {step['rule']!r} lacks {', '.join(missing)}. {FIX}")
    if "class" in step and step["class"] not in classes:
        raise FileFormatError(f"{where}: class {step['class']!r} is not one of {', '.join(classes)}. {FIX}")
    if step["rule"] == "min_size":
        vol = step["min_volume_mm3"]
        if isinstance(vol, bool) or not isinstance(vol, (int, float)) or not math.isfinite(vol) or vol < 0:
            raise FileFormatError(f"{where}: min_volume_mm3 must be a finite number >= 0, got {vol!r}. {FIX}")
    if step["rule"] == "nested_consistency" and parent_class(classes, step["class"]) is None:
        raise FileFormatError(f"{where}: nested_consistency needs a class inside another; {step['class']!r} is "
                              f"not. {FIX}")
    return {k: step[k] for k in ("rule", *RULES[step["rule"]])}


def step_text(step: Mapping[str, Any]) -> str:
    """What a step does, in words."""
    rule, name = step["rule"], step.get("class")
    if rule == "largest_component_all":
        return "keep only the largest foreground component"
    if rule == "largest_component":
        return f"keep the largest component of {name}"
    if rule == "min_size":
        vol = step.get("min_volume_mm3")
        return f"remove components of {name} smaller than {vol:.4g} mm3" if vol is not None \
            else f"remove small components of {name}"
    return f"remove components of {name} that touch no other voxel of their parent class"


# ---------------------------------------------------------------------------------- scoring one CV case


@dataclass(eq=False)
class LoadedCase:
    """A CV case in memory, cropped to the box of its prediction and reference foreground (nothing outside
    it can change or count)."""

    pred: np.ndarray  # cropped to the box of prediction | reference foreground
    ref: np.ndarray
    spacing: tuple[float, ...]


@dataclass(eq=False)
class ScoreTask:
    """One case's work in one learning pass: Dice of each candidate, and optionally false-positive volumes."""

    case: Any  # a CasePair, or a LoadedCase
    pre_steps: tuple[dict[str, Any], ...]  # kept steps still to apply (cases re-read from files)
    candidates: tuple[tuple[dict[str, Any], ...], ...]
    classes: dict[str, tuple[int, ...]]
    ignore_label: int | None
    fp_class: str | None = None


def load_case(case: Any) -> LoadedCase:
    """Read (or take) a CasePair's arrays, check their shapes agree and crop them."""
    arrays, spacing = [], case.spacing
    for arr, path, what in ((case.pred, case.pred_path, "prediction"), (case.ref, case.ref_path, "reference")):
        if arr is None:
            if path is None:
                raise DatasetError(f"case {case.case_id}: no {what} given; pass a file path or an array.")
            img = read_label(path)
            arr, spacing = img.array, img.geometry.array_spacing if spacing is None else spacing
        arrays.append(np.asarray(arr))
    pred, ref = arrays
    if pred.shape != ref.shape:
        raise DatasetError(f"case {case.case_id}: prediction shape {pred.shape} differs from reference shape "
                           f"{ref.shape}; export predictions on the reference's grid.")
    spacing = tuple(float(s) for s in ((1.0,) * pred.ndim if spacing is None else spacing))
    box = bounding_box((pred != 0) | (ref != 0))
    return LoadedCase(np.ascontiguousarray(pred[box]), np.ascontiguousarray(ref[box]), spacing)


def _apply_all(pred: np.ndarray, steps: Iterable[Mapping[str, Any]], classes: Mapping[str, tuple[int, ...]],
               spacing: Sequence[float]) -> np.ndarray:
    out = pred.copy()
    for step in steps:
        apply_step(out, step, classes, spacing)
    return out


def score_task(task: ScoreTask) -> tuple[np.ndarray, np.ndarray]:
    """Dice per candidate (rows) for each class then the foreground (columns), and false-positive volumes."""
    case = task.case if isinstance(task.case, LoadedCase) else load_case(task.case)
    pred = _apply_all(case.pred, task.pre_steps, task.classes, case.spacing) if task.pre_steps else case.pred
    valid = case.ref != task.ignore_label if task.ignore_label is not None else np.ones(case.ref.shape, bool)
    refs = [np.isin(case.ref, labels) & valid for labels in task.classes.values()] + [(case.ref > 0) & valid]
    rows, labelled = [], {}
    for cand in task.candidates:
        if len(cand) == 1 and cand[0]["rule"] == "min_size":  # thresholds of one class share one labelling
            name = cand[0]["class"]
            if name not in labelled:
                labelled[name] = _label(np.isin(pred, task.classes[name]))
            lab, sizes = labelled[name]
            small = sizes * float(np.prod(case.spacing)) < float(cand[0]["min_volume_mm3"])
            small[0] = False
            p = pred.copy()
            _remove(p, small[lab], fill_label(task.classes, name))
        else:
            p = _apply_all(pred, cand, task.classes, case.spacing) if cand else pred
        masks = [np.isin(p, labels) for labels in task.classes.values()] + [p > 0]
        row = []
        for m, r in zip(masks, refs):
            m &= valid
            denom = int(m.sum()) + int(r.sum())
            row.append(float("nan") if denom == 0 else 2.0 * int((m & r).sum()) / denom)
        rows.append(row)
    fp = np.zeros(0)
    if task.fp_class is not None:
        labels = task.classes[task.fp_class]
        fp = false_positive_volumes(np.isin(pred, labels), np.isin(case.ref, labels) & valid,
                                    float(np.prod(case.spacing)))
    return np.asarray(rows, dtype=np.float64).reshape(len(task.candidates), len(task.classes) + 1), fp
