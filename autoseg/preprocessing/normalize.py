"""Per-channel intensity normalisation as planned (``ChannelNormalization`` records in the plans)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from autoseg.errors import PlanningError
from autoseg.planner.normalization import ChannelNormalization

#: voxels handled per step where a full-size temporary would otherwise be made (z-score statistics, masking)
SLAB_VOXELS = 1 << 20


def _slabs(x: np.ndarray) -> list[slice]:
    """Slices of the first axis covering ``x`` in pieces of about :data:`SLAB_VOXELS` voxels."""
    step = max(1, SLAB_VOXELS // max(1, int(np.prod(x.shape[1:], dtype=np.int64))))
    return [slice(a, a + step) for a in range(0, x.shape[0], step)]


def _masked_mean_std(x: np.ndarray, inside: np.ndarray | None) -> tuple[float, float]:
    """Mean and standard deviation (float64, two passes) of ``x`` where ``inside``, slab by slab.

    ``np.std`` on the whole volume would make a float64 copy (8 bytes per voxel); this needs one slab.
    """
    def parts() -> Iterator[np.ndarray]:
        for s in _slabs(x):
            yield x[s] if inside is None else x[s][inside[s]]

    n = sum(p.size for p in parts())
    if n == 0:
        return 0.0, 1.0
    mean = sum(float(p.sum(dtype=np.float64)) for p in parts()) / n
    var = sum(float(np.square(p.astype(np.float64) - mean).sum()) for p in parts()) / n
    return mean, float(np.sqrt(var))


def _normalize_in_place(x: np.ndarray, norm: ChannelNormalization, mask: np.ndarray | None) -> None:
    """Apply ``norm`` to the float32 array ``x`` in place."""
    if norm.scheme == "ct":
        np.clip(x, norm.clip_low, norm.clip_high, out=x)
        x -= norm.mean
        x /= max(norm.std, 1e-8)
    elif norm.scheme == "zscore":
        inside = mask if (norm.use_mask and mask is not None) else None
        mean, std = _masked_mean_std(x, inside)
        x -= mean
        x /= max(std, 1e-8)
        if inside is not None:
            for s in _slabs(x):
                x[s][~inside[s]] = 0
    elif norm.scheme == "rescale_to_0_1":
        lo, hi = float(x.min()), float(x.max())
        x -= lo
        x /= max(hi - lo, 1e-8)
    elif norm.scheme == "rgb_to_0_1":
        x /= 255.0
    elif norm.scheme != "none":
        raise PlanningError(f"normalisation scheme {norm.scheme!r} of channel {norm.channel!r} is unknown; "
                            "rerun `autoseg plan` to regenerate plans.json.")


def normalize_channel(x: np.ndarray, norm: ChannelNormalization, mask: np.ndarray | None) -> np.ndarray:
    """Normalise one channel (float32 in, float32 out).

    Args:
        x: the channel's voxels.
        norm: the planned scheme and dataset statistics.
        mask: voxels inside the imaged region (``seg >= 0``), used when ``norm.use_mask``; None = all.

    Returns:
        The normalised channel (a new array).

    Raises:
        PlanningError: an unknown scheme (the plans were edited by hand).
    """
    x = x.astype(np.float32, copy=True)
    _normalize_in_place(x, norm, mask)
    return x


def channel_normalizer(images: np.ndarray, norms: Sequence[ChannelNormalization], seg: np.ndarray | None
                       ) -> Callable[[int, np.ndarray], None]:
    """``fill(c, dest)``, which writes channel ``c`` of ``images`` normalised into the float32 array ``dest``.

    For filling a buffer that is needed anyway (the resampling's padded input) instead of a normalised copy.
    ``seg`` (with ``-1`` outside) gives the mask; it is only made when a z-score channel uses it.

    Raises:
        PlanningError: the image has a different number of channels than the plans.
    """
    if images.shape[0] != len(norms):
        raise PlanningError(f"the image has {images.shape[0]} channel(s) but the plans normalise {len(norms)} "
                            f"({', '.join(n.channel for n in norms)}); give one file per planned channel.")
    needs_mask = seg is not None and any(n.scheme == "zscore" and n.use_mask for n in norms)
    mask = seg >= 0 if needs_mask else None

    def fill(c: int, dest: np.ndarray) -> None:
        dest[...] = images[c]
        _normalize_in_place(dest, norms[c], mask)

    return fill


def normalize(images: np.ndarray, norms: Sequence[ChannelNormalization], seg: np.ndarray | None) -> np.ndarray:
    """Normalise every channel of ``images`` (C, *spatial); ``seg`` (with ``-1`` outside) gives the mask.

    The result is one new float32 array, filled channel by channel (no per-channel copies to stack).

    Raises:
        PlanningError: the image has a different number of channels than the plans.
    """
    fill = channel_normalizer(images, norms, seg)
    out = np.empty(images.shape, np.float32)
    for c in range(images.shape[0]):
        fill(c, out[c])
    return out
