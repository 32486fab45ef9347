"""Online validation metrics: per-class true/false positives and false negatives, and pseudo Dice.

During training the validation patches of an epoch are scored by accumulating TP/FP/FN per foreground
class (label training: argmax; region training: sigmoid > 0.5, i.e. logit > 0) and computing
``2TP / (2TP + FP + FN)`` per class at the end ("pseudo Dice", nnU-Net 5.6). Background and ignored
voxels never count. Target conventions are those of :mod:`autoseg.training.losses`.

Example:
    >>> import torch
    >>> logits = torch.tensor([[[[0.0, 5.0]], [[5.0, 0.0]]]])  # (B=1, C=2, 1, 2)
    >>> target = torch.tensor([[[[1, 1]]]])
    >>> tp, fp, fn = tp_fp_fn(logits, target, regions=False, ignore_label=None)
    >>> tp.tolist(), fp.tolist(), fn.tolist()
    ([1], [0], [1])
    >>> pseudo_dice(tp, fp, fn).round(3).tolist()
    [0.667]
"""

from __future__ import annotations

import numpy as np
import torch

from autoseg.errors import TrainingConfigError


@torch.no_grad()
def tp_fp_fn(logits: torch.Tensor, target: torch.Tensor, *, regions: bool,
             ignore_label: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts of true positives, false positives and false negatives per foreground class or region.

    Args:
        logits: ``(B, C, *sp)`` network output (the highest-resolution one under deep supervision).
        target: label map ``(B, 1, *sp)`` (labels) or float masks ``(B, R, *sp)`` (regions; ``R + 1``
            channels with the last one = ignore mask, 1 where ignored, when ``ignore_label`` is set).
        regions: Region training (sigmoid outputs) instead of label training (softmax outputs).
        ignore_label: The ignore label, or None. Ignored voxels are excluded from all counts.

    Returns:
        ``(tp, fp, fn)``, int64 arrays of length ``C - 1`` (labels, background dropped) or ``R``
        (regions), summed over batch and space.

    Raises:
        TrainingConfigError: target shape inconsistent with logits and the ignore setting.
    """
    b, c = logits.shape[:2]
    spatial = tuple(logits.shape[2:])
    if regions:
        expected = c + (1 if ignore_label is not None else 0)
        if tuple(target.shape) != (b, expected, *spatial):
            raise TrainingConfigError(
                f"tp_fp_fn(regions=True): target shape {tuple(target.shape)} does not match logits "
                f"{tuple(logits.shape)}; expected {expected} channels (one per region, plus a last ignore "
                "channel when ignore_label is set).")
        gt = target[:, :c] > 0.5
        pred = logits > 0
        valid = None if ignore_label is None else (target[:, c:] < 0.5)
    else:
        if tuple(target.shape) != (b, 1, *spatial):
            raise TrainingConfigError(
                f"tp_fp_fn(regions=False): target shape {tuple(target.shape)} does not match logits "
                f"{tuple(logits.shape)}; pass a label map of shape (B, 1, *spatial).")
        labels = target.long()
        classes = torch.arange(1, c, device=logits.device).view(1, c - 1, *([1] * len(spatial)))
        pred = logits.argmax(1, keepdim=True) == classes
        gt = labels == classes
        valid = None if ignore_label is None else (labels != ignore_label)
    if valid is not None:
        pred = pred & valid
        gt = gt & valid
    axes = (0, *range(2, pred.ndim))
    tp = (pred & gt).sum(axes)
    fp = (pred & ~gt).sum(axes)
    fn = (~pred & gt).sum(axes)
    return (tp.cpu().numpy().astype(np.int64), fp.cpu().numpy().astype(np.int64),
            fn.cpu().numpy().astype(np.int64))


def pseudo_dice(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Per-class Dice ``2TP / (2TP + FP + FN)`` from accumulated counts.

    Args:
        tp: True positives per class.
        fp: False positives per class.
        fn: False negatives per class.

    Returns:
        float64 array; NaN where the class is absent from both prediction and target (denominator 0).
    """
    tp_f = np.asarray(tp, dtype=np.float64)
    denom = 2 * tp_f + np.asarray(fp, dtype=np.float64) + np.asarray(fn, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, 2 * tp_f / np.where(denom > 0, denom, 1.0), np.nan)
