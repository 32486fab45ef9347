"""Overlap + cross-entropy losses: Dice+CE (labels), Dice+BCE (regions), and the Top-K, focal and Tversky variants."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from autoseg.training.losses.terms import (
    SoftDiceLoss,
    TverskyLoss,
    check_param,
    label_target,
    region_target,
    voxel_xent,
    weighted_mean,
)


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
        clean, valid = label_target(target, self.ignore_label)
        if valid is None:
            dice = self.dice(logits, clean)
            ce = F.cross_entropy(logits.float(), clean[:, 0])
            return dice + ce
        dice = self.dice(logits, clean, loss_mask=valid)
        ce_sum = F.cross_entropy(logits.float(), target.long()[:, 0], ignore_index=self.ignore_label,
                                 reduction="sum")
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
        regions, mask = region_target(logits, target, use_ignore=self.use_ignore, who="DiceBCELoss")
        if mask is None:
            dice = self.dice(logits, regions)
            bce = F.binary_cross_entropy_with_logits(logits.float(), regions)
            return dice + bce
        dice = self.dice(logits, regions, loss_mask=mask)
        bce = F.binary_cross_entropy_with_logits(logits.float(), regions, reduction="none")
        n_valid = (mask.sum() * regions.shape[1]).clamp(min=1.0)
        return dice + (bce * mask).sum() / n_valid


class OverlapXentLoss(nn.Module):
    """Overlap term (soft Dice by default) + ``ce_weight`` x a reduction of the per-voxel cross-entropy
    (labels, softmax) or BCE (regions, sigmoid); the shared body of the losses below.

    The plain reduction is the mean over the counted voxels (regions: voxels x regions); subclasses override
    :meth:`reduce_xent`. Ignored voxels count in neither term.

    Args:
        regions: Region mode (sigmoid, float 0/1 targets, all channels in the overlap term) instead of label
            mode (softmax, integer label map, background excluded from the overlap term).
        batch_dice: Passed to the overlap term.
        ignore_label: Label mode: the ignored label value, or None. Region mode: not None switches on the
            extra last ignore-mask target channel.
        ce_weight: Weight of the cross-entropy term, >= 0 (0 leaves the overlap term alone).
        overlap: The overlap term (a :class:`SoftDiceLoss` or subclass, in the matching mode); default soft
            Dice.
    """

    loss_name = "overlap_xent"

    def __init__(self, *, regions: bool, batch_dice: bool, ignore_label: int | None, ce_weight: float = 1.0,
                 overlap: SoftDiceLoss | None = None) -> None:
        super().__init__()
        self.ce_weight = check_param(self.loss_name, "ce_weight", ce_weight, lambda w: w >= 0,
                                      "ce_weight >= 0 (0 disables the cross-entropy term)")
        self.regions = regions
        self.ignore_label = ignore_label
        if overlap is None:
            overlap = SoftDiceLoss(apply_nonlin="sigmoid" if regions else "softmax", batch_dice=batch_dice,
                                   do_bg=regions)
        self.overlap = overlap

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss for logits ``(B, C, *sp)`` and a target in the module docstring's convention for the mode."""
        gt: torch.Tensor
        mask: torch.Tensor | None
        if self.regions:
            gt, mask = region_target(logits, target, use_ignore=self.ignore_label is not None,
                                      who=type(self).__name__)
        else:
            gt, mask = label_target(target, self.ignore_label)
        value = self.overlap(logits, gt, loss_mask=mask)
        if self.ce_weight == 0.0:
            return value
        xent, weight = voxel_xent(logits, gt, mask, regions=self.regions)
        return value + self.ce_weight * self.reduce_xent(xent, weight)

    def reduce_xent(self, xent: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """Scalar from the unreduced cross-entropy and its 0/1 weight (see :func:`voxel_xent`): the mean."""
        return weighted_mean(xent, weight)


class DiceTopKLoss(OverlapXentLoss):
    """Soft Dice + cross-entropy (BCE for regions) averaged over the ``k`` percent hardest voxels only.

    nnU-Net's DC_and_topk loss: of all counted entries of the batch (voxels; voxel x region pairs for
    regions) the ``floor(n * k / 100)`` (at least 1) with the largest cross-entropy are averaged, so easy
    voxels stop contributing. ``k = 100`` is the plain mean. Ignored voxels are never among them.

    Args:
        regions, batch_dice, ignore_label: as for :class:`OverlapXentLoss`.
        k: Percent of the counted voxels kept, ``0 < k <= 100``.
    """

    loss_name = "dice_topk"

    def __init__(self, *, regions: bool, batch_dice: bool, ignore_label: int | None, k: float = 10.0) -> None:
        super().__init__(regions=regions, batch_dice=batch_dice, ignore_label=ignore_label)
        self.k = check_param(self.loss_name, "k", k, lambda v: 0 < v <= 100,
                              "0 < k <= 100 (percent of the voxels kept)")

    def reduce_xent(self, xent: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """Mean of the largest ``k`` percent of the counted entries; 0 with zero gradients when none counts."""
        flat = xent.reshape(-1)
        if weight is not None:
            flat = flat[weight.reshape(-1) > 0]
        n = flat.numel()
        if n == 0:
            return xent.sum() * 0.0
        n_top = max(1, math.floor(n * self.k / 100 + 1e-9))
        if n_top >= n:
            return flat.mean()
        return flat.topk(n_top, sorted=False).values.mean()


class DiceFocalLoss(OverlapXentLoss):
    """Soft Dice + focal loss ``(1 - p_true) ** gamma * cross-entropy`` (BCE for regions), mean over voxels.

    ``p_true = exp(-cross-entropy)`` is the probability given to the right class (region value); the factor
    fades out well-classified voxels. ``gamma = 0`` is exactly the cross-entropy. There is no ``alpha``
    class weight: the Dice term already balances classes.

    Args:
        regions, batch_dice, ignore_label: as for :class:`OverlapXentLoss`.
        gamma: Focusing exponent, >= 0.
    """

    loss_name = "dice_focal"

    def __init__(self, *, regions: bool, batch_dice: bool, ignore_label: int | None, gamma: float = 2.0) -> None:
        super().__init__(regions=regions, batch_dice=batch_dice, ignore_label=ignore_label)
        self.gamma = check_param(self.loss_name, "gamma", gamma, lambda g: g >= 0,
                                  "gamma >= 0 (0 is plain cross-entropy)")

    def reduce_xent(self, xent: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """Mean of the focal terms over the counted entries."""
        if self.gamma == 0.0:
            return weighted_mean(xent, weight)
        # 1 - p_true = -expm1(-CE), accurate for small CE; the floor keeps gradients finite for gamma < 1
        modulation = (-torch.expm1(-xent)).clamp(min=1e-12) ** self.gamma
        return weighted_mean(modulation * xent, weight)


class TverskyCELoss(OverlapXentLoss):
    """Soft Tversky loss (:class:`TverskyLoss`) + ``ce_weight`` x cross-entropy (BCE for regions).

    Background is excluded from the Tversky term in label mode, all regions count in region mode.

    Args:
        regions, batch_dice, ignore_label: as for :class:`OverlapXentLoss`.
        alpha: Weight of false positives, >= 0.
        beta: Weight of false negatives, >= 0 (``alpha + beta > 0``).
        ce_weight: Weight of the cross-entropy term, >= 0 (0 disables it).
    """

    loss_name = "tversky"

    def __init__(self, *, regions: bool, batch_dice: bool, ignore_label: int | None, alpha: float = 0.3,
                 beta: float = 0.7, ce_weight: float = 1.0) -> None:
        overlap = TverskyLoss(apply_nonlin="sigmoid" if regions else "softmax", batch_dice=batch_dice,
                              do_bg=regions, alpha=alpha, beta=beta)
        super().__init__(regions=regions, batch_dice=batch_dice, ignore_label=ignore_label, ce_weight=ce_weight,
                         overlap=overlap)
