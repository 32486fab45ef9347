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
    edges = _check_options(dilation, min_volume_voxels, size_bins_mm)
    full = ndimage.generate_binary_structure(a.ndim, a.ndim)
    voxel_mm3 = float(np.prod(sp))

    ref_cc = _reference_lesions(b, full, dilation, min_volume_voxels)
    pred_cc = _predicted_components(a, full, min_volume_voxels, ref_cc)
    matches, hit_pred = _match_components(pred_cc, ref_cc)
    lesions = _score_lesions(b, sp, voxel_mm3, ref_cc, pred_cc, matches, penalty_mm)

    kept_pred = np.flatnonzero(pred_cc.keep).tolist()
    fp = [p for p in kept_pred if p not in hit_pred]
    summary = _case_summary(lesions, n_fp=len(fp), n_hit_pred=len(hit_pred), n_kept_pred=len(kept_pred),
                            penalty_mm=penalty_mm)
    summary.update(_size_bin_summary(lesions, edges))
    return LesionResult(
        summary=summary, lesions=lesions,
        false_positive_volumes_mm3=[int(pred_cc.sizes[p]) * voxel_mm3 for p in fp],
        n_dropped_ref=int(ref_cc.dropped.sum()), n_dropped_pred=pred_cc.count - len(kept_pred),
    )


@dataclass(frozen=True, eq=False)
class _Components:
    """A connected-component labelling: ``labels`` (0 = background) numbers ``count`` components; ``sizes[k]``
    counts the voxels of component ``k`` and ``keep[k]`` says whether it is kept (``keep[0]`` is False)."""

    labels: np.ndarray
    count: int
    sizes: np.ndarray
    keep: np.ndarray

    @property
    def dropped(self) -> np.ndarray:
        """Per label, whether the component was dropped (background excluded)."""
        dropped = ~self.keep
        dropped[0] = False
        return dropped


def _check_options(dilation: int, min_volume_voxels: int, size_bins_mm: Sequence[float]) -> list[float]:
    """Validate the options of :func:`lesion_metrics`; return the size-bin edges as floats."""
    if int(dilation) != dilation or dilation < 0:
        raise ValueError(f"dilation must be a non-negative whole number of voxels, found {dilation!r}.")
    if min_volume_voxels < 0:
        raise ValueError(f"min_volume_voxels must be >= 0, found {min_volume_voxels!r}.")
    edges = [float(e) for e in size_bins_mm]
    if any(lo >= hi for lo, hi in zip(edges[:-1], edges[1:], strict=True)):
        raise ValueError(f"size_bins_mm must be strictly ascending, found {tuple(size_bins_mm)}.")
    return edges


def _reference_lesions(ref: np.ndarray, full: np.ndarray, dilation: int, min_volume_voxels: int) -> _Components:
    """Label the dilated reference (rule 1): the labels are the lesions' extents, the sizes count original
    reference voxels, and lesions under ``min_volume_voxels`` are not kept (rule 2)."""
    extent = ndimage.binary_dilation(ref, structure=full, iterations=int(dilation)) if dilation and ref.any() else ref
    ext_lab, n_ext = ndimage.label(extent, structure=full)
    lesion_sizes = np.bincount(ext_lab[ref], minlength=n_ext + 1)
    keep_lesion = lesion_sizes >= min_volume_voxels
    keep_lesion[0] = False
    return _Components(labels=ext_lab, count=n_ext, sizes=lesion_sizes, keep=keep_lesion)


def _predicted_components(pred: np.ndarray, full: np.ndarray, min_volume_voxels: int,
                          ref_cc: _Components) -> _Components:
    """Label the prediction (rule 3); components under ``min_volume_voxels`` or lying entirely within the
    extents of dropped lesions (rule 2) are not kept."""
    pred_lab, n_pred = ndimage.label(pred, structure=full)
    pred_sizes = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)
    keep_pred = pred_sizes >= min_volume_voxels
    keep_pred[0] = False
    dropped_lesion = ref_cc.dropped
    if dropped_lesion.any():
        inside_dropped = np.bincount(pred_lab[dropped_lesion[ref_cc.labels]], minlength=n_pred + 1)
        keep_pred &= inside_dropped < pred_sizes
    return _Components(labels=pred_lab, count=n_pred, sizes=pred_sizes, keep=keep_pred)


def _match_components(pred_cc: _Components, ref_cc: _Components) -> tuple[dict[int, list[int]], set[int]]:
    """Which kept predicted components touch which kept lesion extents: per lesion label the list of its
    components (ascending), and the set of components that touch any lesion."""
    pred_lab, ext_lab, n_ext = pred_cc.labels, ref_cc.labels, ref_cc.count
    both = (pred_lab > 0) & (ext_lab > 0)
    codes = np.unique(pred_lab[both].astype(np.int64) * (n_ext + 1) + ext_lab[both])
    p_ids, l_ids = codes // (n_ext + 1), codes % (n_ext + 1)
    sel = pred_cc.keep[p_ids] & ref_cc.keep[l_ids]
    p_ids, l_ids = p_ids[sel], l_ids[sel]
    matches: dict[int, list[int]] = {}
    for p, lesion in zip(p_ids.tolist(), l_ids.tolist(), strict=True):
        matches.setdefault(lesion, []).append(p)
    return matches, set(p_ids.tolist())


def _score_lesions(ref: np.ndarray, sp: tuple[float, ...], voxel_mm3: float, ref_cc: _Components,
                   pred_cc: _Components, matches: dict[int, list[int]], penalty_mm: float) -> list[Lesion]:
    """Score every kept lesion (rule 4) against the union of its matched components, in label order."""
    ext_boxes = ndimage.find_objects(ref_cc.labels)
    pred_boxes = ndimage.find_objects(pred_cc.labels)
    lesions: list[Lesion] = []
    for idx in np.flatnonzero(ref_cc.keep).tolist():
        vol = int(ref_cc.sizes[idx])
        vol_mm3 = vol * voxel_mm3
        comps = matches.get(idx, [])
        if comps:
            box = _merged_box([ext_boxes[idx - 1]] + [pred_boxes[p - 1] for p in comps])
            les = (ref_cc.labels[box] == idx) & ref[box]
            hit = np.isin(pred_cc.labels[box], comps)
            dice = 2.0 * int(np.count_nonzero(les & hit)) / (vol + int(np.count_nonzero(hit)))
            hd95 = surface_metrics(hit, les, sp)["hd95"]
        else:
            dice, hd95 = 0.0, float(penalty_mm)
        lesions.append(Lesion(index=idx, volume_voxels=vol, volume_mm3=vol_mm3,
                              diameter_mm=equivalent_diameter_mm(vol_mm3, ref.ndim), detected=bool(comps),
                              dice=float(dice), hd95=float(hd95)))
    return lesions


def _case_summary(lesions: list[Lesion], *, n_fp: int, n_hit_pred: int, n_kept_pred: int,
                  penalty_mm: float) -> dict[str, float]:
    """The case-level lesion Dice and HD95, the counts, the lesion sensitivity and the component precision."""
    n_ref = len(lesions)
    n_det = sum(les.detected for les in lesions)
    denom = n_ref + n_fp
    return {
        "lesion_dice": sum(les.dice for les in lesions) / denom if denom else 1.0,
        "lesion_hd95": (sum(les.hd95 for les in lesions) + n_fp * float(penalty_mm)) / denom if denom else 0.0,
        "n_ref_lesions": n_ref,
        "n_detected": n_det,
        "n_false_positives": n_fp,
        "lesion_sensitivity": n_det / n_ref if n_ref else math.nan,
        "lesion_precision": n_hit_pred / n_kept_pred if n_kept_pred else math.nan,
    }


def _size_bin_summary(lesions: list[Lesion], edges: list[float]) -> dict[str, float]:
    """Per diameter bin, ``n_ref_<bin>`` and ``sensitivity_<bin>`` (NaN for an empty bin)."""
    summary: dict[str, float] = {}
    bins = np.searchsorted(np.asarray(edges), [les.diameter_mm for les in lesions], side="right")
    for i, name in enumerate(size_bin_names(edges)):
        in_bin = [les for les, bi in zip(lesions, bins.tolist(), strict=True) if bi == i]
        summary[f"n_ref_{name}"] = len(in_bin)
        summary[f"sensitivity_{name}"] = (sum(les.detected for les in in_bin) / len(in_bin)
                                          if in_bin else math.nan)
    return summary
