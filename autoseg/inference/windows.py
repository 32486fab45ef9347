"""Where the sliding window's windows lie and how their voxels are weighted.

A window is placed at every combination of per-axis starts (:func:`window_starts`); the voxels of one window are
weighted by a Gaussian centred on the patch (:func:`gaussian_importance_map`), largest where the network sees the
most context. The Gaussian is the outer product of one profile per axis, so the summed weight of all windows at a
voxel is the product of per-axis sums (:func:`axis_window_sums`): nothing needs a full-size weight volume.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch

from autoseg.errors import InferenceError

#: sigma of the importance map as a fraction of the patch size (nnU-Net: 1/8)
DEFAULT_SIGMA_SCALE = 1.0 / 8.0

Tile = tuple[int | slice, ...]  # index into the spatial axes: an int per sliced axis, then one slice per patch axis


def gaussian_importance_map(patch_size: Sequence[int], *, sigma_scale: float = DEFAULT_SIGMA_SCALE,
                            device: str | torch.device | None = None) -> torch.Tensor:
    """Weights of the voxels of one window: a Gaussian centred on the patch, peak 1.

    Sigma is ``patch_size * sigma_scale`` per axis. The map is symmetric (centred at ``(size - 1) / 2``), and
    any zero (underflow far from the centre) is replaced by the smallest non-zero value so that every voxel
    gets some weight.

    Args:
        patch_size: window size per spatial axis.
        sigma_scale: sigma as a fraction of the patch size.
        device: where to put the map (default CPU).

    Returns:
        float32 tensor of shape ``patch_size`` with maximum 1 and no zeros.

    Raises:
        InferenceError: a non-positive patch size or sigma scale.

    Example:
        >>> g = gaussian_importance_map((5, 5))
        >>> float(g.max()), tuple(g.shape)
        (1.0, (5, 5))
    """
    sizes = [int(p) for p in patch_size]
    if not sizes or min(sizes) < 1 or not sigma_scale > 0:
        raise InferenceError(f"gaussian_importance_map: patch_size={tuple(patch_size)} and "
                             f"sigma_scale={sigma_scale} must be positive. Pass the plan's patch size.")
    profiles = []
    for p in sizes:
        sigma = p * sigma_scale
        x = np.arange(p, dtype=np.float64) - (p - 1) / 2.0
        profiles.append(np.exp(-0.5 * (x / sigma) ** 2))
    g = profiles[0]
    for prof in profiles[1:]:
        g = np.multiply.outer(g, prof)
    g = (g / g.max()).astype(np.float32)
    if (g == 0).any():
        g[g == 0] = g[g > 0].min()
    return torch.from_numpy(np.ascontiguousarray(g)).to(device if device is not None else "cpu")


def nnunet_importance_map(patch_size: Sequence[int], *, device: str | torch.device | None = None) -> torch.Tensor:
    """nnU-Net v2's importance map, value for value (imported models): a unit impulse at ``p // 2`` per axis
    smoothed by scipy's ``gaussian_filter`` (sigma ``p / 8``, zero outside), scaled to peak 10, rounded to
    float16 (as nnU-Net stores it), zeros replaced by the smallest non-zero value; returned as float32.

    Example:
        >>> float(nnunet_importance_map((8, 8)).max())
        10.0
    """
    from scipy.ndimage import gaussian_filter

    sizes = tuple(int(p) for p in patch_size)
    impulse = np.zeros(sizes)
    impulse[tuple(p // 2 for p in sizes)] = 1.0
    g = gaussian_filter(impulse, [p * DEFAULT_SIGMA_SCALE for p in sizes], 0, mode="constant", cval=0.0)
    g = (g / (g.max() / 10.0)).astype(np.float16)
    if (g == 0).any():
        g[g == 0] = g[g > 0].min()
    return torch.from_numpy(g.astype(np.float32)).to(device if device is not None else "cpu")


def window_starts(image_shape: Sequence[int], patch_size: Sequence[int], step_size: float, *,
                  rules: str = "autoseg") -> list[list[int]]:
    """Start indices of the windows along each axis.

    Along an axis of size ``s`` and patch ``p`` (``s >= p``), the starts run evenly from 0 to ``s - p``
    (rounded), as few as possible with consecutive starts at most ``floor(p * step_size)`` apart, so
    neighbouring windows overlap by at least ``(1 - step_size) * p`` and the last one ends at the border.
    This is nnU-Net's rule, ``ceil((s - p) / (p * step)) + 1`` windows, with the step rounded down to whole
    voxels. An axis not larger than the patch gets the single start 0 (the caller pads it). With
    ``rules="nnunet"`` (imported models) the count uses the unrounded step and the starts are rounded half to
    even, exactly as nnU-Net v2 places them.

    Args:
        image_shape: spatial size of the image.
        patch_size: window size, same number of axes.
        step_size: largest distance between windows as a fraction of the patch, in (0, 1].

    Returns:
        One list of starts per axis.

    Raises:
        InferenceError: mismatched axes, a non-positive size, or a step outside (0, 1].

    Example:
        >>> window_starts((160, 64), (64, 64), 0.5)
        [[0, 32, 64, 96], [0]]
    """
    if len(image_shape) != len(patch_size):
        raise InferenceError(f"window_starts: image shape {tuple(image_shape)} and patch size {tuple(patch_size)} "
                             "have different numbers of axes. Pass the spatial shape only (no channel axis).")
    if not 0 < step_size <= 1:
        raise InferenceError(f"step_size={step_size}: must be in (0, 1] (a fraction of the patch; 0.5 is the "
                             "default, 1 means no overlap).")
    starts = []
    for s, p in zip((int(v) for v in image_shape), (int(v) for v in patch_size), strict=True):
        if p < 1 or s < 1:
            raise InferenceError(f"window_starts: sizes must be positive, got image {tuple(image_shape)} and "
                                 f"patch {tuple(patch_size)}.")
        if s <= p:
            starts.append([0])
            continue
        if rules == "nnunet":
            n = math.ceil((s - p) / (p * step_size)) + 1
            starts.append([int(np.round((s - p) / (n - 1) * i)) for i in range(n)])
            continue
        max_step = max(1, math.floor(p * step_size + 1e-9))
        n = -(-(s - p) // max_step) + 1  # ceil division, in integers
        starts.append([(i * (s - p) + (n - 1) // 2) // (n - 1) for i in range(n)])
    return starts


def window_tiles(spatial: Sequence[int], patch: Sequence[int], step_size: float, n_sliced: int, rules: str) -> list[Tile]:
    """Every window of the (padded) image; ``n_sliced`` leading axes are iterated one index at a time."""
    per_axis = window_starts(spatial[n_sliced:], patch, step_size, rules=rules)
    tiles: list[Tile] = []
    for lead in itertools.product(*(range(s) for s in spatial[:n_sliced])):
        for starts in itertools.product(*per_axis):
            tiles.append((*lead, *(slice(a, a + p) for a, p in zip(starts, patch, strict=True))))
    return tiles


def window_profiles(patch: tuple[int, ...], use_gaussian: bool) -> list[np.ndarray] | None:
    """Per patch axis the 1D factor of the window weight (float64), or None when the map is not their product.

    The Gaussian importance map is the outer product of one profile per axis scaled to peak 1 (a uniform map
    too), so the summed weight of all windows at a voxel is the product of per-axis sums: the sliding window
    divides by that instead of accumulating a full-size weight volume. Only when the map had zeros replaced
    (far too small a sigma) is it not a product, and the weights are accumulated voxel by voxel.
    """
    if not use_gaussian:
        return [np.ones(p) for p in patch]
    profiles = []
    for p in patch:
        x = np.arange(p, dtype=np.float64) - (p - 1) / 2.0
        prof = np.exp(-0.5 * (x / (p * DEFAULT_SIGMA_SCALE)) ** 2)
        profiles.append(prof / prof.max())
    if math.prod(float(prof.min()) for prof in profiles) < 1e-30:
        return None
    return profiles


def axis_window_sums(profiles: list[np.ndarray], starts: list[list[int]], sizes: Sequence[int]) -> list[np.ndarray]:
    """Per patch axis the summed profiles of all windows (float64, one value per voxel of the axis); the summed
    window weight at a voxel is the product of its axes' values."""
    sums = []
    for prof, axis_starts, size in zip(profiles, starts, sizes, strict=True):
        total = np.zeros(int(size))
        for a in axis_starts:
            total[a:a + prof.size] += prof
        sums.append(total)
    return sums


def window_sums_at(sums: list[np.ndarray], tile: Sequence[slice]) -> torch.Tensor:
    """The summed window weights over one window (``tile``: a slice per patch axis), float32 of the patch's shape."""
    block = np.ones(())
    for axis_sums, sl in zip(sums, tile, strict=True):
        block = np.multiply.outer(block, axis_sums[sl])
    return torch.from_numpy(block.astype(np.float32))


def divide_by_window_sums(logits: torch.Tensor, profiles: list[np.ndarray], starts: list[list[int]],
                          n_sliced: int, slab: int = 8) -> None:
    """``logits /= `` the summed window weights (the product of per-axis sums), in slabs of the first patch axis
    so that no full-size weight volume is made."""
    sums = axis_window_sums(profiles, starts, logits.shape[1 + n_sliced:])
    rest = sums[1:]
    tail = np.ones(()) if not rest else rest[0]
    for extra in rest[1:]:
        tail = np.multiply.outer(tail, extra)
    first = sums[0]
    lead = (slice(None),) * (1 + n_sliced)
    for a in range(0, first.size, slab):
        block = np.multiply.outer(first[a:a + slab], tail).astype(np.float32)
        logits[(*lead, slice(a, a + slab))] /= torch.from_numpy(block).to(logits.device)
