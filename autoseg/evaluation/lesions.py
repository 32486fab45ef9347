"""Lesion-wise (connected-component) metrics following the BraTS 2023 rules.

Matching (all connected components use full connectivity: 8 in 2D, 26 in 3D):

1. **Reference lesions.** The reference mask is dilated by ``dilation`` voxels with a full cube (1 gives a
   3x3x3 cube in 3D), and the dilated mask is split into connected components. Each lesion is the set of
   original reference voxels inside one dilated component, so lesions closer than about ``2 * dilation``
   voxels merge into one. The dilated component is the lesion's *extent*.
2. **Small lesions.** Lesions of fewer than ``min_volume_voxels`` voxels are dropped (ignored), and
   predicted components lying entirely within the extents of dropped lesions are dropped too. The
   default 0 keeps everything; BraTS 2023 uses 50 voxels for gliomas and 2 for metastases.
3. **Predicted components.** The prediction is split into connected components; components of fewer
   than ``min_volume_voxels`` voxels are dropped.
4. **Scores.** A lesion's prediction is the union of the kept predicted components that intersect its
   extent. The lesion is *detected* when that union is non-empty; its Dice and HD95 (see
   :mod:`autoseg.evaluation.surface`) are computed between the lesion and that union. A missed lesion
   scores Dice 0 and HD95 ``penalty_mm`` (374 mm in BraTS). Each kept predicted component intersecting
   no lesion's extent is a false positive, scoring Dice 0 and HD95 ``penalty_mm``.

Case-level summary (``LesionResult.summary``; counts are ints, the rest floats):

* ``lesion_dice`` = sum of lesion Dice / (n_ref_lesions + n_false_positives); ``lesion_hd95`` likewise
  (false positives add ``penalty_mm`` each). With no lesion and no false positive: 1 and 0.
* ``n_ref_lesions``, ``n_detected``, ``n_false_positives``;
* ``lesion_sensitivity`` = n_detected / n_ref_lesions (NaN without lesions);
* ``lesion_precision`` = kept predicted components that hit a lesion / kept predicted components (NaN
  without any);
* per size bin (equivalent-sphere diameter ``(6 V / pi)^(1/3)`` in 3D, equivalent-circle diameter
  ``(4 A / pi)^(1/2)`` in 2D, in mm; bins ``[0, e1)``, ``[e1, e2)``, ..., ``[e_last, inf)``):
  ``n_ref_<bin>`` and ``sensitivity_<bin>`` (NaN for an empty bin), with bin names ``lt3mm``, ``3-10mm``,
  ``10-15mm``, ``ge15mm`` for the default edges ``(3, 10, 15)``.

``LesionResult.lesions`` lists every kept reference lesion (:class:`Lesion`: volume, diameter, detected,
Dice, HD95).

Example::

    result = lesion_metrics(pred == 1, ref == 1, spacing=(1.0, 1.0, 1.0), min_volume_voxels=2)
    result.summary["lesion_dice"], [l.diameter_mm for l in result.lesions]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from autoseg.evaluation.surface import check_masks, surface_metrics

#: The HD95 BraTS 2023 gives a missed lesion or a false-positive component (mm).
BRATS_PENALTY_MM = 374.0


@dataclass(frozen=True)
class Lesion:
    """One kept reference lesion and how the prediction scored on it."""

    index: int  # 1-based, in the order scipy.ndimage.label numbers the dilated components
    volume_voxels: int
    volume_mm3: float
    diameter_mm: float  # equivalent-sphere (3D) / equivalent-circle (2D) diameter
    detected: bool
    dice: float
    hd95: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LesionResult:
    """Lesion-wise scores of one case and one class.

    Attributes:
        summary: case-level values (keys in the module docstring), ready to merge into a metrics dict.
        lesions: every kept reference lesion, in label order.
        false_positive_volumes_mm3: volume of each false-positive component.
        n_dropped_ref: reference lesions dropped for being smaller than ``min_volume_voxels``.
        n_dropped_pred: predicted components dropped (too small, or inside dropped lesions).
    """

    summary: dict[str, float]
    lesions: list[Lesion] = field(default_factory=list)
    false_positive_volumes_mm3: list[float] = field(default_factory=list)
    n_dropped_ref: int = 0
    n_dropped_pred: int = 0


def size_bin_names(size_bins_mm: Sequence[float]) -> list[str]:
    """Names of the diameter bins for the given edges, e.g. ``['lt3mm', '3-10mm', '10-15mm', 'ge15mm']``."""
    edges = [float(e) for e in size_bins_mm]
    if not edges:
        return []
    names = [f"lt{edges[0]:g}mm"]
    names += [f"{lo:g}-{hi:g}mm" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    names.append(f"ge{edges[-1]:g}mm")
    return names


def equivalent_diameter_mm(volume_mm3: float, ndim: int) -> float:
    """Diameter of the ``ndim``-ball of the given volume: ``(6V/pi)^(1/3)`` in 3D, ``(4A/pi)^(1/2)`` in 2D."""
    unit_ball = math.pi ** (ndim / 2) / math.gamma(ndim / 2 + 1)
    return 2.0 * (volume_mm3 / unit_ball) ** (1.0 / ndim)


def _merged_box(boxes: Sequence[tuple[slice, ...]]) -> tuple[slice, ...]:
    return tuple(slice(min(b[d].start for b in boxes), max(b[d].stop for b in boxes)) for d in range(len(boxes[0])))


def lesion_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], *, dilation: int = 1,
                   min_volume_voxels: int = 0, penalty_mm: float = BRATS_PENALTY_MM,
                   size_bins_mm: Sequence[float] = (3.0, 10.0, 15.0)) -> LesionResult:
    """Lesion-wise Dice, HD95, detection counts and size-stratified sensitivity (BraTS 2023 rules).

    Args:
        pred: predicted mask (nonzero = inside), 2D or 3D.
        ref: reference mask of the same shape.
        spacing: voxel size in mm per array axis (numpy order, ``Geometry.array_spacing``).
        dilation: voxels by which reference lesions are dilated to merge near ones and match predictions.
        min_volume_voxels: lesions and predicted components smaller than this are ignored (BraTS 2023:
            50 for gliomas, 2 for metastases; default 0 keeps all).
        penalty_mm: HD95 of a missed lesion or a false-positive component.
        size_bins_mm: ascending diameter edges (mm) of the sensitivity bins.

    Returns:
        A :class:`LesionResult`; see the module docstring for the summary keys.

    Raises:
        ValueError: the masks and spacing do not fit together, or an option is out of range.
    """
    a, b, sp = check_masks(pred, ref, spacing)
    if int(dilation) != dilation or dilation < 0:
        raise ValueError(f"dilation must be a non-negative whole number of voxels, found {dilation!r}.")
    if min_volume_voxels < 0:
        raise ValueError(f"min_volume_voxels must be >= 0, found {min_volume_voxels!r}.")
    edges = [float(e) for e in size_bins_mm]
    if any(lo >= hi for lo, hi in zip(edges[:-1], edges[1:], strict=True)):
        raise ValueError(f"size_bins_mm must be strictly ascending, found {tuple(size_bins_mm)}.")
    ndim = a.ndim
    full = ndimage.generate_binary_structure(ndim, ndim)
    voxel_mm3 = float(np.prod(sp))

    # reference lesions and their dilated extents
    extent = ndimage.binary_dilation(b, structure=full, iterations=int(dilation)) if dilation and b.any() else b
    ext_lab, n_ext = ndimage.label(extent, structure=full)
    lesion_sizes = np.bincount(ext_lab[b], minlength=n_ext + 1)
    keep_lesion = lesion_sizes >= min_volume_voxels
    keep_lesion[0] = False
    dropped_lesion = ~keep_lesion
    dropped_lesion[0] = False

    # predicted components
    pred_lab, n_pred = ndimage.label(a, structure=full)
    pred_sizes = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)
    keep_pred = pred_sizes >= min_volume_voxels
    keep_pred[0] = False
    if dropped_lesion.any():
        inside_dropped = np.bincount(pred_lab[dropped_lesion[ext_lab]], minlength=n_pred + 1)
        keep_pred &= inside_dropped < pred_sizes

    # which kept component touches which kept lesion extent
    both = (pred_lab > 0) & (ext_lab > 0)
    codes = np.unique(pred_lab[both].astype(np.int64) * (n_ext + 1) + ext_lab[both])
    p_ids, l_ids = codes // (n_ext + 1), codes % (n_ext + 1)
    sel = keep_pred[p_ids] & keep_lesion[l_ids]
    p_ids, l_ids = p_ids[sel], l_ids[sel]
    matches: dict[int, list[int]] = {}
    for p, lesion in zip(p_ids.tolist(), l_ids.tolist(), strict=True):
        matches.setdefault(lesion, []).append(p)
    hit_pred = set(p_ids.tolist())

    ext_boxes = ndimage.find_objects(ext_lab)
    pred_boxes = ndimage.find_objects(pred_lab)
    lesions: list[Lesion] = []
    for idx in np.flatnonzero(keep_lesion).tolist():
        vol = int(lesion_sizes[idx])
        vol_mm3 = vol * voxel_mm3
        comps = matches.get(idx, [])
        if comps:
            box = _merged_box([ext_boxes[idx - 1]] + [pred_boxes[p - 1] for p in comps])
            les = (ext_lab[box] == idx) & b[box]
            hit = np.isin(pred_lab[box], comps)
            dice = 2.0 * int(np.count_nonzero(les & hit)) / (vol + int(np.count_nonzero(hit)))
            hd95 = surface_metrics(hit, les, sp)["hd95"]
        else:
            dice, hd95 = 0.0, float(penalty_mm)
        lesions.append(Lesion(index=idx, volume_voxels=vol, volume_mm3=vol_mm3,
                              diameter_mm=equivalent_diameter_mm(vol_mm3, ndim), detected=bool(comps),
                              dice=float(dice), hd95=float(hd95)))

    kept_pred = np.flatnonzero(keep_pred).tolist()
    fp = [p for p in kept_pred if p not in hit_pred]
    n_ref, n_fp = len(lesions), len(fp)
    n_det = sum(les.detected for les in lesions)
    denom = n_ref + n_fp
    summary: dict[str, float] = {
        "lesion_dice": sum(les.dice for les in lesions) / denom if denom else 1.0,
        "lesion_hd95": (sum(les.hd95 for les in lesions) + n_fp * float(penalty_mm)) / denom if denom else 0.0,
        "n_ref_lesions": n_ref,
        "n_detected": n_det,
        "n_false_positives": n_fp,
        "lesion_sensitivity": n_det / n_ref if n_ref else math.nan,
        "lesion_precision": len(hit_pred) / len(kept_pred) if kept_pred else math.nan,
    }
    bins = np.searchsorted(np.asarray(edges), [les.diameter_mm for les in lesions], side="right")
    for i, name in enumerate(size_bin_names(edges)):
        in_bin = [les for les, bi in zip(lesions, bins.tolist(), strict=True) if bi == i]
        summary[f"n_ref_{name}"] = len(in_bin)
        summary[f"sensitivity_{name}"] = (sum(les.detected for les in in_bin) / len(in_bin)
                                          if in_bin else math.nan)
    return LesionResult(
        summary=summary, lesions=lesions,
        false_positive_volumes_mm3=[int(pred_sizes[p]) * voxel_mm3 for p in fp],
        n_dropped_ref=int(dropped_lesion.sum()), n_dropped_pred=n_pred - len(kept_pred),
    )
