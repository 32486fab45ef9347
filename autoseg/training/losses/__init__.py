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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from autoseg.errors import TrainingConfigError
from autoseg.training.losses.compound import (
    DiceBCELoss,
    DiceCELoss,
    DiceFocalLoss,
    DiceTopKLoss,
    OverlapXentLoss,
    TverskyCELoss,
)
from autoseg.training.losses.terms import SoftDiceLoss, TverskyLoss

__all__ = ["LOSSES", "DeepSupervisionLoss", "DiceBCELoss", "DiceCELoss", "DiceFocalLoss", "DiceTopKLoss", "OverlapXentLoss",
           "SoftDiceLoss", "TverskyCELoss", "TverskyLoss", "build_loss", "deep_supervision_weights", "dice_bce",
           "dice_ce", "dice_focal", "dice_topk", "tversky"]


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
               params: Mapping[str, Any] | None = None, factory: Callable[..., nn.Module] | None = None) -> nn.Module:
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
        factory: A loss part with its parameters bound (``autoseg.training.parts.build_part("loss", ...)``),
            called with the configuration arguments instead of looking ``name`` up.

    Returns:
        A module called as ``loss(outputs, targets)``: lists (highest resolution first) when
        ``n_outputs > 1``, single tensors otherwise.

    Raises:
        TrainingConfigError: ``n_outputs < 1``; an unknown loss name or parameter (with the closest match and
            the valid ones); a parameter out of range; ``dice_ce`` for regions or ``dice_bce`` for labels.
    """
    if name is None:
        name = "dice_bce" if regions else "dice_ce"
    if factory is not None:
        base = factory(regions=regions, batch_dice=batch_dice, ignore_label=ignore_label)
    else:
        base = _make_loss(name, params or {}, regions=regions, batch_dice=batch_dice, ignore_label=ignore_label)
    weights = [w if w > 0 else unused_weight for w in deep_supervision_weights(n_outputs)]
    if n_outputs == 1:
        return base
    return DeepSupervisionLoss(base, weights)
