"""The contract every loss part keeps."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autoseg.errors import TrainingConfigError
from autoseg.registry import PluginInfo
from autoseg.training.contracts.common import SEED, _as_list, _brief, _created, _require, _shapes
from autoseg.training.losses import build_loss

# ---- losses -----------------------------------------------------------------------------------------------
LOSS_CLASSES, LOSS_IGNORE, LOSS_SIZE = 3, 3, 8


@dataclass(frozen=True)
class _LossCase:
    """One mode of a loss on one synthetic batch: logits ``(2, 3, 8...)``, the mode's target and the ignored voxels
    (the first two slices along the first spatial axis)."""

    label: str
    factory: Callable[..., nn.Module]
    regions: bool
    ndim: int
    ignore: bool
    batch_dice: bool

    @property
    def where(self) -> str:
        return (f"loss {self.label!r} ({'regions' if self.regions else 'labels'}, {self.ndim}D, "
                f"ignore_label={self.ignore_label}, batch_dice={self.batch_dice})")

    @property
    def ignore_label(self) -> int | None:
        return LOSS_IGNORE if self.ignore else None

    def kwargs(self) -> dict[str, Any]:
        return {"regions": self.regions, "batch_dice": self.batch_dice, "ignore_label": self.ignore_label}

    def loss(self) -> nn.Module:
        try:
            return self.factory(**self.kwargs())
        except Exception as err:  # noqa: BLE001
            raise AssertionError(f"{self.where}: the factory raised {_brief(err)} although it accepts "
                                 "this mode without an ignore label") from err

    def ignored(self) -> torch.Tensor:
        mask = torch.zeros(2, 1, *(LOSS_SIZE,) * self.ndim, dtype=torch.bool)
        if self.ignore:
            mask[:, :, :2] = True
        return mask

    def data(self, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the target in the mode's convention (int16 labels as the pipeline gives them, or float
        region masks with the last ignore channel)."""
        gen = torch.Generator().manual_seed(seed)
        spatial = (LOSS_SIZE,) * self.ndim
        logits = torch.randn(2, LOSS_CLASSES, *spatial, generator=gen) * 2
        if self.regions:
            target = (torch.rand(2, LOSS_CLASSES, *spatial, generator=gen) > 0.5).float()
            return logits, torch.cat([target, self.ignored().float()], 1) if self.ignore else target
        target = torch.randint(0, LOSS_CLASSES, (2, 1, *spatial), generator=gen).to(torch.int16)
        return logits, target.masked_fill(self.ignored(), LOSS_IGNORE)


def _value_and_grad(case: _LossCase, loss: nn.Module, logits: Any, target: Any) -> tuple[torch.Tensor, Any]:
    xs = [x.detach().clone().requires_grad_(True) for x in _as_list(logits)]
    try:
        value = loss(xs if isinstance(logits, list) else xs[0], target)
    except Exception as err:  # noqa: BLE001
        raise AssertionError(f"{case.where}: the loss raised {_brief(err)}") from err
    _require(isinstance(value, torch.Tensor) and value.ndim == 0, case.where,
             f"the loss must be a scalar tensor; got {_shapes(value) if isinstance(value, torch.Tensor) else value!r}")
    _require(torch.isfinite(value), case.where, f"the loss is {value.item()}")
    value.backward()
    grads = [x.grad for x in xs]  # with deep supervision a zero-weight output may get none
    _require(grads[0] is not None and all(g is None or torch.isfinite(g).all() for g in grads), case.where,
             "backward gives no or non-finite gradients for the (full-resolution) logits")
    return value.detach(), grads if isinstance(logits, list) else grads[0]


def _loss_basics(case: _LossCase) -> None:
    logits, target = case.data()
    _, grad = _value_and_grad(case, case.loss(), logits, target)
    _require(grad.abs().sum() > 0, case.where, "the gradient of the logits is zero everywhere")
    if case.ignore:
        _require((grad * case.ignored()).abs().max() == 0, case.where, "ignored voxels get a gradient")


def _loss_ignore(case: _LossCase) -> None:
    """Other logits (and region values) at ignored voxels change neither the value nor the other gradients."""
    logits, target = case.data()
    loss, ignored = case.loss(), case.ignored()
    value, grad = _value_and_grad(case, loss, logits, target)
    gen = torch.Generator().manual_seed(SEED + 1)
    changed = torch.where(ignored, torch.randn(logits.shape, generator=gen) * 30, logits)
    changed_target = target.clone()
    if case.regions:
        changed_target[:, :-1] = torch.where(ignored, 1 - target[:, :-1], target[:, :-1])
    value2, grad2 = _value_and_grad(case, loss, changed, changed_target)
    _require(math.isclose(value.item(), value2.item(), rel_tol=1e-5, abs_tol=1e-6), case.where,
             f"changing the logits (and region values) of ignored voxels changes the loss {value.item():.7g} -> "
             f"{value2.item():.7g}")
    keep = ~ignored.expand_as(grad)
    _require(torch.allclose(grad[keep], grad2[keep], rtol=1e-5, atol=1e-7), case.where,
             "changing the logits of ignored voxels changes the gradient of the other voxels")


def _loss_ranking(case: _LossCase) -> None:
    _, target = case.data()
    if case.regions:
        truth = target[:, :LOSS_CLASSES]
        good, bad = (2 * truth - 1) * 20, (1 - 2 * truth) * 20
    else:
        labels = target.long().clamp(max=LOSS_CLASSES - 1)[:, 0]
        good = nn.functional.one_hot(labels, LOSS_CLASSES).movedim(-1, 1).float() * 20
        bad = nn.functional.one_hot((labels + 1) % LOSS_CLASSES, LOSS_CLASSES).movedim(-1, 1).float() * 20
    loss = case.loss()
    v_good, _ = _value_and_grad(case, loss, good, target)
    v_bad, _ = _value_and_grad(case, loss, bad, target)
    _require(v_good < v_bad, case.where, f"a near-perfect prediction scores {v_good.item():.5g}, not lower than a "
             f"wrong one ({v_bad.item():.5g})")


def _loss_deep_supervision(case: _LossCase) -> None:
    """Through ``build_loss(..., n_outputs=3, factory=...)`` with outputs and targets at full, 1/2 and 1/4 size."""
    logits, target = case.data()
    loss = build_loss(**case.kwargs(), n_outputs=3, factory=case.factory)
    steps = [1, 2, 4]
    outs = [logits[(slice(None), slice(None), *(slice(None, None, s),) * case.ndim)] for s in steps]
    targets = [target[(slice(None), slice(None), *(slice(None, None, s),) * case.ndim)] for s in steps]
    _, grads = _value_and_grad(case, loss, outs, targets)
    _require(grads[0].abs().sum() > 0, case.where, "with deep supervision the full-resolution output gets no gradient")


def _loss_modes(label: str, factory: Callable[..., nn.Module]) -> list[bool]:
    """The modes (``regions`` False/True) the loss accepts; it may refuse one with TrainingConfigError."""
    modes = []
    for regions in (False, True):
        try:
            factory(regions=regions, batch_dice=True, ignore_label=None)
        except TrainingConfigError:
            continue
        except Exception as err:  # noqa: BLE001
            raise AssertionError(f"loss {label!r}: factory(regions={regions}, batch_dice=True, ignore_label=None) "
                                 f"raised {_brief(err)}; refuse a mode with TrainingConfigError") from err
        modes.append(regions)
    _require(modes, f"loss {label!r}", "refuses both label and region training")
    return modes


def check_loss(name_or_factory: str | PluginInfo | Callable[..., nn.Module], *,
               params: Mapping[str, Any] | None = None) -> None:
    """Check a loss part against the conventions of :mod:`autoseg.training.losses`.

    For label mode (3 classes, int16 targets ``(B, 1, *sp)``) and region mode (3 regions, float targets plus the
    last ignore channel), each the part accepts (it may refuse one with ``TrainingConfigError``, not both), in 2D
    and 3D, with and without ignore label 3, with and without batch Dice: the loss is a finite scalar; backward
    gives finite, non-zero gradients and none at ignored voxels; changing what lies under ignored voxels changes
    neither the value nor the other gradients; a near-perfect prediction scores lower than a wrong one; and
    ``build_loss(..., n_outputs=3, factory=...)`` works on lists of outputs and targets (full, 1/2, 1/4 size).

    Args:
        name_or_factory: a registered loss's name, a :class:`PluginInfo` of kind ``loss``, or a factory
            ``f(*, regions, batch_dice, ignore_label) -> nn.Module``.
        params: the part's parameters (with a name or PluginInfo).

    Raises:
        AssertionError: the part breaks the contract (the message names it, the case and what failed).
    """
    label, factory = _created("loss", name_or_factory, params)
    _require(callable(factory), f"loss {label!r}", f"build gave a {type(factory).__name__}, not a factory")
    for regions in _loss_modes(label, factory):
        for ndim in (2, 3):
            for ignore in (False, True):
                for batch_dice in (False, True):
                    case = _LossCase(label, factory, regions, ndim, ignore, batch_dice)
                    _loss_basics(case)
                    if ignore:
                        _loss_ignore(case)
                    _loss_ranking(case)
                    _loss_deep_supervision(case)
