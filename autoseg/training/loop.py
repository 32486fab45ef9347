"""The training loop of one fold: an optimiser (default SGD with Nesterov momentum) and a learning-rate
schedule stepped once per epoch (default poly, see :mod:`autoseg.training.optim`), Dice+CE with deep
supervision, AMP on CUDA, atomic checkpoints that resume exactly, a JSON-lines log and ``progress.png``.

The loop holds no data-set logic: :mod:`autoseg.training.run` builds the network, loss and batch streams
and hands them over.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from autoseg.networks.checkpoint import FINAL, LATEST, rng_state, save_checkpoint, set_rng_state
from autoseg.training.metrics import pseudo_dice, tp_fp_fn
from autoseg.training.optim import poly, poly_lr, sgd
from autoseg.training.progress import TrainingLog, plot_progress

__all__ = ["LoopState", "TrainingLoop", "poly_lr"]


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, (list, tuple)):
        return [_to(v, device) for v in x]
    return x.to(device, non_blocking=True)


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, (list, tuple)) else x


@dataclass
class LoopState:
    """Everything that changes while training and is saved in a checkpoint."""

    epoch: int = 0  # next epoch to run
    best_ema: float = -math.inf
    ema: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # run description stored in every checkpoint


class TrainingLoop:
    """Runs epochs ``state.epoch .. epochs-1`` of one fold.

    Args:
        network: the model (deep supervision on); may be wrapped in DDP.
        loss: callable ``(outputs, targets) -> loss``.
        folder: the fold's model folder.
        device: where to train.
        regions: region (sigmoid) training.
        ignore_label: label excluded from the pseudo Dice.
        amp: mixed precision (CUDA).
        initial_lr, weight_decay, momentum: the default optimiser's settings (unused with ``optimizer``).
        grad_clip: gradient-norm clipping threshold.
        is_main: this process writes logs and checkpoints (rank 0 under DDP).
        optimizer: the optimiser of ``network``'s parameters (e.g. from
            :data:`~autoseg.training.optim.OPTIMIZERS`); None = SGD with Nesterov momentum from ``initial_lr``,
            ``weight_decay`` and ``momentum``. Its state is saved in every checkpoint.
        schedule: ``schedule(initial_lr, epoch, epochs) -> lr``, applied at the start of every epoch to each
            parameter group with the group's learning rate at construction as ``initial_lr``; None = poly.
    """

    def __init__(self, network: torch.nn.Module, loss: Callable[[Any, Any], torch.Tensor], *, folder: Path,
                 device: torch.device, regions: bool, ignore_label: int | None, amp: bool, initial_lr: float,
                 weight_decay: float, momentum: float, grad_clip: float, is_main: bool = True,
                 optimizer: torch.optim.Optimizer | None = None,
                 schedule: Callable[[float, int, int], float] | None = None) -> None:
        self.network, self.loss, self.folder, self.device = network, loss, folder, device
        self.regions, self.ignore_label, self.amp, self.grad_clip = regions, ignore_label, amp, grad_clip
        self.initial_lr, self.is_main = initial_lr, is_main
        if optimizer is None:
            optimizer = sgd(network.parameters(), lr=initial_lr, weight_decay=weight_decay, momentum=momentum,
                            nesterov=True)
        self.optimizer = optimizer
        self.schedule = schedule if schedule is not None else poly()
        # each group's rate before any schedule step (a restored state_dict holds the last scheduled one)
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" else None
        self.state = LoopState()

    def _module(self) -> torch.nn.Module:
        return getattr(self.network, "module", self.network)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    # ---- checkpoints ---------------------------------------------------------------------------------
    def checkpoint(self, name: str) -> None:
        """Save the full training state as ``name`` in the fold folder (main process only)."""
        if not self.is_main:
            return
        save_checkpoint(self.folder / name, {
            "network": self._module().state_dict(), "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.state.epoch, "best_ema": self.state.best_ema, "ema": self.state.ema,
            "rng": rng_state(), **self.state.extra})

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Continue from a loaded checkpoint."""
        self._module().load_state_dict(ckpt["network"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("grad_scaler"):
            self.scaler.load_state_dict(ckpt["grad_scaler"])
        self.state.epoch = int(ckpt["epoch"])
        self.state.best_ema = float(ckpt.get("best_ema", -math.inf))
        self.state.ema = ckpt.get("ema")
        set_rng_state(ckpt["rng"])

    # ---- steps ---------------------------------------------------------------------------------------
    def train_step(self, batch: dict[str, Any]) -> float:
        """One optimiser step; returns the loss."""
        data, target = _to(batch["data"], self.device), _to(batch["target"], self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.loss(self.network(data), target)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
            self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def val_step(self, batch: dict[str, Any]) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        """Loss and TP/FP/FN per class on one validation batch (highest-resolution output)."""
        data, target = _to(batch["data"], self.device), _to(batch["target"], self.device)
        with self._autocast():
            out = self.network(data)
            loss = self.loss(out, target)
        tp, fp, fn = tp_fp_fn(_first(out).float(), _first(target), regions=self.regions,
                              ignore_label=self.ignore_label)
        return float(loss), tp, fp, fn

    # ---- epochs --------------------------------------------------------------------------------------
    def run(self, train: Iterator[dict[str, Any]], val: Iterator[dict[str, Any]], *, epochs: int,
            iters_per_epoch: int, val_iters: int, save_every: int, log: TrainingLog,
            progress: bool = True) -> None:
        """Train until ``epochs``; checkpoint every ``save_every`` epochs and at the end (``FINAL``)."""
        while self.state.epoch < epochs:
            epoch = self.state.epoch
            start = time.perf_counter()
            lrs = [self.schedule(base, epoch, epochs) for base in self.base_lrs]
            for group, group_lr in zip(self.optimizer.param_groups, lrs, strict=True):
                group["lr"] = group_lr
            lr = lrs[0]
            self.network.train()
            bar = tqdm(range(iters_per_epoch), desc=f"epoch {epoch}", leave=False,
                       disable=not (progress and self.is_main))
            train_losses = [self.train_step(next(train)) for _ in bar]
            self.network.eval()
            val_losses, sums = [], None
            for _ in range(val_iters):
                vl, tp, fp, fn = self.val_step(next(val))
                val_losses.append(vl)
                stats = np.stack([tp, fp, fn])
                sums = stats if sums is None else sums + stats
            dice = pseudo_dice(*sums) if sums is not None else np.array([])
            mean_dice = float(np.nanmean(dice)) if dice.size and not np.all(np.isnan(dice)) else math.nan
            if not math.isnan(mean_dice):
                self.state.ema = mean_dice if self.state.ema is None else 0.9 * self.state.ema + 0.1 * mean_dice
            self.state.epoch = epoch + 1
            record = {"epoch": epoch, "train_loss": float(np.mean(train_losses)) if train_losses else None,
                      "val_loss": float(np.mean(val_losses)) if val_losses else None,
                      "pseudo_dice": [None if math.isnan(d) else round(float(d), 5) for d in dice],
                      "mean_fg_dice": None if math.isnan(mean_dice) else mean_dice, "ema_fg_dice": self.state.ema,
                      "lr": lr, "epoch_time": time.perf_counter() - start}
            if self.is_main:
                log.append(record)
                plot_progress(log, self.folder / "progress.png")
                if self.state.ema is not None and self.state.ema > self.state.best_ema:
                    self.state.best_ema = self.state.ema
                if self.state.epoch == epochs:
                    self.checkpoint(FINAL)
                    (self.folder / LATEST).unlink(missing_ok=True)
                elif self.state.epoch % save_every == 0:
                    self.checkpoint(LATEST)
