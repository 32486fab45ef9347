"""Training on partially annotated cases: a wrapper that keeps a case's unannotated classes out of any loss.

Each batch carries ``annotated``, a boolean ``(B, K)`` array: for each sample, which of the ``K`` network outputs
were annotated in its case (:func:`autoseg.io.annotations.annotated_outputs`). The wrapper rewrites the logits
(and, for regions, the target) and calls the wrapped loss unchanged, so it works with every loss of
:data:`~autoseg.training.losses.LOSSES` and with deep supervision:

- **Labels (softmax): the marginal loss.** In a case where class ``u`` was not annotated, a voxel stored as
  background may be background or ``u``. The background logit becomes ``logsumexp`` of the background and the
  unannotated classes' logits and those classes' logits are pushed to a very negative constant, so the softmax
  gives ``p_bg + p_u`` to background and exactly 0 to ``u``. Cross-entropy at a background voxel is then
  ``-log(p_bg + p_u)``, which does not care how the mass is split between background and ``u`` (the marginal
  likelihood of the partial label), and the soft Dice of ``u`` sees neither prediction nor reference in that
  sample, so it adds nothing (with batch Dice, ``u``'s Dice is computed over the other samples). Masking (dropping
  ``u``'s terms) would not be enough under a softmax: the background terms would still push ``p_u`` down.
- **Regions (sigmoid): masking.** Regions are independent binary problems, so an unannotated region's terms
  are removed: its logits are pushed to a very negative constant and its target set to 0, which makes its BCE
  exactly 0 and its Dice sums empty, with zero gradient. (The BCE mean still counts those entries, scaling the
  term by the annotated fraction of the batch.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: logit given to outputs that must carry no probability (exp underflows to 0 in float16 and float32)
_OFF = -1.0e4


def marginal_logits(logits: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """Softmax logits ``(B, C, *sp)`` whose background absorbs the unannotated classes' probability.

    Args:
        logits: network output.
        annotated: ``(B, C)`` booleans; column 0 (background) is treated as True.

    Returns:
        Logits of the same shape: ``softmax`` of them is the merged distribution, 0 for unannotated classes.
    """
    shape = (*annotated.shape, *(1,) * (logits.ndim - 2))
    missing = ~annotated.to(device=logits.device, dtype=torch.bool).reshape(shape)
    missing = torch.cat([torch.zeros_like(missing[:, :1]), missing[:, 1:]], dim=1)
    merged = missing.clone()
    merged[:, 0] = True  # background + the unannotated classes
    background = torch.logsumexp(logits.masked_fill(~merged, _OFF), dim=1, keepdim=True)
    return torch.cat([background, logits[:, 1:].masked_fill(missing[:, 1:], _OFF)], dim=1)


def masked_regions(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Region logits ``(B, R, *sp)`` and target ``(B, R[+1], *sp)`` with unannotated regions switched off."""
    shape = (*annotated.shape, *(1,) * (logits.ndim - 2))
    missing = ~annotated.to(device=logits.device, dtype=torch.bool).reshape(shape)
    n = logits.shape[1]
    target = torch.cat([target[:, :n].masked_fill(missing, 0), target[:, n:]], dim=1)
    return logits.masked_fill(missing, _OFF), target


class PartialLabelLoss(nn.Module):
    """Wraps a training loss so that each sample's unannotated classes (or regions) teach nothing.

    Called as ``loss(outputs, targets, annotated=None)``; without ``annotated`` (or when everything was
    annotated) it is the wrapped loss. Outputs and targets are tensors or deep-supervision lists.

    Args:
        loss: the loss to wrap (a :class:`~autoseg.training.losses.DeepSupervisionLoss` or a single one).
        regions: region (sigmoid) training: mask; else label (softmax) training: marginal loss.
    """

    def __init__(self, loss: nn.Module, *, regions: bool) -> None:
        super().__init__()
        self.loss = loss
        self.regions = regions

    def _one(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.regions:
            return masked_regions(logits, target, annotated)
        return marginal_logits(logits, annotated), target

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], targets: torch.Tensor | Sequence[torch.Tensor],
                annotated: torch.Tensor | None = None) -> torch.Tensor:
        if annotated is None or bool(annotated.all()):
            return self.loss(outputs, targets)
        if isinstance(outputs, torch.Tensor):
            return self.loss(*self._one(outputs, targets, annotated))  # type: ignore[arg-type]
        pairs = [self._one(o, t, annotated) for o, t in zip(outputs, targets, strict=True)]
        return self.loss([p[0] for p in pairs], [p[1] for p in pairs])
