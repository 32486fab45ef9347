"""Training losses: soft Dice + cross-entropy (labels), soft Dice + BCE (regions), their Top-K, focal and
Tversky variants, deep supervision, and the name -> factory table :data:`LOSSES`.

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

Losses by name (:data:`LOSSES`; ``build_loss(name=..., params=...)`` picks one; each works in both modes
unless noted, with cross-entropy meaning BCE in region mode):

- ``dice_ce`` (labels only) and ``dice_bce`` (regions only): the defaults above.
- ``dice_topk``: Dice + cross-entropy averaged over the ``k`` percent hardest non-ignored voxels only.
- ``dice_focal``: Dice + focal loss ``(1 - p_true) ** gamma * cross-entropy``.
- ``tversky``: Tversky loss (``alpha`` weighs false positives, ``beta`` false negatives) + ``ce_weight`` x
  cross-entropy.

In every loss an ignored voxel changes nothing: neither the value nor any gradient.

Example:
    >>> import torch
    >>> loss = build_loss(regions=False, batch_dice=True, ignore_label=None, n_outputs=1)
    >>> logits = torch.zeros(2, 3, 4, 4, 4, requires_grad=True)
    >>> target = torch.randint(0, 3, (2, 1, 4, 4, 4))
    >>> value = loss(logits, target)
    >>> value.backward()
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from autoseg.errors import TrainingConfigError


def _spatial_axes(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, t.ndim))


def _check_param(loss: str, param: str, value: object, ok: Callable[[float], bool], valid: str) -> float:
    """``value`` as a float when it is a finite real number that passes ``ok``; else a TrainingConfigError
    naming the loss, the parameter, the value and the valid range ``valid``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TrainingConfigError(f"loss {loss!r}: {param}={value!r} is not a number; valid: {valid}.")
    number = float(value)
    if not (math.isfinite(number) and ok(number)):
        raise TrainingConfigError(f"loss {loss!r}: {param}={value!r} is out of range; valid: {valid}.")
    return number


def _label_target(target: torch.Tensor, ignore_label: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Label mode: the integer label map with ignored voxels set to 0, and the ``(B, 1, *sp)`` bool mask of
    the voxels that count (None without an ignore label)."""
    labels = target.long()
    if ignore_label is None:
        return labels, None
    valid = labels != ignore_label
    return torch.where(valid, labels, torch.zeros_like(labels)), valid


def _region_target(logits: torch.Tensor, target: torch.Tensor, *, use_ignore: bool, who: str
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


def _voxel_xent(logits: torch.Tensor, gt: torch.Tensor, loss_mask: torch.Tensor | None, *, regions: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unreduced cross-entropy per voxel ``(B, *sp)`` (labels; ``gt`` from :func:`_label_target`) or BCE per
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


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
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
        self.alpha = _check_param("tversky", "alpha", alpha, lambda a: a >= 0, "alpha >= 0 (weight of false positives)")
        self.beta = _check_param("tversky", "beta", beta, lambda b: b >= 0, "beta >= 0 (weight of false negatives)")
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
        clean, valid = _label_target(target, self.ignore_label)
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
        regions, mask = _region_target(logits, target, use_ignore=self.use_ignore, who="DiceBCELoss")
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
        self.ce_weight = _check_param(self.loss_name, "ce_weight", ce_weight, lambda w: w >= 0,
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
            gt, mask = _region_target(logits, target, use_ignore=self.ignore_label is not None,
                                      who=type(self).__name__)
        else:
            gt, mask = _label_target(target, self.ignore_label)
        value = self.overlap(logits, gt, loss_mask=mask)
        if self.ce_weight == 0.0:
            return value
        xent, weight = _voxel_xent(logits, gt, mask, regions=self.regions)
        return value + self.ce_weight * self.reduce_xent(xent, weight)

    def reduce_xent(self, xent: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """Scalar from the unreduced cross-entropy and its 0/1 weight (see :func:`_voxel_xent`): the mean."""
        return _weighted_mean(xent, weight)


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
        self.k = _check_param(self.loss_name, "k", k, lambda v: 0 < v <= 100,
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
        self.gamma = _check_param(self.loss_name, "gamma", gamma, lambda g: g >= 0,
                                  "gamma >= 0 (0 is plain cross-entropy)")

    def reduce_xent(self, xent: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """Mean of the focal terms over the counted entries."""
        if self.gamma == 0.0:
            return _weighted_mean(xent, weight)
        # 1 - p_true = -expm1(-CE), accurate for small CE; the floor keeps gradients finite for gamma < 1
        modulation = (-torch.expm1(-xent)).clamp(min=1e-12) ** self.gamma
        return _weighted_mean(modulation * xent, weight)


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


def dice_ce(*, regions: bool, batch_dice: bool, ignore_label: int | None) -> nn.Module:
    """Soft Dice (background excluded) + cross-entropy, weights 1 and 1: the default for label datasets.

    nnU-Net's default loss (:class:`DiceCELoss`), for label training (softmax) only; region datasets use
    its sigmoid counterpart ``dice_bce``.

    Raises:
        TrainingConfigError: ``regions`` is True.
    """
    if regions:
        raise TrainingConfigError("loss 'dice_ce' is for label training (softmax), but this dataset trains regions "
                                  "(sigmoid); use 'dice_bce', its region counterpart.")
    return DiceCELoss(batch_dice=batch_dice, ignore_label=ignore_label)


def dice_bce(*, regions: bool, batch_dice: bool, ignore_label: int | None) -> nn.Module:
    """Soft Dice (all regions) + binary cross-entropy, weights 1 and 1: the default for region datasets.

    nnU-Net's region loss (:class:`DiceBCELoss`), for region training (sigmoid) only; label datasets use its
    softmax counterpart ``dice_ce``. An ignore label switches on the target's last ignore-mask channel.

    Raises:
        TrainingConfigError: ``regions`` is False.
    """
    if not regions:
        raise TrainingConfigError("loss 'dice_bce' is for region training (sigmoid), but this dataset trains "
                                  "labels (softmax); use 'dice_ce', its label counterpart.")
    return DiceBCELoss(batch_dice=batch_dice, use_ignore=ignore_label is not None)


def dice_topk(*, regions: bool, batch_dice: bool, ignore_label: int | None, k: float = 10.0) -> nn.Module:
    """Soft Dice + cross-entropy over only the k percent hardest voxels (nnU-Net's DC_and_topk).

    Easy, already well-classified voxels stop contributing to the cross-entropy term, which then focuses on
    boundaries and rare structures. ``k`` is the percent of (non-ignored) voxels kept, ``0 < k <= 100``;
    ``k = 100`` is ``dice_ce`` / ``dice_bce``. Works for labels (softmax) and regions (sigmoid, BCE). See
    :class:`DiceTopKLoss`.

    Raises:
        TrainingConfigError: ``k`` out of range.
    """
    return DiceTopKLoss(regions=regions, batch_dice=batch_dice, ignore_label=ignore_label, k=k)


def dice_focal(*, regions: bool, batch_dice: bool, ignore_label: int | None, gamma: float = 2.0) -> nn.Module:
    """Soft Dice + focal loss, which down-weights voxels the network already gets right.

    The cross-entropy of each voxel is multiplied by ``(1 - p_true) ** gamma``; ``gamma >= 0``, and
    ``gamma = 0`` is ``dice_ce`` / ``dice_bce``. No per-class ``alpha`` (the Dice term balances classes).
    Works for labels (softmax) and regions (sigmoid, BCE). See :class:`DiceFocalLoss`.

    Raises:
        TrainingConfigError: ``gamma`` out of range.
    """
    return DiceFocalLoss(regions=regions, batch_dice=batch_dice, ignore_label=ignore_label, gamma=gamma)


def tversky(*, regions: bool, batch_dice: bool, ignore_label: int | None, alpha: float = 0.3, beta: float = 0.7,
            ce_weight: float = 1.0) -> nn.Module:
    """Tversky loss (misses weigh more than false alarms by default) + cross-entropy.

    The Tversky index ``TP / (TP + alpha FP + beta FN)`` generalises Dice (``alpha = beta = 0.5``);
    ``beta > alpha`` favours recall, useful for small structures. ``alpha, beta >= 0`` with a positive sum;
    ``ce_weight >= 0`` weighs the cross-entropy (BCE for regions) term, 0 disables it. Background is excluded
    for labels, every region counts. See :class:`TverskyCELoss`.

    Raises:
        TrainingConfigError: a parameter out of range.
    """
    return TverskyCELoss(regions=regions, batch_dice=batch_dice, ignore_label=ignore_label, alpha=alpha, beta=beta,
                         ce_weight=ce_weight)


#: Loss name -> factory. Every factory takes the keyword arguments ``regions``, ``batch_dice`` and
#: ``ignore_label`` (set from the configuration) plus its own tunable parameters, each a keyword with a typed
#: default (``inspect.signature(factory, eval_str=True)`` lists them); the first docstring line describes it.
LOSSES: dict[str, Callable[..., nn.Module]] = {
    "dice_ce": dice_ce,
    "dice_bce": dice_bce,
    "dice_topk": dice_topk,
    "dice_focal": dice_focal,
    "tversky": tversky,
}

_CONFIG_ARGS = ("regions", "batch_dice", "ignore_label")


def _make_loss(name: str, params: Mapping[str, Any], *, regions: bool, batch_dice: bool,
               ignore_label: int | None) -> nn.Module:
    """``LOSSES[name]`` called with the configuration arguments and ``params``, both checked."""
    if name not in LOSSES:
        close = difflib.get_close_matches(str(name), list(LOSSES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TrainingConfigError(f"unknown loss {name!r}{hint}; valid names: {', '.join(LOSSES)}.")
    factory = LOSSES[name]
    tunable = [p for p in inspect.signature(factory).parameters if p not in _CONFIG_ARGS]
    for key in params:
        if key in _CONFIG_ARGS:
            raise TrainingConfigError(f"loss {name!r}: {key!r} is set from the configuration, not from the loss "
                                      f"parameters; tunable: {', '.join(tunable) or 'none'}.")
        if key not in tunable:
            close = difflib.get_close_matches(str(key), tunable, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TrainingConfigError(f"loss {name!r} has no parameter {key!r}{hint}; tunable: "
                                      f"{', '.join(tunable) or 'none'}.")
    return factory(regions=regions, batch_dice=batch_dice, ignore_label=ignore_label, **params)


def build_loss(*, regions: bool, batch_dice: bool, ignore_label: int | None, n_outputs: int,
               unused_weight: float = 0.0, name: str | None = None,
               params: Mapping[str, Any] | None = None) -> nn.Module:
    """The training loss for a configuration.

    Args:
        regions: Region training (sigmoid) instead of label training (softmax).
        batch_dice: Batch Dice from the plans.
        ignore_label: Ignore label value, or None. For regions it switches on the extra ignore channel.
        n_outputs: Number of network outputs; > 1 wraps the loss in :class:`DeepSupervisionLoss`.
        unused_weight: Weight given to outputs whose deep-supervision weight is 0 (DDP needs a gradient for
            every parameter: use a tiny value such as 1e-6 there).
        name: A key of :data:`LOSSES`; None (the default) means ``"dice_bce"`` for regions and ``"dice_ce"``
            for labels (Dice + BCE / Dice + CE, nnU-Net's defaults).
        params: The loss's tunable parameters, e.g. ``{"k": 5.0}`` for ``"dice_topk"``; None means defaults.

    Returns:
        A module called as ``loss(outputs, targets)``: lists (highest resolution first) when
        ``n_outputs > 1``, single tensors otherwise.

    Raises:
        TrainingConfigError: ``n_outputs < 1``; an unknown loss name or parameter (with the closest match and
            the valid ones); a parameter out of range; ``dice_ce`` for regions or ``dice_bce`` for labels.
    """
    if name is None:
        name = "dice_bce" if regions else "dice_ce"
    base = _make_loss(name, params or {}, regions=regions, batch_dice=batch_dice, ignore_label=ignore_label)
    weights = [w if w > 0 else unused_weight for w in deep_supervision_weights(n_outputs)]
    if n_outputs == 1:
        return base
    return DeepSupervisionLoss(base, weights)
