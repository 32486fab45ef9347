"""Dice per class or region between a predicted and a reference label map (ignore label excluded).

Both empty gives NaN (nothing to find, nothing found: excluded from means); one empty gives 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def class_masks(seg: np.ndarray, classes: Sequence[int | Sequence[int]]) -> list[np.ndarray]:
    """Boolean mask per class: a label value, or a region given as a tuple of label values."""
    out = []
    for c in classes:
        vals = tuple(c) if isinstance(c, (tuple, list)) else (c,)
        out.append(np.isin(seg, vals))
    return out


def dice_scores(pred: np.ndarray, ref: np.ndarray, classes: Sequence[int | Sequence[int]], *,
                ignore_label: int | None = None) -> list[float]:
    """Dice of each class (label value or region) of ``pred`` against ``ref``.

    Example:
        >>> dice_scores(np.array([0, 1, 1]), np.array([0, 1, 0]), [1])
        [0.6666666666666666]
    """
    valid = ref != ignore_label if ignore_label is not None else np.ones(ref.shape, bool)
    scores = []
    for p, r in zip(class_masks(pred, classes), class_masks(ref, classes), strict=True):
        p, r = p & valid, r & valid
        denom = int(p.sum()) + int(r.sum())
        scores.append(float("nan") if denom == 0 else 2.0 * int((p & r).sum()) / denom)
    return scores
