"""Augmentation presets by name: the record :class:`AugmentationPreset` and the table :data:`AUGMENTATIONS`.

A preset holds the probability and the range of every training augmentation step of
:func:`autoseg.training.augmentation.training_transforms` (the geometry, i.e. rotation angles, dummy-2D
handling, the initial patch and the mirrored axes, comes from the configuration's
:class:`~autoseg.training.augmentation.AugmentationParams`). A step whose probability is 0 is left out of the
pipeline (it draws no random numbers). Each factory's parameters are keywords with typed defaults
(``inspect.signature(factory, eval_str=True)`` lists them); its first docstring line describes it.

- ``nnunet``: nnU-Net's steps per batch in torch on the training device, the default (linear interpolation);
  ``nnunet_torch`` is its former name. Elastic deformation or cubic interpolation run on the CPU workers instead.
- ``nnunet_cpu``: nnU-Net's pipeline per sample in the CPU worker processes (batchgenerators; bit-identical
  batches to the pipeline without a preset). The former default, kept for one release for comparison.
- ``light``: rotation and scaling, mirroring, and mild multiplicative brightness and contrast only.
- ``none``: nothing random; only the centre crop to the patch and the target steps.

Example:
    >>> from dataclasses import replace
    >>> preset = replace(AUGMENTATIONS["none"](), mirror=True)  # a crop and mirroring only
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from autoseg.errors import TrainingConfigError

__all__ = ["AUGMENTATIONS", "AugmentationPreset", "light", "nnunet", "nnunet_cpu", "none"]

_RANGES = ("scale_range", "noise_std", "blur_sigma", "brightness_range", "contrast_range", "low_res_zoom",
           "gamma_range")


@dataclass(frozen=True)
class AugmentationPreset:
    """The probabilities and ranges of the training augmentation steps (defaults: nnU-Net's pipeline).

    Probabilities are per sample unless they say per channel; every range is ``(low, high)`` sampled uniformly.

    Attributes:
        p_rotation: Rotation (angles from the configuration's :class:`AugmentationParams`).
        p_scaling: Isotropic scaling.
        scale_range: Scale factors; None = the configuration's ``AugmentationParams.scale_range`` (0.7-1.4).
        elastic: Elastic deformation on or off.
        p_elastic: Elastic deformation when ``elastic``.
        order_data: Spline order of the image in the spatial transform: 0, 1 or 3.
        order_seg: 0 = nearest neighbour, 1 = per-label linear interpolation + argmax.
        p_noise, noise_std: Gaussian noise, std drawn from ``noise_std``.
        p_blur, p_blur_per_channel, blur_sigma: Gaussian blur.
        p_brightness, brightness_range: Multiplicative brightness, one factor per channel.
        p_contrast, contrast_range: Contrast, one factor per channel, value range preserved.
        p_low_res, p_low_res_per_channel, low_res_zoom: Simulated low resolution (down by the zoom, back up).
        p_inverted_gamma, p_gamma, gamma_range: Gamma of the inverted image, then of the image (stats kept).
        mirror: Mirror along each of the configuration's mirror axes with p 0.5.
        on_device: Where the steps run: False = per sample in the CPU worker processes (batchgenerators,
            :func:`~autoseg.training.augmentation.training_transforms`); True = per batch in torch on the training
            device (:mod:`autoseg.training.batch_augment`; the workers then only read and crop).

    Raises:
        TrainingConfigError: a probability outside [0, 1], a range with low > high or a non-positive bound
            (noise std and blur sigma may start at 0), an interpolation order not 0/1/3 (data), 0/1 (seg), or
            elastic deformation or cubic interpolation on the device.
    """

    p_rotation: float = 0.2
    p_scaling: float = 0.2
    scale_range: tuple[float, float] | None = None
    elastic: bool = False
    p_elastic: float = 0.2
    order_data: int = 3
    order_seg: int = 1
    p_noise: float = 0.1
    noise_std: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2
    p_blur_per_channel: float = 0.5
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_low_res: float = 0.25
    p_low_res_per_channel: float = 0.5
    low_res_zoom: tuple[float, float] = (0.5, 1.0)
    p_inverted_gamma: float = 0.1
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    mirror: bool = True
    on_device: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name.startswith("p_"):
                _probability("AugmentationPreset", f.name, getattr(self, f.name))
        for name in _RANGES:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _range(name, value, allow_zero=name in ("noise_std", "blur_sigma")))
        _flag("AugmentationPreset", "elastic", self.elastic)
        _flag("AugmentationPreset", "mirror", self.mirror)
        _flag("AugmentationPreset", "on_device", self.on_device)
        if self.on_device and (self.elastic or self.order_data == 3):
            raise TrainingConfigError(
                f"augmentation 'AugmentationPreset': elastic={self.elastic}, order_data={self.order_data} is not "
                "valid with on_device=True; valid: elastic False and order_data 0 or 1 (cubic interpolation and "
                "elastic deformation need the CPU workers: augmentation=nnunet_cpu).")
        _orders("AugmentationPreset", self.order_data, self.order_seg)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (ranges as lists)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _probability(part: str, param: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise TrainingConfigError(f"augmentation {part!r}: {param}={value!r} is not valid; valid: a probability "
                                  "in [0, 1].")
    return float(value)


def _range(param: str, value: object, *, allow_zero: bool) -> tuple[float, float]:
    low_ok = "0 <= low" if allow_zero else "0 < low"
    valid = f"a pair (low, high) of finite numbers with {low_ok} <= high"
    try:
        low, high = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise TrainingConfigError(f"augmentation 'AugmentationPreset': {param}={value!r} is not valid; "
                                  f"valid: {valid}.") from None
    if not (math.isfinite(low) and math.isfinite(high) and (low >= 0 if allow_zero else low > 0) and low <= high):
        raise TrainingConfigError(f"augmentation 'AugmentationPreset': {param}={value!r} is out of range; "
                                  f"valid: {valid}.")
    return (low, high)


def _flag(part: str, param: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TrainingConfigError(f"augmentation {part!r}: {param}={value!r} is not valid; valid: True or False.")


def _orders(part: str, order_data: object, order_seg: object) -> None:
    for param, value, valid in (("order_data", order_data, (0, 1, 3)), ("order_seg", order_seg, (0, 1))):
        if isinstance(value, bool) or value not in valid:
            raise TrainingConfigError(f"augmentation {part!r}: {param}={value!r} is not valid; valid: "
                                      f"{' or '.join(map(str, valid))} (interpolation order).")


def nnunet(*, elastic: bool = False, order_data: int = 1, order_seg: int = 1) -> AugmentationPreset:
    """nnU-Net's augmentation per batch in torch on the training device (CPU or GPU), the default; workers only crop.

    Rotation, scaling, noise, blur, brightness, contrast, low resolution, gamma and mirroring with nnU-Net's
    probabilities and ranges; rotation and scaling resample the batch in one call with ``order_data`` 1 (linear, as
    nnU-Net's current pipeline) or 0, labels with ``order_seg`` 1 (per-label linear + argmax) or 0 (nearest).
    ``elastic`` (elastic deformation, p 0.2) or ``order_data`` 3 (cubic) need the CPU workers: the preset then is
    ``nnunet_cpu``'s. A cascade stage falls back to the CPU workers too (its perturbations run there).

    Raises:
        TrainingConfigError: a parameter out of range.
    """
    _flag("nnunet", "elastic", elastic)
    _orders("nnunet", order_data, order_seg)
    if elastic or order_data == 3:
        return nnunet_cpu(elastic=elastic, order_data=order_data, order_seg=order_seg)
    return AugmentationPreset(order_data=order_data, order_seg=order_seg, on_device=True)


def nnunet_cpu(*, elastic: bool = False, order_data: int = 3, order_seg: int = 1) -> AugmentationPreset:
    """nnU-Net's augmentation per sample in the CPU worker processes (batchgenerators); the former default.

    Bit-identical to the pipeline without a preset. ``elastic`` adds elastic deformation (p 0.2); ``order_data``
    (0, 1 or 3) is the image's spline order in the spatial transform (3 = nnU-Net v1; 1 is ~5x faster for rotated or
    scaled samples); ``order_seg`` 1 = per-label linear + argmax, 0 = nearest. Kept for one release to compare
    with ``nnunet``.

    Raises:
        TrainingConfigError: a parameter out of range.
    """
    _flag("nnunet_cpu", "elastic", elastic)
    _orders("nnunet_cpu", order_data, order_seg)
    return AugmentationPreset(elastic=elastic, order_data=order_data, order_seg=order_seg)


def light(*, order_data: int = 1, order_seg: int = 1) -> AugmentationPreset:
    """Light augmentation: rotation, scaling and mirroring plus mild brightness and contrast only.

    Keeps nnU-Net's rotation (p 0.2) and scaling (p 0.2, the configuration's scale range), no elastic
    deformation, mirroring, multiplicative brightness (p 0.15, 0.9-1.1) and contrast (p 0.15, 0.9-1.1); drops
    noise, blur, simulated low resolution and both gamma steps. ``order_data`` (0, 1 or 3; default 1, linear)
    and ``order_seg`` (0 or 1) as for ``nnunet_cpu``.

    Raises:
        TrainingConfigError: a parameter out of range.
    """
    _orders("light", order_data, order_seg)
    return AugmentationPreset(order_data=order_data, order_seg=order_seg, p_noise=0.0, p_blur=0.0,
                              brightness_range=(0.9, 1.1), contrast_range=(0.9, 1.1), p_low_res=0.0,
                              p_inverted_gamma=0.0, p_gamma=0.0)


def none() -> AugmentationPreset:
    """No augmentation: only the centre crop to the patch and the target steps, no mirroring."""
    return AugmentationPreset(p_rotation=0.0, p_scaling=0.0, p_elastic=0.0, p_noise=0.0, p_blur=0.0,
                              p_brightness=0.0, p_contrast=0.0, p_low_res=0.0, p_inverted_gamma=0.0, p_gamma=0.0,
                              mirror=False)


#: Augmentation name -> factory; every parameter is keyword-only with a typed default. ``nnunet_torch`` is the
#: former name of ``nnunet`` (recipes that name it keep working).
AUGMENTATIONS: dict[str, Callable[..., AugmentationPreset]] = {"nnunet": nnunet, "nnunet_torch": nnunet,
                                                               "nnunet_cpu": nnunet_cpu, "light": light, "none": none}
