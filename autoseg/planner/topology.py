"""Pooling and convolution layout for a patch (nnU-Net v2's ``get_pool_and_conv_props`` rules)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from autoseg.errors import PlanningError

MIN_FEATURE_MAP_SIZE = 4


@dataclass(frozen=True)
class PoolingLayout:
    """Strides, kernels and padded patch for one patch size and spacing.

    Attributes:
        pools_per_axis: number of stride-2 poolings per axis.
        strides: per stage, stride per axis (``strides[0]`` is all ones).
        kernel_sizes: per stage, conv kernel per axis (1 on an axis still much coarser than the finest).
        patch_size: the input patch padded up to a multiple of ``divisible_by``.
        divisible_by: ``2 ** pools_per_axis``.
    """

    pools_per_axis: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    patch_size: tuple[int, ...]
    divisible_by: tuple[int, ...]

    @property
    def n_stages(self) -> int:
        """Resolution levels = poolings + 1."""
        return len(self.strides)


def pad_to_multiple(shape: Sequence[float], divisor: Sequence[int]) -> tuple[int, ...]:
    """Round each size up to the next multiple of its divisor (a multiple stays as is).

    Args:
        shape: sizes (may be non-integer, e.g. a median).
        divisor: per-axis divisor.

    Returns:
        The padded integer shape.
    """
    return tuple(int(d * math.ceil(float(s) / d)) for s, d in zip(shape, divisor, strict=True))


def pooling_layout(spacing: Sequence[float], patch_size: Sequence[float], *,
                   min_feature_map_size: int = MIN_FEATURE_MAP_SIZE, max_pools: int = 999999) -> PoolingLayout:
    """Decide how often and along which axes to pool, and the conv kernel of every stage.

    Repeatedly: an axis may be pooled if its current size is at least ``2 x min_feature_map_size`` and its
    current spacing is below twice the finest current spacing among such axes; a lone poolable axis needs
    ``3 x min_feature_map_size``. Kernels start at 1 and become 3 (for good) once an axis' spacing is within
    a factor 2 of the finest current spacing. Pooled axes double their spacing and halve their size
    (rounding up). A 3-kernel bottleneck is appended and the patch is padded to ``2 ** pools``.

    Args:
        spacing: voxel spacing per axis (of the planned configuration, transposed).
        patch_size: the candidate patch.
        min_feature_map_size: smallest bottleneck edge (4).
        max_pools: cap on poolings per axis.

    Returns:
        The layout record.

    Raises:
        PlanningError: spacing and patch differ in length, or contain non-positive values.
    """
    if len(spacing) != len(patch_size):
        raise PlanningError(f"pooling_layout: spacing {tuple(spacing)} and patch_size {tuple(patch_size)} differ "
                            "in length; give one value per axis.")
    if any(s <= 0 for s in spacing) or any(p <= 0 for p in patch_size):
        raise PlanningError(f"pooling_layout: spacing {tuple(spacing)} and patch_size {tuple(patch_size)} must be "
                            "positive.")
    dim = len(spacing)
    cur_spacing = [float(s) for s in spacing]
    cur_size = [float(p) for p in patch_size]
    pools = [0] * dim
    kernel = [1] * dim
    strides: list[tuple[int, ...]] = [(1,) * dim]
    kernels: list[tuple[int, ...]] = []
    while True:
        big_enough = [i for i in range(dim) if cur_size[i] >= 2 * min_feature_map_size]
        if not big_enough:
            break
        finest = min(cur_spacing[i] for i in big_enough)
        axes = [i for i in big_enough if cur_spacing[i] / finest < 2 and pools[i] < max_pools]
        if not axes or (len(axes) == 1 and cur_size[axes[0]] < 3 * min_feature_map_size):
            break
        finest_all = min(cur_spacing)
        kernel = [3 if (k == 3 or cur_spacing[d] / finest_all < 2) else 1 for d, k in enumerate(kernel)]
        kernels.append(tuple(kernel))
        for i in axes:
            pools[i] += 1
            cur_spacing[i] *= 2
            cur_size[i] = math.ceil(cur_size[i] / 2)
        strides.append(tuple(2 if i in axes else 1 for i in range(dim)))
    kernels.append((3,) * dim)
    divisible = tuple(2 ** p for p in pools)
    return PoolingLayout(pools_per_axis=tuple(pools), strides=tuple(strides), kernel_sizes=tuple(kernels),
                         patch_size=pad_to_multiple(patch_size, divisible), divisible_by=divisible)
