"""Batched training augmentation in torch, on the device the batch trains on (augmentation ``nnunet``, the default).

The same steps, probabilities and ranges as :func:`autoseg.training.augmentation.training_transforms` (nnU-Net's
pipeline; the :class:`~autoseg.training.augmentation_presets.AugmentationPreset` gives them), computed for the
whole batch with torch operations on the batch's device (CPU or CUDA) instead of per sample with numpy in the
worker processes, which then only read and crop:

1. rotation and scaling as ONE ``grid_sample`` call for the batch's transformed samples (dummy 2D: one 2D call over all slices):
   the image with linear interpolation (``order_data`` 1, or 0 = nearest) and zero padding; the label map as one
   channel per label value, linearly interpolated in the same call and turned back into labels by argmax
   (``order_seg`` 1), or by nearest neighbour (``order_seg`` 0), so no new label value ever appears; outside the
   extracted patch the label is -1 (outside the image). Only the rotated or scaled samples are resampled; a
   sample that is neither is cropped at whole-voxel positions, i.e. copied exactly;
2. Gaussian noise, Gaussian blur as separable 1D convolutions (edge-replicating, the kernel of
   ``scipy.ndimage.gaussian_filter``), multiplicative brightness, contrast (range preserved), simulated low
   resolution (nearest down, linear up), inverted gamma and gamma (mean and std kept), modality dropout;
3. mirroring along the configuration's mirror axes, zero image outside the imaged region in the masked
   channels, label -1 -> 0, region channels (+ ignore channel), deep-supervision targets (nearest).

Elastic deformation and the cascade's previous-stage perturbations are not available here (they run on the CPU
workers, ``nnunet_cpu``'s pipeline).

Randomness: every per-sample parameter comes from a CPU ``torch.Generator`` seeded from ``(seed, batch index)``
and the noise from a generator on the batch's device seeded the same way, so batch ``k`` is a pure function of
``(seed, k)`` on a given device (exact resume holds) and independent of the number of worker processes.

Example:
    >>> from autoseg.training.augmentation import augmentation_params
    >>> from autoseg.training.augmentation_presets import nnunet
    >>> aug = BatchAugmenter(augmentation_params((16, 16, 16)), nnunet(), regions=None, ignore_label=None,
    ...                      ds_scales=None)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from autoseg.training.augmentation import AugmentationParams
from autoseg.training.augmentation_presets import AugmentationPreset

__all__ = ["BatchAugmenter", "batch_generator_seed", "gaussian_kernel", "rotation_matrix"]


def batch_generator_seed(seed: int, index: int) -> int:
    """The seed of batch ``index``'s augmentation generators (a pure function of ``(seed, index)``)."""
    return int(np.random.SeedSequence([int(seed), int(index), 2]).generate_state(1, dtype=np.uint64)[0] >> 1)


class _Draws:
    """Uniform draws from a seeded CPU generator (float64)."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def uniform(self, shape: int | tuple[int, ...], low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=self.g, dtype=torch.float64)

    def chance(self, shape: int | tuple[int, ...], p: float) -> torch.Tensor:
        return torch.rand(shape, generator=self.g, dtype=torch.float64) < p

    def two_sided(self, shape: int | tuple[int, ...], low: float, high: float) -> torch.Tensor:
        """batchgenerators' factor draw: with p 0.5 in ``[low, 1)`` (when ``low < 1``), else in ``[max(low, 1), high)``."""
        below = self.chance(shape, 0.5) & (low < 1)
        return torch.where(below, self.uniform(shape, low, 1.0), self.uniform(shape, max(low, 1.0), high))


def rotation_matrix(angles: Sequence[float]) -> torch.Tensor:
    """Rotation by ``angles`` (radians): one angle for 2D, the angles about axes 0, 1, 2 for 3D (applied in that order)."""
    if len(angles) == 1:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    out = torch.eye(3, dtype=torch.float64)
    for axis, a in enumerate(angles):
        c, s = math.cos(a), math.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = torch.eye(3, dtype=torch.float64)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    return out


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """The 1D kernel of ``scipy.ndimage.gaussian_filter`` (truncate 4), float64."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _std_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Population std and mean of each row of ``x`` (R, V), keeping the dimension (faster than ``torch.std_mean``
    on a CPU)."""
    mean = x.mean(1, keepdim=True)
    return torch.linalg.vector_norm(x - mean, dim=1, keepdim=True) / math.sqrt(x.shape[1]), mean


def _rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x`` viewed as (samples * channels, voxels)-rows ``rows`` (a copy)."""
    return x.reshape(x.shape[0] * x.shape[1], -1)[rows.to(x.device)]


def _put_rows(x: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    x.view(x.shape[0] * x.shape[1], -1)[rows.to(x.device)] = values


def _blur_axis(x: torch.Tensor, axis: int, kernels: torch.Tensor) -> torch.Tensor:
    """Rows ``x`` (R, *S) convolved along spatial ``axis`` with one kernel per row (R, K), edges replicated: a sum
    of K shifted copies (K <= 9 for nnU-Net's sigmas), cheaper on a CPU than a grouped convolution."""
    dim, pad = 1 + axis, kernels.shape[1] // 2
    length = x.shape[dim]
    index = torch.arange(-pad, length + pad, device=x.device).clamp(0, length - 1)
    padded = x.index_select(dim, index)
    weights = kernels.to(device=x.device, dtype=x.dtype).reshape(*kernels.shape, *[1] * (x.ndim - 1))
    out = padded.narrow(dim, 0, length) * weights[:, 0]
    for k in range(1, kernels.shape[1]):
        out.addcmul_(padded.narrow(dim, k, length), weights[:, k])
    return out


class BatchAugmenter:
    """Augments a batch ``{"data": (B, C, *initial patch) float, "seg": (B, 1, *initial patch) int, "seed",
    "batch_index", ...}`` on its device into ``{"data": (B, C, *patch) float32, "target": ..., ...}`` (the other
    keys pass through), the targets as in :mod:`autoseg.training.augmentation`.

    Args:
        params: The configuration's :class:`AugmentationParams`.
        preset: Probabilities and ranges (``elastic`` off, ``order_data`` 0 or 1: an ``on_device`` preset).
        regions, ignore_label, ds_scales, mask_channels: As for
            :func:`~autoseg.training.augmentation.training_transforms`.
        modality_dropout, n_image_channels: As there.
    """

    def __init__(self, params: AugmentationParams, preset: AugmentationPreset, *,
                 regions: Sequence[Sequence[int]] | None, ignore_label: int | None,
                 ds_scales: Sequence[Sequence[float]] | None, mask_channels: Sequence[int] = (),
                 modality_dropout: float = 0.0, n_image_channels: int | None = None) -> None:
        self.params, self.preset = params, preset
        self.regions = None if regions is None else [tuple(int(v) for v in r) for r in regions]
        self.ignore_label = ignore_label
        self.ds_scales = None if ds_scales is None else [tuple(float(s) for s in sc) for sc in ds_scales]
        self.mask_channels = tuple(mask_channels)
        self.dropout = float(modality_dropout)
        self.n_image_channels = n_image_channels

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        seed = batch_generator_seed(batch["seed"], batch["batch_index"])
        draws = _Draws(seed)
        data = batch["data"].float()
        seg = batch["seg"]
        data, seg = self.spatial(data, seg, draws)
        noise = torch.Generator(device=data.device).manual_seed(seed)
        data = self.intensity(data, draws, noise)
        data, seg = self.mirror(data, seg, draws)
        if self.mask_channels:
            outside = (seg[:, 0] < 0).unsqueeze(1)
            idx = list(self.mask_channels)
            data[:, idx] = data[:, idx].masked_fill(outside, 0.0)
        out = {k: v for k, v in batch.items() if k != "seg"}
        out["data"], out["target"] = data.contiguous(), self.targets(seg)
        return out

    # ---- step 1: rotation and scaling ---------------------------------------------------------------
    def _matrices(self, n: int, nd: int, draws: _Draws) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: the matrix mapping output offsets to input offsets, and whether it is the identity."""
        p, pr = self.params, self.preset
        rotate, scale = draws.chance(n, pr.p_rotation), draws.chance(n, pr.p_scaling)
        ranges = [p.rotation_x] if nd == 2 else [p.rotation_x, p.rotation_y, p.rotation_z]
        angles = torch.stack([draws.uniform(n, lo, hi) for lo, hi in ranges], 1)
        lo, hi = pr.scale_range or p.scale_range
        factors = draws.two_sided(n, lo, hi)
        mats = []
        for b in range(n):
            m = rotation_matrix(angles[b].tolist()) if rotate[b] else torch.eye(nd, dtype=torch.float64)
            mats.append(m * (float(factors[b]) if scale[b] else 1.0))
        return torch.stack(mats), ~(rotate | scale)

    def spatial(self, data: torch.Tensor, seg: torch.Tensor, draws: _Draws) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate and scale each sample and crop the centre to the patch (one ``grid_sample`` call)."""
        p = self.params
        n, c = data.shape[:2]
        dummy = p.dummy_2d
        mats, ident = self._matrices(n, 2 if dummy else len(p.patch_size), draws)
        crop = (slice(None), slice(None), *(slice((i - q) // 2, (i - q) // 2 + q)
                                            for i, q in zip(data.shape[2:], p.patch_size, strict=True)))
        out, out_seg = data[crop].clone(), seg[crop].clone()  # a sample neither rotated nor scaled: the crop, exactly
        moving = (~ident).nonzero()[:, 0]
        if moving.numel() == 0:
            return out, out_seg
        idx = moving.to(data.device)
        sub, sub_seg, mats = data[idx], seg[idx], mats[moving]
        if dummy:  # (k, C, X, Y, Z) -> (k * X, C, Y, Z), every slice of a sample with the sample's matrix
            x = sub.shape[2]
            sub = sub.transpose(1, 2).reshape(len(idx) * x, c, *sub.shape[3:])
            sub_seg = sub_seg.transpose(1, 2).reshape(len(idx) * x, seg.shape[1], *sub_seg.shape[3:])
            mats = mats.repeat_interleave(x, 0)
        patch = p.patch_size[1:] if dummy else p.patch_size
        sub, sub_seg = self._resample(sub, sub_seg, mats, patch)
        if dummy:
            sub = sub.reshape(len(idx), x, c, *patch).transpose(1, 2)
            sub_seg = sub_seg.reshape(len(idx), x, seg.shape[1], *patch).transpose(1, 2)
        out[idx], out_seg[idx] = sub, sub_seg
        return out, out_seg

    @staticmethod
    def _theta(mats: torch.Tensor, initial: Sequence[int], patch: Sequence[int]) -> torch.Tensor:
        """``affine_grid`` matrices (align_corners=True) that put the patch's centre at the whole-voxel offset
        ``(initial - patch) // 2`` of the input."""
        half_in = torch.tensor([max(i - 1, 1) / 2 for i in initial], dtype=torch.float64)
        half_out = torch.tensor([(q - 1) / 2 for q in patch], dtype=torch.float64)
        shift = torch.tensor([((i - q) // 2 - (i - q) / 2) for i, q in zip(initial, patch, strict=True)],
                             dtype=torch.float64) / half_in
        theta = mats * half_out[None, None, :] / half_in[None, :, None]
        theta = theta.flip(1).flip(2)  # grid_sample orders the axes last-first
        return torch.cat([theta, shift.flip(0)[None, :, None].expand(len(mats), -1, 1)], 2)

    def _resample(self, data: torch.Tensor, seg: torch.Tensor, mats: torch.Tensor, patch: Sequence[int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and labels at the patch through the per-sample matrices; labels never take new values."""
        initial = data.shape[2:]
        theta = self._theta(mats, initial, patch).to(device=data.device, dtype=torch.float32)
        grid = F.affine_grid(theta, [data.shape[0], 1, *patch], align_corners=True)
        linear_seg = self.preset.order_seg == 1
        counts = torch.bincount(seg.flatten().to(torch.int64) - seg.min().to(torch.int64))  # labels present
        values = [v for v in (counts.nonzero()[:, 0] + int(seg.min())).tolist() if v != -1]
        c = data.shape[1]
        stack = data
        if linear_seg:  # image and one channel per label value, written in place (one pass each)
            stack = data.new_empty((data.shape[0], c + seg.shape[1] * len(values), *initial))
            stack[:, :c] = data
            for k in range(seg.shape[1]):
                for j, v in enumerate(values):
                    stack[:, c + k * len(values) + j] = seg[:, k] == v
        mode = "bilinear" if self.preset.order_data == 1 else "nearest"
        moved = F.grid_sample(stack, grid, mode=mode, padding_mode="zeros", align_corners=True)
        out = moved[:, :data.shape[1]]
        if not linear_seg:
            lab = F.grid_sample((seg.to(data.dtype) + 1), grid, mode="nearest", padding_mode="zeros",
                                align_corners=True)
            return out, (lab.round() - 1).to(seg.dtype)
        labs = []
        for k in range(seg.shape[1]):  # argmax over (outside, label 1, label 2, ...), the first of equals winning
            onehot = moved[:, data.shape[1] + k * len(values): data.shape[1] + (k + 1) * len(values)]
            best = 1.0 - onehot.sum(1)
            lab = torch.full_like(best, -1, dtype=seg.dtype)
            for j, v in enumerate(values):
                higher = onehot[:, j] > best
                lab.masked_fill_(higher, v)
                best = torch.maximum(best, onehot[:, j])
            labs.append(lab)
        return out, torch.stack(labs, 1)

    # ---- step 2: intensities ------------------------------------------------------------------------
    def intensity(self, data: torch.Tensor, draws: _Draws, noise: torch.Generator) -> torch.Tensor:
        """Noise, blur, brightness, contrast, low resolution, inverted gamma, gamma, modality dropout."""
        pr = self.preset
        n, c = data.shape[:2]
        if pr.p_noise > 0:
            pick, std = draws.chance(n, pr.p_noise), draws.uniform(n, *pr.noise_std)
            for b in pick.nonzero()[:, 0].tolist():
                data[b] += torch.randn(data.shape[1:], generator=noise, device=data.device) * float(std[b])
        if pr.p_blur > 0:
            self._blur(data, draws)
        if pr.p_brightness > 0:
            pick, factor = draws.chance(n, pr.p_brightness), draws.uniform((n, c), *pr.brightness_range)
            factor = torch.where(pick[:, None], factor, torch.ones_like(factor)).to(data.dtype).to(data.device)
            data *= factor.reshape(n, c, *[1] * (data.ndim - 2))
        if pr.p_contrast > 0:
            self._contrast(data, draws)
        if pr.p_low_res > 0:
            self._low_res(data, draws)
        for p_gamma, invert in ((pr.p_inverted_gamma, True), (pr.p_gamma, False)):
            if p_gamma > 0:
                self._gamma(data, draws, p_gamma, invert)
        if self.dropout > 0 and self.n_image_channels:
            k = self.n_image_channels
            drop = draws.chance((n, k), self.dropout)
            keep = (torch.rand(n, generator=draws.g) * k).long().clamp(max=k - 1)
            drop[drop.all(1), keep[drop.all(1)]] = False
            data[:, :k][drop.to(data.device)] = 0.0
        return data

    @staticmethod
    def _sample_rows(pick: torch.Tensor, per_channel: torch.Tensor) -> torch.Tensor:
        """Flat (sample * channels + channel) indices of the channels picked in the picked samples."""
        return (pick[:, None] & per_channel).flatten().nonzero()[:, 0]

    def _blur(self, data: torch.Tensor, draws: _Draws) -> None:
        pr, n, c, nd = self.preset, data.shape[0], data.shape[1], data.ndim - 2
        pick, chan = draws.chance(n, pr.p_blur), draws.chance((n, c), pr.p_blur_per_channel)
        sigmas = draws.uniform((n * c, nd), *pr.blur_sigma)
        rows = self._sample_rows(pick, chan)
        if rows.numel() == 0:
            return
        x = _rows(data, rows).reshape(len(rows), *data.shape[2:])
        for axis in range(1 if self.params.dummy_2d else 0, nd):
            ks = [gaussian_kernel(float(s)) if s > 1e-15 else torch.ones(1, dtype=torch.float64)
                  for s in sigmas[rows, axis]]
            width = max(len(k) for k in ks)
            kernels = torch.stack([F.pad(k, ((width - len(k)) // 2, (width - len(k)) // 2)) for k in ks])
            x = _blur_axis(x, axis, kernels)
        _put_rows(data, rows, x.reshape(len(rows), -1))

    def _contrast(self, data: torch.Tensor, draws: _Draws) -> None:
        n, c = data.shape[:2]
        pick = draws.chance(n, self.preset.p_contrast)
        factor = draws.two_sided((n, c), *self.preset.contrast_range).flatten()
        rows = self._sample_rows(pick, torch.ones((n, c), dtype=torch.bool))
        if rows.numel() == 0:
            return
        x = _rows(data, rows)
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        mean = x.mean(1, keepdim=True)
        f = factor[rows].to(x.dtype).to(x.device)[:, None]
        _put_rows(data, rows, torch.minimum(torch.maximum((x - mean) * f + mean, lo), hi))

    def _low_res(self, data: torch.Tensor, draws: _Draws) -> None:
        pr, n, c = self.preset, data.shape[0], data.shape[1]
        pick, chan = draws.chance(n, pr.p_low_res), draws.chance((n, c), pr.p_low_res_per_channel)
        zoom = draws.uniform(n * c, *pr.low_res_zoom)
        shape = data.shape[2:]
        mode = "bilinear" if len(shape) == 2 else "trilinear"
        for row in self._sample_rows(pick, chan).tolist():
            size = [round(s * float(zoom[row])) for s in shape]
            if self.params.dummy_2d:
                size[0] = shape[0]
            size = [max(1, s) for s in size]
            x = data[row // c, row % c][None, None]
            small = F.interpolate(x, size=size, mode="nearest-exact")
            data[row // c, row % c] = F.interpolate(small, size=list(shape), mode=mode, align_corners=False)[0, 0]

    def _gamma(self, data: torch.Tensor, draws: _Draws, p: float, invert: bool) -> None:
        n, c = data.shape[:2]
        pick = draws.chance(n, p)
        gamma = draws.two_sided((n, c), *self.preset.gamma_range).flatten()
        rows = self._sample_rows(pick, torch.ones((n, c), dtype=torch.bool))
        if rows.numel() == 0:
            return
        x = -_rows(data, rows) if invert else _rows(data, rows)
        std, mean = _std_mean(x)
        lo = x.amin(1, keepdim=True)
        span = x.amax(1, keepdim=True) - lo + 1e-7
        g = gamma[rows].to(x.dtype).to(x.device)[:, None]
        x = x.sub_(lo).div_(span).pow_(g).mul_(span).add_(lo)
        new_std, new_mean = _std_mean(x)
        x = x.sub_(new_mean).div_(new_std + 1e-8).mul_(std).add_(mean)
        _put_rows(data, rows, -x if invert else x)

    # ---- step 3: mirroring and targets --------------------------------------------------------------
    def mirror(self, data: torch.Tensor, seg: torch.Tensor, draws: _Draws) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample mirrored along each mirror axis with p 0.5."""
        if not (self.preset.mirror and self.params.mirror_axes):
            return data, seg
        flips = draws.chance((data.shape[0], len(self.params.mirror_axes)), 0.5)
        for b in range(data.shape[0]):  # one flip per sample, over all its mirrored axes
            dims = [1 + axis for j, axis in enumerate(self.params.mirror_axes) if flips[b, j]]
            if dims:
                data[b] = data[b].flip(dims)
                seg[b] = seg[b].flip(dims)
        return data, seg

    def targets(self, seg: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Label -1 -> 0, then one target per scale (nearest), each int16 labels or float32 regions (+ ignore)."""
        seg = seg[:, :1].clamp(min=0).to(torch.int16)
        if self.ds_scales is None:
            return self._regions(seg)
        out = []
        for scale in self.ds_scales:
            t = seg
            for axis, s in enumerate(scale):
                n_in = seg.shape[2 + axis]
                n_out = max(1, round(n_in * s))
                if n_out != n_in:
                    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * n_in / n_out).floor().long()
                    t = t.index_select(2 + axis, src.clamp(max=n_in - 1).to(seg.device))
            out.append(self._regions(t.contiguous()))
        return out

    def _regions(self, seg: torch.Tensor) -> torch.Tensor:
        if self.regions is None:
            return seg
        chans = [functools.reduce(torch.logical_or, [seg[:, 0] == v for v in r]) for r in self.regions]
        if self.ignore_label is not None:
            chans.append(seg[:, 0] == self.ignore_label)
        return torch.stack(chans, 1).float()
