"""Resampling orders and the separate-z rule (nnU-Net v2's defaults), recorded in the plan so that
preprocessing and export apply exactly what was planned."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from autoseg.planner.spacing import ANISOTROPY_THRESHOLD


@dataclass(frozen=True)
class ResamplingPlan:
    """How images, segmentations and predicted probabilities are resampled.

    Attributes:
        order_image: spline order for images (3).
        order_seg: order for segmentations, applied to one-hot masks thresholded at 0.5 (1).
        order_probabilities: order for probabilities/logits at export (1).
        order_z: order along the low-resolution axis when resampling separately (0 = nearest).
        separate_z_threshold: spacing ratio max/min above which an axis is resampled separately (3).
        force_separate_z: None = decide per case with :func:`separate_z_axis`; True/False forces it.
    """

    order_image: int = 3
    order_seg: int = 1
    order_probabilities: int = 1
    order_z: int = 0
    separate_z_threshold: float = ANISOTROPY_THRESHOLD
    force_separate_z: bool | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ResamplingPlan:
        """Inverse of :meth:`to_json`."""
        force = d.get("force_separate_z")
        return cls(order_image=int(d["order_image"]), order_seg=int(d["order_seg"]),
                   order_probabilities=int(d["order_probabilities"]), order_z=int(d["order_z"]),
                   separate_z_threshold=float(d["separate_z_threshold"]),
                   force_separate_z=None if force is None else bool(force))


def _lowres_axes(spacing: Sequence[float]) -> list[int]:
    top = max(spacing)
    return [i for i, s in enumerate(spacing) if s == top]


def _anisotropic(spacing: Sequence[float], threshold: float) -> bool:
    return max(spacing) / min(spacing) > threshold


def separate_z_axis(current_spacing: Sequence[float], target_spacing: Sequence[float], *,
                    threshold: float = ANISOTROPY_THRESHOLD, force: bool | None = None) -> int | None:
    """The axis to resample separately (in-plane first, then along it with ``order_z``), or None.

    If the current spacing is anisotropic (max/min > threshold) its coarsest axis is used; otherwise, if the
    target spacing is anisotropic, the target's coarsest axis. When two or more axes tie for the coarsest
    spacing there is no separate axis. ``force=True`` uses the current coarsest axis, ``False`` disables it.

    Args:
        current_spacing: spacing of the case.
        target_spacing: spacing to resample to.
        threshold: anisotropy ratio (3).
        force: override of the rule.

    Returns:
        The axis index, or None for a plain 3D resize.
    """
    if force is False:
        return None
    if force or _anisotropic(current_spacing, threshold):
        axes = _lowres_axes(current_spacing)
    elif _anisotropic(target_spacing, threshold):
        axes = _lowres_axes(target_spacing)
    else:
        return None
    return axes[0] if len(axes) == 1 else None
