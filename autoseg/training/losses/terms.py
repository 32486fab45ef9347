"""Loss terms: soft Dice and Tversky overlap statistics, per-voxel cross-entropy with an ignore mask, and the
checks shared by every loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from autoseg.errors import TrainingConfigError
from autoseg.registry import check_number


def spatial_axes(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, t.ndim))


def check_param(loss: str, param: str, value: object, ok: Callable[[float], bool], valid: str) -> float:
    """``value`` as a float when it is a finite real number that passes ``ok``; else a TrainingConfigError
    naming the loss, the parameter, the value and the valid range ``valid``."""
    return check_number("loss", loss, param, value, ok, valid)


def label_target(target: torch.Tensor, ignore_label: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Label mode: the integer label map with ignored voxels set to 0, and the ``(B, 1, *sp)`` bool mask of
    the voxels that count (None without an ignore label)."""
    labels = target.long()
    if ignore_label is None:
        return labels, None
    valid = labels != ignore_label
    return torch.where(valid, labels, torch.zeros_like(labels)), valid


def region_target(logits: torch.Tensor, target: torch.Tensor, *, use_ignore: bool, who: str
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Region mode: the float region masks ``(B, R, *sp)`` and the float ``(B, 1, *sp)`` mask of the voxels
    that count (1 - the last target channel; None without ``use_ignore``)."""
    expected = logits.shape[1] + (1 if use_ignore else 0)
    if target.ndim != logits.ndim or target.shape[1] != expected:
        raise TrainingConfigError(
            f"{who}: target shape {tuple(target.shape)} does not fit logits {tuple(logits.shape)} "
            f"with use_ignore={use_ignore}; expected {expected} target channels "
            "(one per region, plus a last ignore-mask channel when use_ignore=True).")
    target = target.float()
    if not use_ignore:
        return target, None
    return target[:, :-1], 1.0 - target[:, -1:]


def voxel_xent(logits: torch.Tensor, gt: torch.Tensor, loss_mask: torch.Tensor | None, *, regions: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unreduced cross-entropy per voxel ``(B, *sp)`` (labels; ``gt`` from :func:`label_target`) or BCE per
    voxel and region ``(B, R, *sp)`` (regions), and a float weight of the same shape, 1 where the entry
    counts and 0 where it is ignored (None when nothing is ignored)."""
    if regions:
        xent = F.binary_cross_entropy_with_logits(logits.float(), gt, reduction="none")
    else:
        xent = F.cross_entropy(logits.float(), gt[:, 0], reduction="none")
        loss_mask = None if loss_mask is None else loss_mask[:, 0]
    if loss_mask is None:
        return xent, None
    return xent, loss_mask.to(xent.dtype).expand_as(xent)


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over the counted entries; 0 (with zero gradients) when none counts."""
    if weight is None:
        return values.mean()
    return (values * weight).sum() / weight.sum().clamp(min=1.0)


class SoftDiceLoss(nn.Module):
    """Soft Dice loss that never builds a float one-hot copy of a label target.

    For softmax outputs the per-class intersection and ground-truth volume are accumulated with
    ``scatter_add`` indexed by the label map, so memory stays at one probability tensor.

    Args:
        apply_nonlin: ``"softmax"`` (target = integer label map ``(B, 1, *sp)``) or ``"sigmoid"``
            (target = float masks ``(B, C, *sp)``).
        batch_dice: Sum intersections and volumes over the batch before the ratio (one Dice per class)
            instead of one Dice per sample and class.
        do_bg: Include channel 0 in the mean. Use False for softmax label training.
        smooth: Added to numerator and denominator.

    Raises:
        TrainingConfigError: ``apply_nonlin`` is neither "softmax" nor "sigmoid".
    """

    def __init__(self, *, apply_nonlin: Literal["softmax", "sigmoid"], batch_dice: bool, do_bg: bool,
                 smooth: float = 1e-5) -> None:
        super().__init__()
        if apply_nonlin not in ("softmax", "sigmoid"):
            raise TrainingConfigError(
                f"SoftDiceLoss: apply_nonlin={apply_nonlin!r} is not supported; use 'softmax' or 'sigmoid'.")
        self.apply_nonlin = apply_nonlin
        self.batch_dice = batch_dice
        self.do_bg = do_bg
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Dice loss in [-1, 0] (more negative is better).

        Args:
            logits: ``(B, C, *sp)`` raw network outputs.
            target: label map ``(B, 1, *sp)`` (softmax; every value must be in ``[0, C)`` where the mask
                is 1) or float masks ``(B, C, *sp)`` (sigmoid).
            loss_mask: optional ``(B, 1, *sp)``; 1 where the voxel counts, 0 where it is ignored.

        Returns:
            Scalar tensor.
        """
        return -self.overlap_index(*self.statistics(logits, target, loss_mask)).mean()

    def statistics(self, logits: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Soft intersection (true positives), predicted volume and true volume per class.

        Same arguments as :meth:`forward`. Channel 0 is dropped unless ``do_bg``; with ``batch_dice`` the
        batch axis is summed away.

        Returns:
            Three tensors of shape ``(B, C')``, or ``(C',)`` with ``batch_dice``; the true volume carries
            no gradient.
        """
        if self.apply_nonlin == "softmax":
            intersect, sum_pred, sum_gt = self._stats_softmax(logits, target, loss_mask)
        else:
            intersect, sum_pred, sum_gt = self._stats_sigmoid(logits, target, loss_mask)
        if not self.do_bg:
            intersect, sum_pred, sum_gt = intersect[:, 1:], sum_pred[:, 1:], sum_gt[:, 1:]
        if self.batch_dice:
            intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
        return intersect, sum_pred, sum_gt

    def overlap_index(self, intersect: torch.Tensor, sum_pred: torch.Tensor, sum_gt: torch.Tensor
                      ) -> torch.Tensor:
        """Smoothed Dice ``(2 I + s) / (sum_pred + sum_gt + s)`` per entry (subclasses change the ratio)."""
        return (2 * intersect + self.smooth) / torch.clamp(sum_pred + sum_gt + self.smooth, min=1e-8)

    @staticmethod
    def _stats_softmax(logits: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, c = logits.shape[:2]
        if target.shape != (b, 1, *logits.shape[2:]):
            raise TrainingConfigError(
                f"SoftDiceLoss(softmax): target shape {tuple(target.shape)} does not match logits "
                f"{tuple(logits.shape)}; pass an integer label map of shape (B, 1, *spatial).")
        probs = torch.softmax(logits.float(), 1)
        labels = target.long().reshape(b, 1, -1)
        flat = probs.reshape(b, c, -1)
        p_true = flat.gather(1, labels)[:, 0]  # probability assigned to the true class, (B, N)
        labels = labels[:, 0]
        if loss_mask is None:
            weights = torch.ones_like(p_true)
            sum_pred = flat.sum(-1)
        else:
            weights = loss_mask.reshape(b, -1).to(flat.dtype)
            sum_pred = (flat * weights[:, None]).sum(-1)
        intersect = flat.new_zeros(b, c).scatter_add(1, labels, p_true * weights)
        with torch.no_grad():
            sum_gt = flat.new_zeros(b, c).scatter_add(1, labels, weights)
        return intersect, sum_pred, sum_gt

    @staticmethod
    def _stats_sigmoid(logits: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if target.shape != logits.shape:
            raise TrainingConfigError(
                f"SoftDiceLoss(sigmoid): target shape {tuple(target.shape)} differs from logits "
                f"{tuple(logits.shape)}; pass one float 0/1 channel per output channel.")
        probs = torch.sigmoid(logits.float())
        gt = target.to(probs.dtype)
        axes = spatial_axes(probs)
        if loss_mask is not None:
            mask = loss_mask.to(probs.dtype)
            probs = probs * mask
            gt = gt * mask
        intersect = (probs * gt).sum(axes)
        sum_pred = probs.sum(axes)
        with torch.no_grad():
            sum_gt = gt.sum(axes)
        return intersect, sum_pred, sum_gt


class TverskyLoss(SoftDiceLoss):
    """Soft Tversky loss: :class:`SoftDiceLoss` with false positives and false negatives weighted apart.

    Per class ``-(2 TP + s) / (2 TP + 2 alpha FP + 2 beta FN + s)`` with ``FP = sum_pred - TP`` and
    ``FN = sum_gt - TP`` (the Tversky index ``TP / (TP + alpha FP + beta FN)`` with smoothing ``s / 2``), in
    [-1, 0]. ``alpha = beta = 0.5`` gives exactly the soft Dice; ``beta > alpha`` punishes missed
    foreground more than false alarms (small structures).

    Args:
        apply_nonlin, batch_dice, do_bg, smooth: as for :class:`SoftDiceLoss`.
        alpha: Weight of false positives, >= 0.
        beta: Weight of false negatives, >= 0; ``alpha + beta > 0``.

    Raises:
        TrainingConfigError: ``alpha`` or ``beta`` out of range (or a bad ``apply_nonlin``).
    """

    def __init__(self, *, apply_nonlin: Literal["softmax", "sigmoid"], batch_dice: bool, do_bg: bool,
                 alpha: float = 0.3, beta: float = 0.7, smooth: float = 1e-5) -> None:
        super().__init__(apply_nonlin=apply_nonlin, batch_dice=batch_dice, do_bg=do_bg, smooth=smooth)
        self.alpha = check_param("tversky", "alpha", alpha, lambda a: a >= 0, "alpha >= 0 (weight of false positives)")
        self.beta = check_param("tversky", "beta", beta, lambda b: b >= 0, "beta >= 0 (weight of false negatives)")
        if self.alpha + self.beta <= 0:
            raise TrainingConfigError(f"loss 'tversky': alpha={alpha!r} and beta={beta!r} are both 0; valid: "
                                      "alpha >= 0, beta >= 0 and alpha + beta > 0 (0.5 and 0.5 is the soft Dice).")

    def overlap_index(self, intersect: torch.Tensor, sum_pred: torch.Tensor, sum_gt: torch.Tensor
                      ) -> torch.Tensor:
        """``(2 TP + s) / (2 alpha sum_pred + 2 beta sum_gt + (2 - 2 alpha - 2 beta) TP + s)`` per entry.

        The weights are 1, 1 and 0 for ``alpha = beta = 0.5``, so that case is bit for bit the Dice.
        """
        denom = 2 * self.alpha * sum_pred + 2 * self.beta * sum_gt + (2 - 2 * self.alpha - 2 * self.beta) * intersect
        return (2 * intersect + self.smooth) / torch.clamp(denom + self.smooth, min=1e-8)
