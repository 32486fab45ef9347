"""Target spacing, axis transpose and resampled shapes (nnU-Net v2's rules).

All spacings and shapes are in numpy axis order (``z, y, x``) of the fingerprint, before transposing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autoseg.errors import PlanningError

ANISOTROPY_THRESHOLD = 3.0


@dataclass(frozen=True)
class TargetSpacing:
    """The fullres target spacing and how it was chosen.

    Attributes:
        spacing: target spacing per axis (untransposed).
        median_spacing: per-axis median of the case spacings.
        anisotropic: the anisotropy rule fired (worst axis set to its 10th percentile).
        worst_axis: axis with the largest median spacing.
        reason: one sentence for ``Plans.explain()``.
    """

    spacing: tuple[float, ...]
    median_spacing: tuple[float, ...]
    anisotropic: bool
    worst_axis: int
    reason: str


@dataclass(frozen=True)
class Transpose:
    """Axis order used for planning: the axis with the largest target spacing goes first."""

    forward: tuple[int, ...]
    backward: tuple[int, ...]


def _as_2d_array(values: Sequence[Sequence[float]], name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise PlanningError(f"{name}: need one row per case and one column per axis, got shape {arr.shape}; "
                            "the fingerprint has no cases; check the dataset's labelsTr folder.")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise PlanningError(f"{name}: every value must be finite and > 0 (got min {arr.min()}); "
                            "fix the image headers or recompute the fingerprint.")
    return arr


def fullres_target_spacing(spacings: Sequence[Sequence[float]], shapes_after_crop: Sequence[Sequence[float]],
                           *, anisotropy_threshold: float = ANISOTROPY_THRESHOLD) -> TargetSpacing:
    """Median spacing, except for strongly anisotropic data (nnU-Net's ``determine_fullres_target_spacing``).

    The worst (largest-spacing) axis is set to the 10th percentile of its spacings when both its median
    spacing exceeds ``anisotropy_threshold`` x the largest other median spacing and its median size times
    the threshold is below the smallest other median size. The value never drops below the other axes'
    largest spacing (it is then raised to that + 1e-5).

    Args:
        spacings: per-case spacing (cases x axes).
        shapes_after_crop: per-case shape after cropping to the nonzero region (cases x axes).
        anisotropy_threshold: ratio that counts as anisotropic (3).

    Returns:
        The target spacing record.

    Raises:
        PlanningError: empty input or non-positive spacings/shapes.
    """
    sp = _as_2d_array(spacings, "spacings")
    sh = _as_2d_array(shapes_after_crop, "shapes_after_crop")
    target = np.percentile(sp, 50, axis=0)
    median = tuple(float(v) for v in target)
    size = np.percentile(sh, 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    if not others:
        return TargetSpacing(median, median, False, worst, "one axis only: median spacing")
    max_other = max(target[i] for i in others)
    aniso_spacing = target[worst] > anisotropy_threshold * max_other
    aniso_voxels = size[worst] * anisotropy_threshold < min(size[i] for i in others)
    if aniso_spacing and aniso_voxels:
        value = float(np.percentile(sp[:, worst], 10))
        if value < max_other:
            value = max(max_other, value) + 1e-5
        target[worst] = value
        reason = (f"axis {worst} is anisotropic (median spacing {median[worst]:.4g} > {anisotropy_threshold:g} x "
                  f"{max_other:.4g} and median size {size[worst]:.4g} x {anisotropy_threshold:g} < "
                  f"{min(size[i] for i in others):.4g}): its target spacing is the 10th percentile {value:.4g} "
                  "instead of the median, to keep more slices")
        return TargetSpacing(tuple(float(v) for v in target), median, True, worst, reason)
    return TargetSpacing(median, median, False, worst, "target spacing = median spacing of the cases "
                         "(not anisotropic enough for the 10th-percentile rule)")


def transpose_for(target_spacing: Sequence[float]) -> Transpose:
    """Put the axis with the largest target spacing first, the others in their order.

    Args:
        target_spacing: fullres target spacing (untransposed).

    Returns:
        Forward and backward axis permutations.
    """
    worst = int(np.argmax(np.asarray(target_spacing)))
    forward = (worst, *[i for i in range(len(target_spacing)) if i != worst])
    backward = tuple(forward.index(i) for i in range(len(forward)))
    return Transpose(forward=forward, backward=backward)


def resampled_shape(shape: Sequence[float], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """Shape after resampling: ``round(old_spacing / new_spacing x old_shape)`` per axis (half to even).

    Args:
        shape: shape before resampling.
        spacing: spacing before resampling.
        new_spacing: target spacing.

    Returns:
        The new shape.
    """
    return tuple(int(round(float(o) / float(n) * float(s)))
                 for s, o, n in zip(shape, spacing, new_spacing, strict=True))


def median_resampled_shape(spacings: Sequence[Sequence[float]], shapes_after_crop: Sequence[Sequence[float]],
                           target_spacing: Sequence[float]) -> tuple[float, ...]:
    """Per-axis median of the case shapes after resampling to ``target_spacing`` (may end in .5).

    Args:
        spacings: per-case spacing.
        shapes_after_crop: per-case shape after cropping.
        target_spacing: the target spacing.

    Returns:
        Median shape per axis.
    """
    new = [resampled_shape(sh, sp, target_spacing) for sp, sh in zip(spacings, shapes_after_crop, strict=True)]
    return tuple(float(v) for v in np.median(np.asarray(new, dtype=float), axis=0))
