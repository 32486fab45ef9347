"""Optimisers and learning-rate schedules by name: the tables :data:`OPTIMIZERS` and :data:`SCHEDULES`.

**Optimisers** are built by a factory called as ``factory(parameters, settings, **tunables)``:

- ``parameters`` (positional): what to optimise, e.g. ``network.parameters()``;
- ``settings`` (positional, optional): the :class:`~autoseg.training.settings.TrainSettings` whose
  ``initial_lr``, ``momentum`` and ``weight_decay`` fill the tunables left at None (None = the default
  settings). ``sgd`` uses them; ``adamw`` has its own defaults (its rate and decay suit Adam, not SGD);
- the tunables: the factory's keyword-only parameters, each with a typed default
  (``inspect.signature(factory, eval_str=True)`` lists them); the first docstring line describes the factory.

``sgd(parameters, settings)`` is exactly the optimiser the training loop has always used:
``torch.optim.SGD(parameters, lr=settings.initial_lr, weight_decay=settings.weight_decay,
momentum=settings.momentum, nesterov=True)``. Both optimisers use torch's default implementation (a for-loop
on the CPU, ``foreach`` on CUDA): the ``fused`` kernels differ from it in the last bits on the CPU (measured
with torch 2.13: ~5e-10 after five SGD steps), so a recipe's losses would no longer reproduce bit for bit.

**Schedules** are small frozen callables ``schedule(initial_lr, epoch, epochs) -> lr``; the loop calls one
at the start of every epoch for each parameter group, with that group's learning rate at construction as
``initial_lr``. ``poly`` (the default) is ``initial_lr * (1 - epoch / epochs) ** 0.9``.

Example:
    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> opt = OPTIMIZERS["adamw"](net.parameters(), lr=1e-3)
    >>> schedule = SCHEDULES["cosine"](warmup=2)
    >>> [round(schedule(1e-3, e, 10), 6) for e in (0, 1, 2, 10)]
    [0.000333, 0.000667, 0.001, 0.0]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from autoseg.errors import TrainingConfigError
from autoseg.registry import check_number
from autoseg.training.settings import TrainSettings

__all__ = ["OPTIMIZERS", "SCHEDULES", "Constant", "Cosine", "Poly", "Schedule", "adamw", "constant", "cosine",
           "poly", "poly_lr", "sgd"]

#: ``schedule(initial_lr, epoch, epochs) -> learning rate`` of that epoch.
Schedule = Callable[[float, int, int], float]




def _integer(kind: str, part: str, param: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise TrainingConfigError(f"{kind} {part!r}: {param}={value!r} is not valid; valid: an integer >= {low}.")
    return int(value)


def _flag(kind: str, part: str, param: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TrainingConfigError(f"{kind} {part!r}: {param}={value!r} is not valid; valid: True or False.")
    return value


# ---- optimisers ----------------------------------------------------------------------------------------------
def sgd(params: Iterable[Any], settings: TrainSettings | None = None, /, *, lr: float | None = None,
        momentum: float | None = None, weight_decay: float | None = None, nesterov: bool = True
        ) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum: nnU-Net's optimiser and the default (rate, momentum, decay from the settings).

    Parameters all on CUDA get the fused implementation (one kernel for the whole update). ``lr``, ``momentum`` and
    ``weight_decay`` left at None take the training settings' ``initial_lr``,
    ``momentum`` and ``weight_decay`` (defaults 1e-2, 0.99, 3e-5). ``lr > 0``, ``0 <= momentum < 1``
    (``> 0`` with ``nesterov``), ``weight_decay >= 0``.

    Raises:
        TrainingConfigError: a parameter out of range.
    """
    s = settings if settings is not None else TrainSettings()
    lr = check_number("optimizer", "sgd", "lr", s.initial_lr if lr is None else lr, lambda v: v > 0, "a number > 0")
    momentum = check_number("optimizer", "sgd", "momentum", s.momentum if momentum is None else momentum,
                       lambda v: 0 <= v < 1, "0 <= momentum < 1")
    weight_decay = check_number("optimizer", "sgd", "weight_decay", s.weight_decay if weight_decay is None else weight_decay,
                           lambda v: v >= 0, "a number >= 0")
    if _flag("optimizer", "sgd", "nesterov", nesterov) and momentum == 0:
        raise TrainingConfigError("optimizer 'sgd': momentum=0 with nesterov=True is not valid; valid: momentum > 0 "
                                  "for Nesterov momentum (or nesterov=False).")
    params = list(params)
    on_cuda = bool(params) and all(isinstance(p, torch.Tensor) and p.is_cuda for p in params)
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                           fused=True if on_cuda else None)


def adamw(params: Iterable[Any], settings: TrainSettings | None = None, /, *, lr: float = 3e-4,
          weight_decay: float = 1e-2, beta1: float = 0.9, beta2: float = 0.999) -> torch.optim.Optimizer:
    """AdamW (Adam with decoupled weight decay), a common choice for transformer networks.

    Its own defaults (``lr`` 3e-4, ``weight_decay`` 1e-2), not the SGD-oriented training settings, which it
    ignores. ``lr > 0``, ``weight_decay >= 0``, ``0 <= beta1, beta2 < 1``.

    Raises:
        TrainingConfigError: a parameter out of range.
    """
    del settings  # same calling convention as sgd; AdamW's defaults differ from the SGD settings
    lr = check_number("optimizer", "adamw", "lr", lr, lambda v: v > 0, "a number > 0")
    weight_decay = check_number("optimizer", "adamw", "weight_decay", weight_decay, lambda v: v >= 0, "a number >= 0")
    beta1 = check_number("optimizer", "adamw", "beta1", beta1, lambda v: 0 <= v < 1, "0 <= beta1 < 1")
    beta2 = check_number("optimizer", "adamw", "beta2", beta2, lambda v: 0 <= v < 1, "0 <= beta2 < 1")
    return torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)


#: Optimiser name -> factory ``factory(parameters, settings=None, /, **tunables)``; the tunables are the
#: keyword-only parameters (``inspect.signature(factory, eval_str=True)``).
class ProximalSGD(torch.optim.SGD):
    """SGD whose gradients get ``mu * (w - w0)``, ``w0`` the weights at the first step: the gradient of FedProx's
    proximal term ``mu/2 |w - w0|^2``, which keeps a site's local training near the global weights it started from."""

    def __init__(self, params: Iterable[Any], *, mu: float, **options: Any) -> None:
        super().__init__(params, **options)
        self.mu = mu
        self._anchor: list[torch.Tensor] | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        params = [p for group in self.param_groups for p in group["params"]]
        if self._anchor is None:
            self._anchor = [p.detach().clone() for p in params]
        for p, anchor in zip(params, self._anchor, strict=True):
            if p.grad is not None:
                p.grad.add_(p - anchor, alpha=self.mu)
        return super().step(closure)


def fedprox(params: Iterable[Any], settings: TrainSettings | None = None, /, *, mu: float = 0.01,
            lr: float | None = None, momentum: float | None = None, weight_decay: float | None = None
            ) -> torch.optim.Optimizer:
    """:func:`sgd` (Nesterov) plus FedProx's proximal term towards the weights training started from (``mu >= 0``);
    what ``autoseg federated --strategy fedprox`` trains the sites with."""
    mu = check_number("optimizer", "fedprox", "mu", mu, lambda v: v >= 0, "a number >= 0")
    base = sgd(params, settings, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return ProximalSGD(base.param_groups, mu=mu, **base.defaults)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"sgd": sgd, "adamw": adamw, "fedprox": fedprox}


# ---- schedules -----------------------------------------------------------------------------------------------
def poly_lr(initial_lr: float, epoch: int, epochs: int, exponent: float = 0.9) -> float:
    """``initial_lr * (1 - epoch / epochs) ** exponent`` (stepped once per epoch)."""
    return initial_lr * (1 - min(epoch, epochs) / epochs) ** exponent


@dataclass(frozen=True)
class Poly:
    """Polynomial decay to 0 at ``epochs`` (:func:`poly_lr`)."""

    exponent: float = 0.9

    def __call__(self, initial_lr: float, epoch: int, epochs: int) -> float:
        return poly_lr(initial_lr, epoch, epochs, self.exponent)


@dataclass(frozen=True)
class Cosine:
    """Linear warm-up over ``warmup`` epochs, then half a cosine from ``initial_lr`` to ``min_lr`` at ``epochs``."""

    warmup: int = 0
    min_lr: float = 0.0

    def __call__(self, initial_lr: float, epoch: int, epochs: int) -> float:
        if self.warmup >= epochs:
            raise TrainingConfigError(f"schedule 'cosine': warmup={self.warmup} is out of range for a training of "
                                      f"{epochs} epochs; valid: 0 <= warmup < epochs.")
        if self.min_lr > initial_lr:
            raise TrainingConfigError(f"schedule 'cosine': min_lr={self.min_lr} is out of range; valid: "
                                      f"0 <= min_lr <= the initial learning rate ({initial_lr}).")
        epoch = min(epoch, epochs)
        if epoch < self.warmup:
            return initial_lr * (epoch + 1) / (self.warmup + 1)
        t = (epoch - self.warmup) / (epochs - self.warmup)
        return self.min_lr + (initial_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class Constant:
    """The initial learning rate in every epoch."""

    def __call__(self, initial_lr: float, epoch: int, epochs: int) -> float:
        return initial_lr


def poly(*, exponent: float = 0.9) -> Schedule:
    """Polynomial decay ``initial_lr * (1 - epoch / epochs) ** exponent``: nnU-Net's schedule and the default.

    ``exponent > 0`` (1 is linear decay; larger values decay sooner).

    Raises:
        TrainingConfigError: ``exponent`` out of range.
    """
    return Poly(check_number("schedule", "poly", "exponent", exponent, lambda v: v > 0, "a number > 0"))


def cosine(*, warmup: int = 0, min_lr: float = 0.0) -> Schedule:
    """Linear warm-up for ``warmup`` epochs, then cosine decay from the initial rate to ``min_lr``.

    Warm-up epoch ``e < warmup`` uses ``initial_lr * (e + 1) / (warmup + 1)`` (so it starts at
    ``initial_lr / (warmup + 1)`` and never at 0); from epoch ``warmup`` on,
    ``min_lr + (initial_lr - min_lr) * (1 + cos(pi * (e - warmup) / (epochs - warmup))) / 2``, which is
    ``initial_lr`` at ``e = warmup`` and would reach ``min_lr`` at ``e = epochs`` (the last trained epoch,
    ``epochs - 1``, is just above it, as with ``poly``). ``warmup >= 0`` and, once the training length is
    known, ``< epochs``; ``0 <= min_lr <=`` the initial rate.

    Raises:
        TrainingConfigError: a parameter out of range (``warmup >= epochs`` and ``min_lr`` above the initial rate
            when the schedule is first used).
    """
    return Cosine(_integer("schedule", "cosine", "warmup", warmup, 0),
                  check_number("schedule", "cosine", "min_lr", min_lr, lambda v: v >= 0, "a number >= 0"))


def constant() -> Schedule:
    """No decay: the initial learning rate in every epoch (e.g. for short fine-tuning runs)."""
    return Constant()


#: Schedule name -> factory; every parameter is keyword-only with a typed default.
SCHEDULES: dict[str, Callable[..., Schedule]] = {"poly": poly, "cosine": cosine, "constant": constant}
