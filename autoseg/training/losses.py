"""Training losses: soft Dice + cross-entropy (labels), soft Dice + BCE (regions), deep supervision.

Conventions (the data pipeline in :mod:`autoseg.training.augmentation` produces exactly these):

- **Label training** (softmax): the network outputs logits ``(B, C, *spatial)`` with ``C`` = number of
  labels including background; the target is an integer label map ``(B, 1, *spatial)`` (any integer or
  float dtype holding whole numbers). Voxels equal to ``ignore_label`` count in neither loss term.
- **Region training** (sigmoid): logits ``(B, R, *spatial)``, one channel per region; the target is a
  float 0/1 map ``(B, R, *spatial)``. With an ignore label the target has ``R + 1`` channels and the
  **last channel is the ignore mask: 1 where the voxel is ignored (not annotated), 0 where it counts**.
- **Deep supervision**: outputs and targets are lists, highest resolution first.

The Dice term is ``-mean((2 I + s) / (sum_pred + sum_gt + s))`` over classes (and over samples unless
``batch_dice``), ``s = 1e-5``; cross-entropy and BCE have weight 1 each.

Example:
    >>> import torch
    >>> loss = build_loss(regions=False, batch_dice=True, ignore_label=None, n_outputs=1)
    >>> logits = torch.zeros(2, 3, 4, 4, 4, requires_grad=True)
    >>> target = torch.randint(0, 3, (2, 1, 4, 4, 4))
    >>> value = loss(logits, target)
    >>> value.backward()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from autoseg.errors import TrainingConfigError


def _spatial_axes(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, t.ndim))


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
        if self.apply_nonlin == "softmax":
            intersect, sum_pred, sum_gt = self._stats_softmax(logits, target, loss_mask)
        else:
            intersect, sum_pred, sum_gt = self._stats_sigmoid(logits, target, loss_mask)
        if not self.do_bg:
            intersect, sum_pred, sum_gt = intersect[:, 1:], sum_pred[:, 1:], sum_gt[:, 1:]
        if self.batch_dice:
            intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
        dice = (2 * intersect + self.smooth) / torch.clamp(sum_pred + sum_gt + self.smooth, min=1e-8)
        return -dice.mean()

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
        axes = _spatial_axes(probs)
        if loss_mask is not None:
            mask = loss_mask.to(probs.dtype)
            probs = probs * mask
            gt = gt * mask
        intersect = (probs * gt).sum(axes)
        sum_pred = probs.sum(axes)
        with torch.no_grad():
            sum_gt = gt.sum(axes)
        return intersect, sum_pred, sum_gt


class DiceCELoss(nn.Module):
    """Softmax soft Dice (background excluded) + cross-entropy, weights 1 and 1, for label training.

    Args:
        batch_dice: Passed to :class:`SoftDiceLoss`.
        ignore_label: Label value excluded from both terms (its voxels change nothing), or None.
    """

    def __init__(self, *, batch_dice: bool, ignore_label: int | None = None) -> None:
        super().__init__()
        self.ignore_label = ignore_label
        self.dice = SoftDiceLoss(apply_nonlin="softmax", batch_dice=batch_dice, do_bg=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss for logits ``(B, C, *sp)`` and an integer label map ``(B, 1, *sp)``.

        A batch in which every voxel is ignored gives a finite loss (CE 0, Dice -1) and zero gradients.
        """
        labels = target.long()
        if self.ignore_label is None:
            dice = self.dice(logits, labels)
            ce = F.cross_entropy(logits.float(), labels[:, 0])
            return dice + ce
        valid = labels != self.ignore_label
        clean = torch.where(valid, labels, torch.zeros_like(labels))
        dice = self.dice(logits, clean, loss_mask=valid)
        ce_sum = F.cross_entropy(logits.float(), labels[:, 0], ignore_index=self.ignore_label, reduction="sum")
        ce = ce_sum / valid.sum().clamp(min=1)
        return dice + ce


class DiceBCELoss(nn.Module):
    """Sigmoid soft Dice (all channels) + BCE-with-logits, weights 1 and 1, for region training.

    Args:
        batch_dice: Passed to :class:`SoftDiceLoss`.
        use_ignore: The target carries one extra last channel, 1 where the voxel is ignored; both terms
            are then computed over the other voxels only.
    """

    def __init__(self, *, batch_dice: bool, use_ignore: bool = False) -> None:
        super().__init__()
        self.use_ignore = use_ignore
        self.dice = SoftDiceLoss(apply_nonlin="sigmoid", batch_dice=batch_dice, do_bg=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss for logits ``(B, R, *sp)`` and float targets ``(B, R, *sp)`` (``R + 1`` with ignore)."""
        expected = logits.shape[1] + (1 if self.use_ignore else 0)
        if target.ndim != logits.ndim or target.shape[1] != expected:
            raise TrainingConfigError(
                f"DiceBCELoss: target shape {tuple(target.shape)} does not fit logits {tuple(logits.shape)} "
                f"with use_ignore={self.use_ignore}; expected {expected} target channels "
                "(one per region, plus a last ignore-mask channel when use_ignore=True).")
        target = target.float()
        if not self.use_ignore:
            dice = self.dice(logits, target)
            bce = F.binary_cross_entropy_with_logits(logits.float(), target)
            return dice + bce
        mask = 1.0 - target[:, -1:]
        regions = target[:, :-1]
        dice = self.dice(logits, regions, loss_mask=mask)
        bce = F.binary_cross_entropy_with_logits(logits.float(), regions, reduction="none")
        n_valid = (mask.sum() * regions.shape[1]).clamp(min=1.0)
        return dice + (bce * mask).sum() / n_valid


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """Loss weights for deep-supervision outputs, highest resolution first.

    Weights are ``1 / 2**i``; with more than one output the lowest-resolution one gets 0; the rest are
    normalised to sum 1.

    Args:
        n_outputs: Number of network outputs (n_stages - 1 for a deep-supervised U-Net).

    Returns:
        ``n_outputs`` floats summing to 1.

    Raises:
        TrainingConfigError: ``n_outputs < 1``.

    Example:
        >>> [round(w, 4) for w in deep_supervision_weights(5)]
        [0.5333, 0.2667, 0.1333, 0.0667, 0.0]
    """
    if n_outputs < 1:
        raise TrainingConfigError(f"deep_supervision_weights: n_outputs={n_outputs} must be >= 1.")
    raw = [1.0 / 2 ** i for i in range(n_outputs)]
    if n_outputs > 1:
        raw[-1] = 0.0
    total = sum(raw)
    return [w / total for w in raw]


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of one loss over several resolutions; zero-weight terms are not computed.

    Args:
        loss: Loss taking ``(output, target)``.
        weights: One weight per output, highest resolution first.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float]) -> None:
        super().__init__()
        self.loss = loss
        self.weights = [float(w) for w in weights]

    def forward(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sum of ``w_i * loss(outputs[i], targets[i])``.

        Raises:
            TrainingConfigError: the numbers of outputs, targets and weights differ.
        """
        if not (len(outputs) == len(targets) == len(self.weights)):
            raise TrainingConfigError(
                f"DeepSupervisionLoss: got {len(outputs)} outputs, {len(targets)} targets and "
                f"{len(self.weights)} weights; they must match (pass one target per output, e.g. by setting "
                "ds_scales in the augmentation to the network's deep-supervision scales).")
        total: torch.Tensor | None = None
        for weight, output, target in zip(self.weights, outputs, targets, strict=True):
            if weight == 0.0:
                continue
            term = weight * self.loss(output, target)
            total = term if total is None else total + term
        if total is None:  # all weights zero: a graph-connected zero
            return outputs[0].sum() * 0.0
        return total


def build_loss(*, regions: bool, batch_dice: bool, ignore_label: int | None, n_outputs: int,
               unused_weight: float = 0.0) -> nn.Module:
    """The training loss for a configuration.

    Args:
        regions: Region training (sigmoid, Dice + BCE) instead of label training (softmax, Dice + CE).
        batch_dice: Batch Dice from the plans.
        ignore_label: Ignore label value, or None. For regions it switches on the extra ignore channel.
        n_outputs: Number of network outputs; > 1 wraps the loss in :class:`DeepSupervisionLoss`.
        unused_weight: Weight given to outputs whose deep-supervision weight is 0 (DDP needs a gradient for
            every parameter: use a tiny value such as 1e-6 there).

    Returns:
        A module called as ``loss(outputs, targets)``: lists (highest resolution first) when
        ``n_outputs > 1``, single tensors otherwise.

    Raises:
        TrainingConfigError: ``n_outputs < 1``.
    """
    base: nn.Module
    if regions:
        base = DiceBCELoss(batch_dice=batch_dice, use_ignore=ignore_label is not None)
    else:
        base = DiceCELoss(batch_dice=batch_dice, ignore_label=ignore_label)
    weights = [w if w > 0 else unused_weight for w in deep_supervision_weights(n_outputs)]
    if n_outputs == 1:
        return base
    return DeepSupervisionLoss(base, weights)
