"""Crop a case to the bounding box of its non-zero voxels, and put a cropped array back.

The mask is "any channel non-zero", holes filled. Label voxels that are background *and* outside the
mask become ``-1``: training treats them as "outside the imaged region" (masked normalisation, padding)
and maps them to background before the loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from autoseg.fingerprint.extract import nonzero_bbox

#: label value of voxels outside the non-zero region (and of padding)
OUTSIDE = -1


def crop_to_nonzero(images: np.ndarray, seg: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, tuple[tuple[int, int], ...]]:
    """Crop ``images`` (C, *spatial) and ``seg`` (spatial) to the non-zero bounding box.

    Args:
        images: the channels.
        seg: the label map, or None (inference: an all-background map is used).

    Returns:
        Cropped images (a view of ``images``), cropped label map (int16, ``-1`` where background lies outside
        the filled non-zero mask, which masked normalisation needs also at inference) and the bounding box as
        ``(start, stop)`` per axis.

    Example:
        >>> img = np.zeros((1, 4, 4)); img[0, 1:3, 1:3] = 1
        >>> crop_to_nonzero(img)[2]
        ((1, 3), (1, 3))
    """
    box = nonzero_bbox(images)
    bbox = tuple((s.start, s.stop) for s in box)
    cropped = images[(slice(None),) + box]  # a view: normalisation makes the one copy
    seg_c = np.zeros(cropped.shape[1:], np.int16) if seg is None else seg[box].astype(np.int16, copy=True)
    outside = cropped[0] == 0
    for c in range(1, cropped.shape[0]):
        outside &= cropped[c] == 0
    if outside.any():  # (a CT scan, air included, is non-zero everywhere: nothing to fill or mark)
        outside = ~ndimage.binary_fill_holes(~outside)
        outside &= seg_c == 0
        seg_c[outside] = OUTSIDE
    return cropped, seg_c, bbox


def uncrop(array: np.ndarray, bbox: Sequence[Sequence[int]], full_shape: Sequence[int], *,
           fill: float = 0) -> np.ndarray:
    """Place a cropped array (``(*lead, *cropped_spatial)``) back into an array of the original spatial size.

    Args:
        array: cropped array; leading axes (e.g. channels) are kept.
        bbox: ``(start, stop)`` per spatial axis, as returned by :func:`crop_to_nonzero`.
        full_shape: original spatial shape.
        fill: value outside the box.

    Returns:
        Array of shape ``(*lead, *full_shape)`` with the same dtype; ``array`` itself when the box is the whole
        image (nothing was cropped, so no copy is made).
    """
    lead = array.shape[: array.ndim - len(full_shape)]
    if tuple(array.shape[len(lead):]) == tuple(int(s) for s in full_shape):
        return array
    out = np.full(tuple(lead) + tuple(int(s) for s in full_shape), fill, dtype=array.dtype)
    box = tuple(slice(int(a), int(b)) for a, b in bbox)
    out[(Ellipsis,) + box] = array
    return out
