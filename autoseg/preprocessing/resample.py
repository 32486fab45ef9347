"""Resampling of images, label maps and probabilities between spacings.

Images use a cubic spline (``order_image``), label maps are resampled one label at a time as a mask
(``order_seg``, thresholded at 0.5) so no in-between label values appear, and probabilities use
``order_probabilities``. For anisotropic data the coarse axis is resampled separately (first in-plane with
the full order, then along that axis with ``order_z``, nearest by default), as nnU-Net does, so thick
slices are not blurred into each other. All arithmetic is float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from autoseg.planner.resampling import ResamplingPlan, separate_z_axis


def new_shape_for(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """``round(spacing / new_spacing * shape)`` per axis (at least 1).

    Example:
        >>> new_shape_for((10, 20), (2.0, 1.0), (1.0, 1.0))
        (20, 20)
    """
    return tuple(max(1, int(round(s * sp / nsp))) for s, sp, nsp in zip(shape, spacing, new_spacing, strict=True))


#: border added before spline prefiltering (scipy's own choice for mode "nearest")
_SPLINE_PAD = 12


def _zoom(x: np.ndarray, new_shape: Sequence[int], order: int, *, out: np.ndarray | None = None,
          dtype: np.dtype | type | None = None) -> np.ndarray:
    """Resize a spatial array to ``new_shape`` (pixel-edge aligned, edge values replicated).

    Orders above 1 compute scipy's zoom (grid_mode, mode "nearest") with float32 spline coefficients
    instead of scipy's float64 ones, filtered in place in the padded copy: the same values to float32
    precision with one temporary volume instead of three (a 512x512x300 channel needs 0.3 GB extra, not 1.2 GB).
    Orders 0 and 1 return ``dtype`` (default: the input's; interpolation runs in float64 either way, so a
    ``uint8`` 0/1 mask with ``dtype=float32`` gives what its float32 copy would).

    Args:
        out: write the result here (shape ``new_shape``) instead of a new array.
    """
    if tuple(x.shape) == tuple(new_shape):
        if out is None:
            return x if dtype is None else x.astype(dtype, copy=False)
        out[...] = x
        return out
    if order > 1:
        padded = np.pad(x.astype(np.float32, copy=False), _SPLINE_PAD, mode="edge")
        return _spline_resize_padded(padded, new_shape, order, out=out)
    factors = [n / o for n, o in zip(new_shape, x.shape, strict=True)]
    res = ndimage.zoom(x, factors, order=order, mode="nearest", grid_mode=True, prefilter=False,
                       output=np.dtype(dtype or x.dtype))
    if res.shape != tuple(new_shape):  # zoom rounds the output shape itself; pad/crop the rare off-by-one
        res = _fit(res, new_shape)
    if out is None:
        return res
    out[...] = res
    return out


def _spline_resize_padded(padded: np.ndarray, new_shape: Sequence[int], order: int, *,
                          out: np.ndarray | None = None) -> np.ndarray:
    """Spline-resize the array inside ``padded`` (float32, edge-padded by ``_SPLINE_PAD``; filtered in place)."""
    ndimage.spline_filter(padded, order, output=padded, mode="nearest")
    scale = np.array([(o - 2 * _SPLINE_PAD) / n for o, n in zip(padded.shape, new_shape, strict=True)])
    return ndimage.affine_transform(padded, scale, offset=0.5 * scale - 0.5 + _SPLINE_PAD,
                                    output_shape=tuple(int(n) for n in new_shape), order=order,
                                    mode="nearest", prefilter=False, output=np.float32 if out is None else out)


def _edge_fill(padded: np.ndarray, pad: int) -> None:
    """Fill the ``pad``-wide border of ``padded`` with its interior's edge values (``np.pad`` mode "edge")."""
    for ax, n in enumerate(padded.shape):
        lead = (slice(None),) * ax
        padded[(*lead, slice(0, pad))] = padded[(*lead, slice(pad, pad + 1))]
        padded[(*lead, slice(n - pad, n))] = padded[(*lead, slice(n - pad - 1, n - pad))]


def _input_range(interior: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Minimum and maximum of a channel, per slice along ``axis`` (shaped to broadcast over the slices)."""
    if axis is None:
        return interior.min(), interior.max()
    others = tuple(a for a in range(interior.ndim) if a != axis)
    return interior.min(axis=others, keepdims=True), interior.max(axis=others, keepdims=True)


def resample_filled(shape: Sequence[int], n_channels: int, fill: Callable[[int, np.ndarray], None],
                    new_shape: Sequence[int], *, order: int, separate_axis: int | None = None,
                    order_z: int = 0, clip: bool = False) -> np.ndarray:
    """:func:`resample_data` of channels that ``fill(c, dest)`` writes into a float32 array of ``shape``.

    With a spline order each channel is written straight into the padded buffer the spline prefilter works
    in, so no full copy of the input channels is held besides it (preprocessing normalises into it).
    ``clip`` limits the spline's output to the channel's input range (per slice along ``separate_axis`` when
    that axis is resampled separately), as nnU-Net's resampling does (imported models).

    Returns:
        float32 array ``(n_channels, *new_shape)``.
    """
    shape, new_shape = tuple(int(s) for s in shape), tuple(int(s) for s in new_shape)
    out = np.empty((n_channels, *new_shape), np.float32)
    if shape == new_shape:
        for c in range(n_channels):
            fill(c, out[c])
        return out
    first = list(new_shape)
    if separate_axis is not None:
        first[separate_axis] = shape[separate_axis]
    for c in range(n_channels):
        if order > 1 and tuple(first) != shape:
            padded = np.empty(tuple(s + 2 * _SPLINE_PAD for s in shape), np.float32)
            interior = padded[(slice(_SPLINE_PAD, -_SPLINE_PAD),) * len(shape)]
            fill(c, interior)
            low, high = _input_range(interior, separate_axis) if clip else (None, None)
            _edge_fill(padded, _SPLINE_PAD)
            if separate_axis is None:
                _spline_resize_padded(padded, new_shape, order, out=out[c])
                if clip:
                    np.clip(out[c], low, high, out=out[c])
            else:
                plane = _spline_resize_padded(padded, first, order)
                if clip:
                    np.clip(plane, low, high, out=plane)
                _zoom(plane, new_shape, order_z, out=out[c])
            del padded
        else:
            channel = np.empty(shape, np.float32)
            fill(c, channel)
            _resize(channel, new_shape, order, separate_axis, order_z, out=out[c])
    return out


def _fit(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    pads = [(0, max(0, t - s)) for s, t in zip(x.shape, shape, strict=True)]
    x = np.pad(x, pads, mode="edge")
    return np.ascontiguousarray(x[tuple(slice(0, t) for t in shape)])


def _resize(x: np.ndarray, new_shape: Sequence[int], order: int, axis: int | None, order_z: int, *,
            out: np.ndarray | None = None, dtype: np.dtype | type | None = None) -> np.ndarray:
    """Resize one spatial array, optionally resampling ``axis`` separately with ``order_z``."""
    if axis is None:
        return _zoom(x, new_shape, order, out=out, dtype=dtype)
    in_plane = list(new_shape)
    in_plane[axis] = x.shape[axis]
    return _zoom(_zoom(x, in_plane, order, dtype=dtype), new_shape, order_z, out=out)


def resample_data(data: np.ndarray, new_shape: Sequence[int], *, order: int, separate_axis: int | None = None,
                  order_z: int = 0) -> np.ndarray:
    """Resample every channel of ``data`` (C, *spatial) to ``new_shape``.

    Each channel is written straight into the one output array (no per-channel results to stack).

    Args:
        data: images or probabilities (any float type; computed and returned as float32).
        new_shape: spatial shape wanted.
        order: spline order (3 images, 1 probabilities).
        separate_axis: resample this axis separately with ``order_z`` (anisotropic data), or None.
        order_z: order along ``separate_axis``.

    Returns:
        float32 array ``(C, *new_shape)``.
    """
    data = data.astype(np.float32, copy=False)
    if tuple(data.shape[1:]) == tuple(new_shape):
        return data
    out = np.empty((data.shape[0], *(int(s) for s in new_shape)), np.float32)
    for c in range(data.shape[0]):
        _resize(data[c], new_shape, order, separate_axis, order_z, out=out[c])
    return out


def present_values(array: np.ndarray) -> tuple[int, ...]:
    """The distinct values of an integer array, sorted, found slab by slab (``np.unique`` sorts a full copy)."""
    if array.ndim == 0 or array.size == 0:
        return tuple(int(v) for v in np.unique(array))
    step = max(1, (1 << 20) // max(1, int(np.prod(array.shape[1:], dtype=np.int64))))
    found: set[int] = set()
    for a in range(0, array.shape[0], step):
        found.update(int(v) for v in np.unique(array[a:a + step]))
    return tuple(sorted(found))


def resample_seg(seg: np.ndarray, new_shape: Sequence[int], *, order: int = 1, separate_axis: int | None = None,
                 order_z: int = 0) -> np.ndarray:
    """Resample a label map (spatial, any integer type, ``-1`` allowed) without creating new label values.

    Each label is resampled as a float mask and kept where the mask is >= 0.5; later labels win where masks
    overlap, voxels claimed by no label become 0 (background). The mask is handed to the interpolation as
    ``uint8`` (interpolated in float64 like a float32 copy would be), so only the float32 result is full-size.

    Returns:
        Label map of ``new_shape`` with the input dtype.
    """
    if tuple(seg.shape) == tuple(new_shape):
        return seg
    if order == 0 and (separate_axis is None or order_z == 0):
        return _zoom(seg, new_shape, 0).astype(seg.dtype, copy=False)
    out = np.zeros(tuple(new_shape), dtype=seg.dtype)
    for v in present_values(seg):
        if v == 0:
            continue
        mask = _resize((seg == v).view(np.uint8), new_shape, order, separate_axis, order_z, dtype=np.float32)
        out[mask >= 0.5] = v
        del mask
    return out


def case_resampling(plan: ResamplingPlan, spacing: Sequence[float], target: Sequence[float]) -> int | None:
    """The axis to resample separately for a case going from ``spacing`` to ``target`` (or None)."""
    return separate_z_axis(spacing, target, threshold=plan.separate_z_threshold, force=plan.force_separate_z)
