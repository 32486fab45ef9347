"""Per-class metrics of one case: overlap, surface distances, volumes and lesion-wise scores.

A *class* is a label value (``int``) or a region, a tuple of label values evaluated as their union (BraTS
style: ``whole = (1, 2, 3)``). Voxels where the reference holds ``ignore_label`` are removed from both
masks before anything is computed.

Per class (:func:`case_metrics`):

* ``dice`` = 2TP / (2TP + FP + FN), ``iou`` = TP / (TP + FP + FN), ``precision`` = TP / (TP + FP),
  ``recall`` = TP / (TP + FN);
* ``hd95``, ``assd``, ``nsd`` from :func:`autoseg.evaluation.surface.surface_metrics` (mm);
* ``volume_pred_ml``, ``volume_ref_ml`` (voxel count x voxel volume / 1000), ``tp``, ``fp``, ``fn``
  (voxel counts);
* with ``lesion_wise``, the summary keys of :func:`autoseg.evaluation.lesions.lesion_metrics`.

Edge cases: both masks empty -> dice, iou, precision and recall are NaN (left out of means, like
nnU-Net); prediction empty and reference not -> dice 0, iou 0, recall 0, precision NaN; reference empty
and prediction not -> dice 0, iou 0, precision 0, recall NaN. Surface metrics follow the conventions
of :mod:`autoseg.evaluation.surface` (NaN / image diagonal / NSD 0).

Example::

    classes = classes_from_labels({"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enh": 3})
    m = case_metrics(pred, ref, classes, spacing=(1.0, 1.0, 1.0), ignore_label=None)
    m["whole"]["dice"], m["enh"]["lesion_dice"]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from autoseg.errors import EvaluationError
from autoseg.evaluation.lesions import lesion_metrics
from autoseg.evaluation.surface import surface_metrics

ClassSpec = int | tuple[int, ...]


def class_values(value: int | Sequence[int]) -> tuple[int, ...]:
    """The label values of a class: ``3 -> (3,)``, ``(2, 3) -> (2, 3)``."""
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def classes_from_labels(labels: Mapping[str, Any]) -> dict[str, ClassSpec]:
    """Evaluation classes from a dataset.json ``labels`` mapping.

    Background (label 0 or the name ``background``) and the ``ignore`` entry are skipped; a region,
    given as a list in dataset.json, becomes a tuple (a one-element list becomes a plain label).

    Args:
        labels: name -> label value or list of label values, as in dataset.json (or ``DatasetSpec.labels``).

    Returns:
        name -> ``int`` label or ``tuple`` region, in the order of ``labels``.

    Raises:
        EvaluationError: a value is neither an integer nor a list of integers.
    """
    out: dict[str, ClassSpec] = {}
    for name, value in labels.items():
        if name in ("background", "ignore"):
            continue
        try:
            vals = class_values(value)
        except (TypeError, ValueError) as err:
            raise EvaluationError(f"label '{name}': {value!r} is neither an integer nor a list of integers; "
                                  "fix the 'labels' entry of dataset.json.") from err
        if vals == (0,):
            continue
        out[str(name)] = vals if len(vals) > 1 else vals[0]
    return out


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def overlap_metrics(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Dice, IoU, precision, recall and TP/FP/FN voxel counts of two boolean masks (edge cases above)."""
    tp = int(np.count_nonzero(pred & ref))
    fp = int(np.count_nonzero(pred & ~ref))
    fn = int(np.count_nonzero(~pred & ref))
    return {"dice": _ratio(2 * tp, 2 * tp + fp + fn), "iou": _ratio(tp, tp + fp + fn),
            "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn), "tp": tp, "fp": fp, "fn": fn}


def case_metrics(pred: np.ndarray, ref: np.ndarray, classes: Mapping[str, int | Sequence[int]],
                 spacing: Sequence[float], *, ignore_label: int | None = None, tolerance_mm: float = 1.0,
                 lesion_wise: bool = True, surface: bool = True,
                 lesion_kwargs: Mapping[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """Every metric of every class for one predicted label map against its reference.

    Args:
        pred: predicted label map (integer array).
        ref: reference label map of the same shape.
        classes: name -> label value or region (tuple of label values, evaluated as their union).
        spacing: voxel size in mm per array axis, numpy order (``Geometry.array_spacing``).
        ignore_label: reference value whose voxels are excluded from both masks.
        tolerance_mm: NSD tolerance.
        lesion_wise: also compute the lesion-wise metrics (:func:`~autoseg.evaluation.lesions.lesion_metrics`).
        surface: also compute HD95, ASSD and NSD (:func:`~autoseg.evaluation.surface.surface_metrics`).
        lesion_kwargs: options passed to ``lesion_metrics`` (``dilation``, ``min_volume_voxels``,
            ``penalty_mm``, ``size_bins_mm``).

    Returns:
        class name -> metric name -> value (counts as ``int``, everything else ``float``; NaN where
        undefined).

    Raises:
        EvaluationError: shapes differ or the spacing does not fit the arrays.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise EvaluationError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}; "
                              "resample the prediction onto the reference grid before evaluating.")
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ref.ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise EvaluationError(f"spacing {sp} does not fit {ref.ndim}D arrays: give one positive value (mm) "
                              "per array axis, in numpy order (z, y, x).")
    valid = ref != ignore_label if ignore_label is not None else None
    voxel_ml = float(np.prod(sp)) / 1000.0
    out: dict[str, dict[str, float]] = {}
    for name, value in classes.items():
        vals = class_values(value)
        p, r = np.isin(pred, vals), np.isin(ref, vals)
        if valid is not None:
            p &= valid
            r &= valid
        m = overlap_metrics(p, r)
        counts = {k: m.pop(k) for k in ("tp", "fp", "fn")}
        if surface:
            m.update(surface_metrics(p, r, sp, tolerance_mm=tolerance_mm))
        m["volume_pred_ml"] = (counts["tp"] + counts["fp"]) * voxel_ml
        m["volume_ref_ml"] = (counts["tp"] + counts["fn"]) * voxel_ml
        m.update(counts)
        if lesion_wise:
            try:
                m.update(lesion_metrics(p, r, sp, **dict(lesion_kwargs or {})).summary)
            except (TypeError, ValueError) as err:
                raise EvaluationError(f"lesion-wise options {dict(lesion_kwargs or {})} are invalid ({err}); "
                                      "use dilation, min_volume_voxels, penalty_mm and size_bins_mm.") from err
        out[str(name)] = m
    return out
