"""Training-time data augmentation (batchgenerators v1 transforms on numpy batch dicts).

The loader hands over ``{"data": float32 (B, C, *initial_patch), "seg": int16 (B, 1, *initial_patch)}``
where ``seg`` is -1 outside the imaged region (padding, or outside the nonzero mask). The initial patch
is larger than the network patch so that rotation and scaling find image content in the corners.
:func:`training_transforms` then applies, in nnU-Net's order (reference 5.4), with the probabilities and
ranges of the preset ``nnunet_cpu`` (the default ``nnunet`` runs them per batch on the device; others: ``light``,
``none``; a step whose probability is 0 in the preset is left out):

1. (dummy 2D only) fold the first spatial axis into the channels;
2. ``SpatialTransform``: rotation (p 0.2 per sample, every axis gets an angle) and scaling (p 0.2, one
   factor for all axes in 0.7-1.4), optional elastic deformation (off by default), cubic
   interpolation for images and per-label linear interpolation + argmax for the segmentation (so no
   in-between label values appear), constant padding (image 0, seg -1), centre crop to the patch;
3. (dummy 2D only) unfold back to 3D;
4. Gaussian noise (p 0.1, std ~ U(0, 0.1), same for all channels);
5. Gaussian blur (p 0.2, sigma ~ U(0.5, 1) per channel and axis, each channel with p 0.5);
6. multiplicative brightness (p 0.15, factor 0.75-1.25 per channel);
7. contrast (p 0.15, factor 0.75-1.25, range preserved);
8. simulated low resolution (p 0.25, zoom 0.5-1, each channel with p 0.5, dummy-2D axis untouched);
9. inverted gamma (p 0.1) and gamma (p 0.3), gamma 0.7-1.5, mean and std retained;
9b. modality dropout (optional, ``modality_dropout > 0``): whole image channels blanked to 0 (see
    :mod:`autoseg.training.modality_dropout`);
10. mirroring along each of ``params.mirror_axes`` with p 0.5 (off in the ``none`` preset);
11. image set to 0 where seg < 0 in the ``mask_channels`` (channels normalised inside a mask);
12. seg -1 -> 0; cascade only: the previous stage's prediction (seg channel 1) becomes one-hot image
    channels, damaged by random morphology (p 0.4) and connected-component removal (p 0.2);
13. regions (optional): label map -> one binary channel per region, plus a last ignore channel
    (1 where ``seg == ignore_label``) when an ignore label is set (the convention of
    :mod:`autoseg.training.losses`);
14. deep supervision (optional): the target is resampled by nearest neighbour to every scale;
15. conversion to torch: ``{"data": float32 (B, C, *patch), "target": ...}`` where ``target`` is a list
    (one tensor per scale, highest first) when ``ds_scales`` is given, else one tensor. Label targets
    are int16 ``(B, 1, *sp)``; region targets float32 ``(B, R[+1], *sp)``.

:func:`validation_transforms` applies only steps 12-15 (cascade one-hot without damage). All
randomness comes from ``numpy.random`` (batchgenerators seeds it per worker), so a fixed numpy seed
reproduces a batch exactly; noise and blur are implemented here because batchgenerators' own versions
draw from Python's ``random`` module, which its workers do not seed.

Example:
    >>> params = augmentation_params((32, 32, 32))
    >>> pipeline = training_transforms(params, label_values=(0, 1), regions=None, ignore_label=None,
    ...                                ds_scales=None)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from batchgenerators.augmentations.utils import rotate_coords_3d
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform
from batchgenerators.transforms.utility_transforms import RemoveLabelTransform

from autoseg.errors import TrainingConfigError
from autoseg.training.augmentation_presets import AugmentationPreset, nnunet_cpu
from autoseg.training.modality_dropout import ModalityDropout, check_modality_dropout
from autoseg.training.transforms import (
    DownsampleTargets,
    FoldFirstAxis,
    GaussianBlur,
    GaussianNoise,
    MaskOutside,
    MoveCascadeToData,
    PerturbCascade,
    SegToTarget,
    ToTorch,
    UnfoldFirstAxis,
)

SCALE_RANGE = (0.7, 1.4)
_DEG = math.pi / 180.0


@dataclass(frozen=True)
class AugmentationParams:
    """Spatial augmentation settings for one configuration.

    Attributes:
        patch_size: Network patch.
        initial_patch_size: Patch the loader extracts (centred on the same point as the final patch) so
            that every rotation in range, combined with any scale up to the ``cover_scale`` chosen in
            :func:`augmentation_params`, samples only extracted voxels (no empty corners).
        rotation_x: Angle range (radians) about the first axis; the in-plane angle in 2D and dummy 2D.
        rotation_y: Angle range about the second axis ((0, 0) in 2D and dummy 2D).
        rotation_z: Angle range about the third axis ((0, 0) in 2D and dummy 2D).
        dummy_2d: 3D patch augmented slice-wise in 2D (very anisotropic patch).
        mirror_axes: Spatial axes mirrored in training and test-time augmentation.
        scale_range: Isotropic scale factor range.
    """

    patch_size: tuple[int, ...]
    initial_patch_size: tuple[int, ...]
    rotation_x: tuple[float, float]
    rotation_y: tuple[float, float]
    rotation_z: tuple[float, float]
    dummy_2d: bool
    mirror_axes: tuple[int, ...]
    scale_range: tuple[float, float] = SCALE_RANGE

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {"patch_size": list(self.patch_size), "initial_patch_size": list(self.initial_patch_size),
                "rotation_x": list(self.rotation_x), "rotation_y": list(self.rotation_y),
                "rotation_z": list(self.rotation_z), "dummy_2d": self.dummy_2d,
                "mirror_axes": list(self.mirror_axes), "scale_range": list(self.scale_range)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AugmentationParams:
        """Inverse of :meth:`to_json`."""
        def pair(v: Sequence[float]) -> tuple[float, float]:
            return (float(v[0]), float(v[1]))
        return cls(patch_size=tuple(int(v) for v in d["patch_size"]),
                   initial_patch_size=tuple(int(v) for v in d["initial_patch_size"]),
                   rotation_x=pair(d["rotation_x"]), rotation_y=pair(d["rotation_y"]),
                   rotation_z=pair(d["rotation_z"]), dummy_2d=bool(d["dummy_2d"]),
                   mirror_axes=tuple(int(v) for v in d["mirror_axes"]), scale_range=pair(d["scale_range"]))


def _rotated_extent_2d(a: float, b: float, max_angle: float) -> tuple[float, float]:
    """Exact bounding box of an ``a x b`` rectangle rotated by any angle in ``[-max_angle, max_angle]``."""
    def extent(u: float, v: float) -> float:
        theta = min(max_angle, math.atan2(v, u))  # u|cos| + v|sin| peaks at atan2(v, u)
        return u * math.cos(theta) + v * math.sin(theta)
    return extent(a, b), extent(b, a)


def _rotated_extent_3d(size: Sequence[float], rx: float, ry: float, rz: float) -> np.ndarray:
    """Bounding box of a box under every combination of angles (grid search, capped at the diagonal)."""
    half = np.asarray(size, dtype=float) / 2
    corners = np.array(list(itertools.product(*[(-h, h) for h in half]))).T  # (3, 8)

    def grid(r: float) -> np.ndarray:
        r = min(r, math.pi)
        extra = [a for a in (math.pi / 4, math.pi / 2, 3 * math.pi / 4) if a <= r]
        return np.unique(np.concatenate([np.linspace(-r, r, 13), extra, [-a for a in extra]]))

    best = np.zeros(3)
    for ax, ay, az in itertools.product(grid(rx), grid(ry), grid(rz)):
        best = np.maximum(best, np.abs(rotate_coords_3d(corners, ax, ay, az)).max(1))
    return np.minimum(2 * best, np.linalg.norm(size))


def _check_mirror_axes(mirror_axes: Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    """The mirrored axes, sorted (None = every spatial axis)."""
    if mirror_axes is None:
        return tuple(range(ndim))
    axes = tuple(mirror_axes) if isinstance(mirror_axes, Sequence) and not isinstance(mirror_axes, str) else None
    if axes is None or any(isinstance(a, bool) or not isinstance(a, numbers.Integral) or not 0 <= a < ndim
                           for a in axes) or len(set(axes)) != len(axes):
        raise TrainingConfigError(
            f"augmentation_params: mirror_axes={mirror_axes!r} is not valid; valid: distinct integers in "
            f"0..{ndim - 1} (the patch's spatial axes), e.g. {tuple(range(ndim))}, or () for no mirroring.")
    return tuple(sorted(int(a) for a in axes))


def augmentation_params(patch_size: Sequence[int], *, cover_scale: float = 1.0,
                        mirror_axes: Sequence[int] | None = None) -> AugmentationParams:
    """nnU-Net's rules for rotation, dummy-2D augmentation, mirroring and the initial patch.

    3D: dummy 2D when ``max(patch) / patch[0] > 3`` (then in-plane rotation +-180 degrees), else
    +-30 degrees about every axis. 2D: +-15 degrees if ``max / min > 1.5``, else +-180 degrees. All
    spatial axes are mirrored unless ``mirror_axes`` says otherwise. The initial patch is the bounding box
    of the patch under every rotation in range (exact for 2D, grid search over the angle ranges for 3D)
    times ``cover_scale``, rounded up.

    Why ``cover_scale`` defaults to 1.0: scale factors <= 1 (zoom in) sample inside the rotated patch,
    so only zoom-outs (> 1, at most 1.4, drawn for ~10 % of samples) can reach outside it, where they
    see constant padding exactly as at an image border. Covering them too (``cover_scale=1.4``) makes
    the extracted 3D patch 1.4**3 = 2.7x larger: for a 128^3 patch 303^3 instead of ~217^3 voxels per
    channel (nnU-Net extracts about 205^3), i.e. ~450 MB instead of ~160 MB per 4-channel sample.

    Args:
        patch_size: Network patch, 2 or 3 positive ints.
        cover_scale: Largest scale factor whose sampled region the initial patch must contain
            (1.0 .. max(SCALE_RANGE)).
        mirror_axes: Spatial axes mirrored in training (and recorded for test-time mirroring), e.g.
            ``(1, 2)`` for a left-right symmetric anatomy; ``()`` for none; None = every spatial axis.

    Returns:
        The :class:`AugmentationParams`.

    Raises:
        TrainingConfigError: the patch is not 2D or 3D or has a non-positive size, ``cover_scale``
            is outside 1.0 .. max(SCALE_RANGE), or ``mirror_axes`` holds a duplicate, a non-integer or an
            axis outside the patch.

    Example:
        >>> augmentation_params((20, 160, 160)).dummy_2d
        True
    """
    patch = tuple(int(p) for p in patch_size)
    if len(patch) not in (2, 3) or min(patch) < 1:
        raise TrainingConfigError(
            f"augmentation_params: patch_size={patch} must be 2 or 3 positive integers (2D or 3D patch).")
    if not 1.0 <= cover_scale <= max(SCALE_RANGE):
        raise TrainingConfigError(
            f"augmentation_params: cover_scale={cover_scale} must lie in [1.0, {max(SCALE_RANGE)}] "
            "(1.0 covers every rotation, the maximum also every zoom-out).")
    axes = _check_mirror_axes(mirror_axes, len(patch))
    scale_max = cover_scale
    zero = (0.0, 0.0)
    if len(patch) == 2:
        angle = (15 if max(patch) / min(patch) > 1.5 else 180) * _DEG
        ext = _rotated_extent_2d(patch[0], patch[1], angle)
        initial = tuple(math.ceil(e * scale_max - 1e-6) for e in ext)
        return AugmentationParams(patch, initial, (-angle, angle), zero, zero, False, axes)
    if max(patch) / patch[0] > 3:
        angle = 180 * _DEG
        ext = _rotated_extent_2d(patch[1], patch[2], angle)
        initial = (patch[0], *(math.ceil(e * scale_max - 1e-6) for e in ext))
        return AugmentationParams(patch, initial, (-angle, angle), zero, zero, True, axes)
    angle = 30 * _DEG
    ext3 = _rotated_extent_3d(patch, angle, angle, angle)
    initial = tuple(math.ceil(e * scale_max - 1e-6) for e in ext3)
    rng = (-angle, angle)
    return AugmentationParams(patch, initial, rng, rng, rng, False, axes)


def _check_labels(label_values: Sequence[int] | None, regions: Sequence[Sequence[int]] | None,
                  ignore_label: int | None, ds_scales: Sequence[Sequence[float]] | None, ndim: int | None
                  ) -> list[tuple[int, ...]] | None:
    regs = None if regions is None else [tuple(int(v) for v in (r if isinstance(r, Sequence) else (r,)))
                                         for r in regions]
    if regs is not None and label_values is not None:
        known = set(int(v) for v in label_values)
        for r in regs:
            if not set(r) <= known:
                raise TrainingConfigError(
                    f"augmentation: region {r} uses labels {sorted(set(r) - known)} that are not among "
                    f"label_values={sorted(known)}; fix the regions or the dataset labels.")
            if ignore_label is not None and ignore_label in r:
                raise TrainingConfigError(
                    f"augmentation: region {r} contains the ignore label {ignore_label}; the ignore label "
                    "cannot be part of a region.")
    if ds_scales is not None and ndim is not None:
        for s in ds_scales:
            if len(s) != ndim:
                raise TrainingConfigError(
                    f"augmentation: deep-supervision scale {tuple(s)} has {len(s)} entries but the patch "
                    f"is {ndim}D; give one factor per spatial axis.")
    return regs


def _label_steps(regions: list[tuple[int, ...]] | None, ignore_label: int | None,
                 ds_scales: Sequence[Sequence[float]] | None, cascade: list[AbstractTransform]
                 ) -> list[AbstractTransform]:
    steps: list[AbstractTransform] = [RemoveLabelTransform(-1, 0), *cascade, SegToTarget(regions, ignore_label)]
    if ds_scales is not None:
        steps.append(DownsampleTargets(ds_scales))
    steps.append(ToTorch())
    return steps


def _modality_dropout(p: float, n_image_channels: int | None) -> list[AbstractTransform]:
    """The dropout step for the pipeline (empty when ``p == 0``)."""
    if check_modality_dropout(p, n_image_channels) == 0:
        return []
    if n_image_channels is None:
        raise TrainingConfigError(f"training_transforms: modality_dropout={p} needs n_image_channels (the "
                                  "dataset's number of input channels, without cascade channels).")
    return [ModalityDropout(p, n_image_channels=n_image_channels)]


def _spatial_steps(params: AugmentationParams, preset: AugmentationPreset) -> list[AbstractTransform]:
    """Steps 1-3: (fold), rotation / scaling / elastic deformation and the centre crop, (unfold)."""
    patch = params.patch_size[1:] if params.dummy_2d else params.patch_size
    spatial = SpatialTransform(
        patch, patch_center_dist_from_border=None, do_elastic_deform=preset.elastic and preset.p_elastic > 0,
        alpha=(0.0, 900.0), sigma=(9.0, 13.0), do_rotation=preset.p_rotation > 0, angle_x=params.rotation_x,
        angle_y=params.rotation_y, angle_z=params.rotation_z, do_scale=preset.p_scaling > 0,
        scale=preset.scale_range or params.scale_range, border_mode_data="constant", border_cval_data=0,
        order_data=preset.order_data, border_mode_seg="constant", border_cval_seg=-1, order_seg=preset.order_seg,
        random_crop=False, p_el_per_sample=preset.p_elastic, p_scale_per_sample=preset.p_scaling,
        p_rot_per_sample=preset.p_rotation, independent_scale_for_each_axis=False)
    return [FoldFirstAxis(), spatial, UnfoldFirstAxis()] if params.dummy_2d else [spatial]


def _intensity_steps(params: AugmentationParams, p: AugmentationPreset) -> list[AbstractTransform]:
    """Steps 4-9: noise, blur, brightness, contrast, low resolution, inverted gamma, gamma (those with p > 0)."""
    low_res = SimulateLowResolutionTransform(zoom_range=p.low_res_zoom, per_channel=True, order_downsample=0,
                                             p_per_channel=p.p_low_res_per_channel, order_upsample=1,
                                             p_per_sample=p.p_low_res, ignore_axes=(0,) if params.dummy_2d else None)
    steps = [
        (p.p_noise, GaussianNoise(p.noise_std, p_per_sample=p.p_noise)),
        (p.p_blur, GaussianBlur(p.blur_sigma, p_per_sample=p.p_blur, p_per_channel=p.p_blur_per_channel,
                                skip_first_axis=params.dummy_2d)),
        (p.p_brightness, BrightnessMultiplicativeTransform(p.brightness_range, per_channel=True,
                                                           p_per_sample=p.p_brightness)),
        (p.p_contrast, ContrastAugmentationTransform(p.contrast_range, preserve_range=True, per_channel=True,
                                                     p_per_sample=p.p_contrast)),
        (p.p_low_res, low_res),
        (p.p_inverted_gamma, GammaTransform(p.gamma_range, invert_image=True, per_channel=True, retain_stats=True,
                                            p_per_sample=p.p_inverted_gamma)),
        (p.p_gamma, GammaTransform(p.gamma_range, invert_image=False, per_channel=True, retain_stats=True,
                                   p_per_sample=p.p_gamma)),
    ]
    return [step for prob, step in steps if prob > 0]


def _resolve_preset(preset: AugmentationPreset | None, elastic: bool | None, order_data: int | None,
                    order_seg: int | None) -> AugmentationPreset:
    """The preset (None = ``nnunet_cpu()``) with the given keyword arguments replacing its values (validated)."""
    given = {"elastic": elastic, "order_data": order_data, "order_seg": order_seg}
    return dataclasses.replace(preset or nnunet_cpu(), **{k: v for k, v in given.items() if v is not None})


def training_transforms(params: AugmentationParams, *, label_values: Sequence[int] | None,
                        regions: Sequence[Sequence[int]] | None, ignore_label: int | None,
                        ds_scales: Sequence[Sequence[float]] | None, mask_channels: Sequence[int] = (),
                        elastic: bool | None = None, order_data: int | None = None, order_seg: int | None = None,
                        cascade_labels: Sequence[int] = (), modality_dropout: float = 0.0,
                        n_image_channels: int | None = None, preset: AugmentationPreset | None = None) -> Compose:
    """The training augmentation pipeline (see the module docstring for the steps).

    Args:
        params: From :func:`augmentation_params`.
        label_values: Label values of the dataset (checked against ``regions``), or None.
        regions: Label values making up each region (e.g. ``[(1, 2, 3), (2, 3), (3,)]``) for region
            training, or None for label training.
        ignore_label: The ignore label, or None.
        ds_scales: Deep-supervision scales per output, highest first (e.g. ``[(1, 1, 1), (.5, .5, .5)]``),
            or None for a single target.
        mask_channels: Channels set to 0 outside the imaged region (``seg < 0``).
        elastic: Add elastic deformation (p 0.2 per sample); None = the preset's (off in ``nnunet_cpu``).
        order_data: Spline order for the image in the spatial transform (3 = nnU-Net v1; 1 is ~5x
            faster for rotated/scaled samples and is what nnU-Net's current torch pipeline uses); None = the
            preset's (3 in ``nnunet_cpu``).
        order_seg: 1 = per-label linear interpolation + argmax (smooth borders, ~13x slower than 0 with 5
            labels); 0 = nearest neighbour; neither creates in-between labels. None = the preset's (1 in nnunet_cpu).
        cascade_labels: Cascade (second stage) only: the previous stage's foreground labels. The loader
            then delivers ``seg`` with 2 channels (ground truth, previous prediction); the prediction
            becomes one one-hot image channel per label (appended after the image channels) and is
            perturbed (random morphology p 0.4, connected-component removal p 0.2).
        modality_dropout: probability per image channel per sample that the channel is blanked to 0 after
            the intensity augmentations (never all channels of a sample; cascade channels never). 0 = off.
        n_image_channels: the dataset's input channels; required when ``modality_dropout > 0``.
        preset: The augmentation's probabilities and ranges (:mod:`autoseg.training.augmentation_presets`);
            None = ``nnunet_cpu()``, nnU-Net's pipeline. ``elastic``, ``order_data`` and ``order_seg``, when
            given, replace the preset's values.

    Returns:
        A batchgenerators ``Compose`` called as ``pipeline(**batch)``.

    Raises:
        TrainingConfigError: regions, labels or scales are inconsistent, an order is not 0, 1 or 3, or
            ``modality_dropout`` is outside [0, 1), lacks ``n_image_channels`` or has fewer than 2 channels.
    """
    aug = _resolve_preset(preset, elastic, order_data, order_seg)
    dropout = _modality_dropout(modality_dropout, n_image_channels)
    regs = _check_labels(label_values, regions, ignore_label, ds_scales, len(params.patch_size))
    steps = _spatial_steps(params, aug) + _intensity_steps(params, aug) + dropout
    if aug.mirror and params.mirror_axes:
        steps.append(MirrorTransform(params.mirror_axes))
    if mask_channels:
        steps.append(MaskOutside(mask_channels))
    cascade: list[AbstractTransform] = []
    if cascade_labels:
        cascade = [MoveCascadeToData(cascade_labels), PerturbCascade(len(tuple(cascade_labels)))]
    steps += _label_steps(regs, ignore_label, ds_scales, cascade)
    return Compose(steps)


def validation_transforms(*, label_values: Sequence[int] | None = None,
                          regions: Sequence[Sequence[int]] | None = None, ignore_label: int | None = None,
                          ds_scales: Sequence[Sequence[float]] | None = None,
                          cascade_labels: Sequence[int] = ()) -> Compose:
    """The validation pipeline: seg -1 -> 0, (cascade one-hot), regions, deep-supervision targets, torch.

    Args:
        label_values: As for :func:`training_transforms`.
        regions: As for :func:`training_transforms`.
        ignore_label: As for :func:`training_transforms`.
        ds_scales: As for :func:`training_transforms`.
        cascade_labels: As for :func:`training_transforms` (one-hot only, no perturbation).

    Returns:
        A batchgenerators ``Compose``; the input batch must already have the final patch size.

    Raises:
        TrainingConfigError: regions or labels are inconsistent.
    """
    regs = _check_labels(label_values, regions, ignore_label, ds_scales, None)
    cascade: list[AbstractTransform] = [MoveCascadeToData(cascade_labels)] if cascade_labels else []
    return Compose(_label_steps(regs, ignore_label, ds_scales, cascade))
