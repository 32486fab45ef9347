"""Resampling network output from the preprocessed grid back to the cropped original grid.

Orders 0 and 1 (nearest and linear, the defaults for logits) run in torch and act on each axis on their own,
so the export can resample a few slices of the first axis at a time (:func:`separable_orders`,
:func:`axis_taps`, :func:`channel_slab`); spline orders fall back to scipy one whole channel at a time
(:func:`resize_channel`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from autoseg.planner.plans import ConfigurationPlan
from autoseg.preprocessing.properties import CaseProperties
from autoseg.preprocessing.resample import case_resampling, resample_data


def _interp_mode(order: int, ndim: int) -> str:
    return "nearest-exact" if order == 0 else ("linear", "bilinear", "trilinear")[ndim - 1]


def resize_channel(x: np.ndarray, new_shape: Sequence[int], order: int, axis: int | None, order_z: int
                   ) -> np.ndarray:
    """One spatial float32 channel resized like :func:`resample_data` does it.

    Orders 0 and 1 run in torch (multi-threaded, releases the GIL so export overlaps prediction; linear
    matches scipy's pixel-edge aligned zoom to float precision); higher orders fall back to scipy.
    """
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(x.shape) == new_shape:
        return x
    if order > 1 or (axis is not None and order_z > 1):
        return resample_data(x[None], new_shape, order=order, separate_axis=axis, order_z=order_z)[0]
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    with torch.inference_mode():
        if axis is None:
            t = torch.nn.functional.interpolate(t, size=new_shape, mode=_interp_mode(order, x.ndim))
        else:
            in_plane = list(new_shape)
            in_plane[axis] = x.shape[axis]
            t = torch.nn.functional.interpolate(t, size=tuple(in_plane), mode=_interp_mode(order, x.ndim))
            t = torch.nn.functional.interpolate(t, size=new_shape, mode=_interp_mode(order_z, x.ndim))
    return t[0, 0].numpy()


#: voxels per slab of one channel in the streaming export (4 MB as float32)
SLAB_VOXELS = 1 << 20


def separable_orders(config: ConfigurationPlan, props: CaseProperties) -> tuple[int, ...] | None:
    """Per axis the interpolation order of the logits (0 or 1), or None when a spline order makes it not separable.

    Linear and nearest interpolation act on each axis on its own (trilinear is linear along z of bilinear
    in-plane), so the export can resample a few slices of the first axis at a time.
    """
    rs = config.resampling
    axis = case_resampling(rs, props.target_spacing_t, props.spacing_t)
    orders = [int(rs.order_probabilities)] * len(props.shape_after_crop_t)
    if axis is not None:
        orders[axis] = int(rs.order_z)
    return tuple(orders) if max(orders) <= 1 else None


def axis_taps(n_in: int, n_out: int, order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index along one axis: the two source indices and the weight of the second (0 for nearest),
    computed in float32 as torch's ``interpolate`` does (``align_corners=False``; ``nearest-exact``)."""
    scale = np.float32(n_in) / np.float32(n_out)
    centre = np.arange(n_out, dtype=np.float32) + np.float32(0.5)
    if order == 0:
        i0 = np.minimum(np.floor(centre * scale).astype(np.int64), n_in - 1)
        return i0, i0, np.zeros(n_out, np.float32)
    # torch fuses the multiply-add (one rounding): the same float32 source positions, not only close ones
    src = np.maximum((np.float64(scale) * centre - 0.5).astype(np.float32), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, np.minimum(i0 + 1, n_in - 1), lam


def _resize_plane(block: torch.Tensor, size: tuple[int, ...], orders: tuple[int, ...]) -> torch.Tensor:
    """Resize ``(rows, *plane)`` to ``(rows, *size)`` along the plane axes (orders 0/1, per axis)."""
    if tuple(block.shape[1:]) == size:
        return block
    if len(set(orders)) == 1:  # one call: the rows are the channels
        return torch.nn.functional.interpolate(block[None], size=size, mode=_interp_mode(orders[0], len(size)))[0]
    out = block
    for ax, (n_out, order) in enumerate(zip(size, orders, strict=True)):
        if out.shape[1 + ax] == n_out:
            continue
        moved = out.movedim(1 + ax, -1)
        lead = moved.shape[:-1]
        res = torch.nn.functional.interpolate(moved.reshape(1, -1, moved.shape[-1]), size=n_out,
                                              mode=_interp_mode(order, 1))
        out = res.reshape(*lead, n_out).movedim(-1, 1 + ax)
    return out


def channel_slab(channel: np.ndarray, taps: tuple[np.ndarray, np.ndarray, np.ndarray], rows: slice,
                 plane: tuple[int, ...], orders: tuple[int, ...]) -> np.ndarray:
    """Output rows ``rows`` (first axis) of one channel resampled to ``(len, *plane)``: the few input rows they
    need are resized in-plane, then combined along the first axis."""
    i0, i1, lam = (t[rows] for t in taps)
    lo, hi = int(i0.min()), int(i1.max()) + 1
    block = torch.from_numpy(np.ascontiguousarray(channel[lo:hi], dtype=np.float32))
    flat = _resize_plane(block, plane, orders[1:])
    if channel.shape[0] == len(taps[0]):  # first axis not resampled
        return flat[rows.start - lo:rows.stop - lo].numpy()
    first = flat[torch.from_numpy(i0 - lo)]
    if orders[0] == 0:
        return first.numpy()
    w1 = torch.from_numpy(lam).view(-1, *([1] * len(plane)))
    return (first * (1 - w1) + flat[torch.from_numpy(i1 - lo)] * w1).numpy()
