"""Per-channel intensity normalisation as planned (``ChannelNormalization`` records in the plans)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autoseg.errors import PlanningError
from autoseg.planner.normalization import ChannelNormalization


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
    if norm.scheme == "ct":
        np.clip(x, norm.clip_low, norm.clip_high, out=x)
        x -= norm.mean
        x /= max(norm.std, 1e-8)
    elif norm.scheme == "zscore":
        inside = mask if (norm.use_mask and mask is not None) else None
        vals = x[inside] if inside is not None else x
        mean = float(vals.mean(dtype=np.float64)) if vals.size else 0.0
        std = float(vals.std(dtype=np.float64)) if vals.size else 1.0
        x -= mean
        x /= max(std, 1e-8)
        if inside is not None:
            x[~inside] = 0
    elif norm.scheme == "rescale_to_0_1":
        lo, hi = float(x.min()), float(x.max())
        x -= lo
        x /= max(hi - lo, 1e-8)
    elif norm.scheme == "rgb_to_0_1":
        x /= 255.0
    elif norm.scheme != "none":
        raise PlanningError(f"normalisation scheme {norm.scheme!r} of channel {norm.channel!r} is unknown; "
                            "rerun `autoseg plan` to regenerate plans.json.")
    return x


def normalize(images: np.ndarray, norms: Sequence[ChannelNormalization], seg: np.ndarray | None) -> np.ndarray:
    """Normalise every channel of ``images`` (C, *spatial); ``seg`` (with ``-1`` outside) gives the mask.

    Raises:
        PlanningError: the image has a different number of channels than the plans.
    """
    if images.shape[0] != len(norms):
        raise PlanningError(f"the image has {images.shape[0]} channel(s) but the plans normalise {len(norms)} "
                            f"({', '.join(n.channel for n in norms)}); give one file per planned channel.")
    mask = seg >= 0 if seg is not None else None
    return np.stack([normalize_channel(images[c], n, mask) for c, n in enumerate(norms)])
