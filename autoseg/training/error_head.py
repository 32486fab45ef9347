"""The error head's training term: a wrapper that adds it to the recipe's loss.

The network's full-resolution output carries the error logit as its last channel in training mode (see
:mod:`autoseg.networks.error_head`). :class:`ErrorHeadLoss` splits it off, gives the recipe's loss the
segmentation logits alone, and adds the binary cross-entropy of the error logit against "the segmentation's
label is wrong here" at full resolution: ``argmax != target`` for labels, any region's ``logit > 0`` differing
from its mask for regions. Ignored voxels count in no term. The target is computed from detached logits and the
error logit comes from detached features, so the term changes nothing in the segmentation's gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def error_target(logits: torch.Tensor, target: torch.Tensor, *, regions: bool, ignore_label: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the segmentation of ``logits`` is wrong, and which voxels count, both ``(B, 1, *sp)`` float.

    Example:
        >>> lg = torch.tensor([[[2.0, -1.0, 0.0]], [[0.0, 1.0, 3.0]]]).permute(1, 0, 2)   # (1, 2, 3): labels 0, 1, 1
        >>> wrong, valid = error_target(lg, torch.tensor([[[0, 0, 1]]]), regions=False, ignore_label=None)
        >>> wrong.tolist(), valid.tolist()
        ([[[0.0, 1.0, 0.0]]], [[[1.0, 1.0, 1.0]]])
    """
    logits = logits.detach()
    if regions:
        n = logits.shape[1]
        masks = target[:, :n] > 0.5
        wrong = ((logits > 0) != masks).any(dim=1, keepdim=True)
        valid = (target[:, n:n + 1] < 0.5) if ignore_label is not None and target.shape[1] > n else \
            torch.ones_like(wrong)
    else:
        t = target[:, :1].long()
        wrong = logits.argmax(dim=1, keepdim=True) != t
        valid = t != ignore_label if ignore_label is not None else torch.ones_like(wrong)
    return wrong.float(), valid.float()


class ErrorHeadLoss(nn.Module):
    """``loss(outputs, targets)`` of the segmentation plus ``weight`` x the error head's masked BCE.

    Args:
        loss: the recipe's loss (with deep supervision or not), called on the segmentation logits.
        num_outputs: segmentation channels; a full-resolution output with one more channel carries the error logit
            (an output without it, e.g. in evaluation mode, gets the segmentation loss alone).
        regions: region training (sigmoid outputs).
        ignore_label: the ignore label, or None.
        weight: the error term's weight.
    """

    def __init__(self, loss: nn.Module, *, num_outputs: int, regions: bool, ignore_label: int | None,
                 weight: float = 1.0) -> None:
        super().__init__()
        self.loss, self.num_outputs, self.regions = loss, num_outputs, regions
        self.ignore_label, self.weight = ignore_label, float(weight)

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], targets: torch.Tensor | Sequence[torch.Tensor],
                **extra: Any) -> torch.Tensor:
        """``extra`` (a batch's ``annotated``, for instance) goes to the wrapped loss."""
        listed = isinstance(outputs, (list, tuple))
        full = outputs[0] if listed else outputs
        if full.shape[1] != self.num_outputs + 1:
            return self.loss(outputs, targets, **extra)
        seg, err = full[:, :-1], full[:, -1:]
        seg_loss = self.loss([seg, *outputs[1:]] if listed else seg, targets, **extra)
        wrong, valid = error_target(seg, targets[0] if isinstance(targets, (list, tuple)) else targets,
                                    regions=self.regions, ignore_label=self.ignore_label)
        bce = F.binary_cross_entropy_with_logits(err.float(), wrong, reduction="none")
        return seg_loss + self.weight * (bce * valid).sum() / valid.sum().clamp_min(1.0)
