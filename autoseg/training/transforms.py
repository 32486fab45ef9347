"""The small batchgenerators transforms autoseg needs and batchgenerators 0.25 lacks (or that draw from an
unseeded random source): dummy-2D folding, noise, blur, masking, cascade inputs, regions, deep-supervision
targets, conversion to torch. All randomness comes from ``numpy.random`` (seeded per batch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from batchgenerators.transforms.abstract_transforms import AbstractTransform
from scipy.ndimage import binary_closing, binary_dilation, binary_erosion, binary_opening, gaussian_filter
from scipy.ndimage import label as cc_label

from autoseg.errors import TrainingConfigError


class FoldFirstAxis(AbstractTransform):
    """Dummy 2D: ``(B, C, X, Y, Z) -> (B, C*X, Y, Z)`` for data and seg; remembers C."""

    def __call__(self, **batch: Any) -> dict[str, Any]:
        for key in ("data", "seg"):
            arr = batch[key]
            batch[f"_fold_channels_{key}"] = arr.shape[1]
            batch[key] = arr.reshape(arr.shape[0], arr.shape[1] * arr.shape[2], *arr.shape[3:])
        return batch


class UnfoldFirstAxis(AbstractTransform):
    """Inverse of :class:`FoldFirstAxis` (after the 2D spatial transform)."""

    def __call__(self, **batch: Any) -> dict[str, Any]:
        for key in ("data", "seg"):
            arr = batch[key]
            c = batch.pop(f"_fold_channels_{key}")
            batch[key] = arr.reshape(arr.shape[0], c, arr.shape[1] // c, *arr.shape[2:])
        return batch


class GaussianNoise(AbstractTransform):
    """Adds N(0, sigma) noise, sigma ~ U(std_range) shared by the channels of a sample."""

    def __init__(self, std_range: tuple[float, float], p_per_sample: float) -> None:
        self.std_range = std_range
        self.p_per_sample = p_per_sample

    def __call__(self, **batch: Any) -> dict[str, Any]:
        data = batch["data"]
        for b in range(data.shape[0]):
            if np.random.uniform() < self.p_per_sample:
                std = np.random.uniform(*self.std_range)
                data[b] += np.random.normal(0.0, std, size=data[b].shape).astype(data.dtype)
        return batch


class GaussianBlur(AbstractTransform):
    """Blurs each channel with p ``p_per_channel``; sigma ~ U(sigma_range) drawn per channel and axis."""

    def __init__(self, sigma_range: tuple[float, float], p_per_sample: float, p_per_channel: float,
                 skip_first_axis: bool) -> None:
        self.sigma_range = sigma_range
        self.p_per_sample = p_per_sample
        self.p_per_channel = p_per_channel
        self.skip_first_axis = skip_first_axis

    def __call__(self, **batch: Any) -> dict[str, Any]:
        data = batch["data"]
        for b in range(data.shape[0]):
            if np.random.uniform() >= self.p_per_sample:
                continue
            for c in range(data.shape[1]):
                if np.random.uniform() < self.p_per_channel:
                    sigma = list(np.random.uniform(*self.sigma_range, size=data.ndim - 2))
                    if self.skip_first_axis:
                        sigma[0] = 0.0
                    data[b, c] = gaussian_filter(data[b, c], sigma, order=0, mode="nearest")
        return batch


class MaskOutside(AbstractTransform):
    """Sets the image to 0 where ``seg < 0`` (outside the imaged region) in the given channels."""

    def __init__(self, channels: Sequence[int]) -> None:
        self.channels = tuple(channels)

    def __call__(self, **batch: Any) -> dict[str, Any]:
        outside = batch["seg"][:, 0] < 0
        for c in self.channels:
            batch["data"][:, c][outside] = 0
        return batch


class MoveCascadeToData(AbstractTransform):
    """Cascade: seg channel 1 (previous-stage prediction) -> one-hot image channels; seg keeps channel 0."""

    def __init__(self, labels: Sequence[int]) -> None:
        self.labels = tuple(int(v) for v in labels)

    def __call__(self, **batch: Any) -> dict[str, Any]:
        seg = batch["seg"]
        if seg.shape[1] < 2:
            raise TrainingConfigError(
                f"cascade augmentation: seg has {seg.shape[1]} channel(s) but cascade_labels={self.labels} "
                "needs a second channel with the previous stage's prediction; pass cascade_labels=() "
                "for a configuration without a previous stage.")
        onehot = np.stack([seg[:, 1] == v for v in self.labels], 1).astype(np.float32)
        batch["data"] = np.concatenate([batch["data"], onehot], 1)
        batch["seg"] = seg[:, :1]
        return batch


def _ball(diameter: int, ndim: int) -> np.ndarray:
    r = (diameter - 1) / 2
    grid = np.indices((diameter,) * ndim) - r
    return (grid ** 2).sum(0) <= r ** 2 + 1e-6


class PerturbCascade(AbstractTransform):
    """Cascade training: damages the one-hot previous-stage channels like an imperfect first stage.

    Per sample, with p ``p_morph`` each label channel (p 0.5) gets a random dilation, erosion, opening or
    closing with a ball of diameter 1-8 (voxels it gains leave the other labels); then with p
    ``p_remove`` each label channel (p 0.5) loses one random connected component that covers at most
    15 % of the patch.
    """

    def __init__(self, n_labels: int, p_morph: float = 0.4, p_remove: float = 0.2) -> None:
        self.n_labels = n_labels
        self.p_morph = p_morph
        self.p_remove = p_remove

    def __call__(self, **batch: Any) -> dict[str, Any]:
        data = batch["data"]
        ops = (binary_dilation, binary_erosion, binary_opening, binary_closing)
        n_spatial = data.ndim - 2
        for b in range(data.shape[0]):
            channels = range(data.shape[1] - self.n_labels, data.shape[1])  # the appended one-hot channels
            if np.random.uniform() < self.p_morph:
                for c in channels:
                    if np.random.uniform() >= 0.5:
                        continue
                    op = ops[np.random.randint(len(ops))]
                    mask = data[b, c] > 0.5
                    new = op(mask, structure=_ball(np.random.randint(1, 9), n_spatial))
                    data[b, c] = new
                    gained = new & ~mask
                    for other in channels:
                        if other != c:
                            data[b, other][gained] = 0
            if np.random.uniform() < self.p_remove:
                for c in channels:
                    if np.random.uniform() >= 0.5:
                        continue
                    components, n = cc_label(data[b, c] > 0.5)
                    if n == 0:
                        continue
                    sizes = np.bincount(components.ravel())[1:]
                    small = np.flatnonzero(sizes <= 0.15 * components.size) + 1
                    if small.size:
                        data[b, c][components == np.random.choice(small)] = 0
        return batch


class SegToTarget(AbstractTransform):
    """Moves ``seg`` to ``target``: int16 labels, or float32 region masks (+ ignore channel)."""

    def __init__(self, regions: Sequence[Sequence[int]] | None, ignore_label: int | None) -> None:
        self.regions = None if regions is None else [tuple(r) for r in regions]
        self.ignore_label = ignore_label

    def __call__(self, **batch: Any) -> dict[str, Any]:
        seg = np.rint(batch.pop("seg")).astype(np.int16)
        if self.regions is None:
            batch["target"] = seg
            return batch
        channels = [np.isin(seg[:, 0], r) for r in self.regions]
        if self.ignore_label is not None:
            channels.append(seg[:, 0] == self.ignore_label)
        batch["target"] = np.stack(channels, 1).astype(np.float32)
        return batch


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output voxel for nearest-neighbour resampling (voxel centres aligned)."""
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


class DownsampleTargets(AbstractTransform):
    """Replaces ``target`` by a list: the target resampled (nearest) to each deep-supervision scale."""

    def __init__(self, ds_scales: Sequence[Sequence[float]]) -> None:
        self.ds_scales = [tuple(float(s) for s in scale) for scale in ds_scales]

    def __call__(self, **batch: Any) -> dict[str, Any]:
        target = batch["target"]
        spatial = target.shape[2:]
        out = []
        for scale in self.ds_scales:
            shape = [max(1, round(n * s)) for n, s in zip(spatial, scale, strict=True)]
            if tuple(shape) == tuple(spatial):
                out.append(target)
                continue
            index = np.ix_(*[_nearest_indices(n, m) for n, m in zip(spatial, shape, strict=True)])
            out.append(np.ascontiguousarray(target[(slice(None), slice(None), *index)]))
        batch["target"] = out
        return batch


class ToTorch(AbstractTransform):
    """Converts ``data`` (float32) and ``target`` (array or list of arrays) to torch tensors."""

    def __call__(self, **batch: Any) -> dict[str, Any]:
        batch["data"] = torch.from_numpy(np.ascontiguousarray(batch["data"], dtype=np.float32))
        target = batch["target"]
        if isinstance(target, list):
            batch["target"] = [torch.from_numpy(np.ascontiguousarray(t)) for t in target]
        else:
            batch["target"] = torch.from_numpy(np.ascontiguousarray(target))
        return batch
