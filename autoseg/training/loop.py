"""The training loop of one fold: an optimiser (default SGD with Nesterov momentum) and a learning-rate
schedule stepped once per epoch (default poly, see :mod:`autoseg.training.optim`), Dice+CE with deep
supervision, AMP on CUDA, atomic checkpoints that resume exactly, a JSON-lines log and ``progress.png``.

The loop holds no data-set logic: :mod:`autoseg.training.run` builds the network, loss and batch streams
and hands them over.

Preemption: while :meth:`TrainingLoop.run` runs, SIGTERM and SIGUSR1 (what SLURM sends before it kills a job; the
handlers in place before are restored afterwards) ask the loop to stop. It finishes the iteration under way, writes
``checkpoint_latest.pt`` with the full state at that point (rank 0 only) and raises
:class:`~autoseg.errors.TrainingInterrupted` (the CLI's exit status 75). The checkpoint stores the epoch, the
training iterations done in it and their losses, and the RNG states after the last one; since batch ``k`` of a
stream is a function of ``(seed, k)`` alone, a resumed run positioned at batch ``epoch * iters + iteration``
continues exactly: the same losses and weights as a run never interrupted. A signal during the epoch's online
validation stops it (validation changes no state) and the resumed run validates that epoch again from its first
batch. Under DDP the processes agree on the iteration to stop at (a one-value all-reduce per iteration).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from autoseg.errors import TrainingInterrupted
from autoseg.networks.checkpoint import FINAL, LATEST, rng_state, save_checkpoint, set_rng_state
from autoseg.networks.error_head import gradient_groups
from autoseg.parallel import WorkerError
from autoseg.training.metrics import pseudo_dice, tp_fp_fn
from autoseg.training.optim import poly, poly_lr, sgd
from autoseg.training.preemption import PREEMPTION_SIGNALS, PreemptionSignals
from autoseg.training.progress import TrainingLog, plot_progress
from autoseg.training.tracking import Tracker

__all__ = ["PREEMPTION_SIGNALS", "LoopState", "PreemptionSignals", "TrainingLoop", "poly_lr"]

#: training losses are read from the device every this many steps (and at the end of an epoch or a stop)
LOSS_READ_EVERY = 16


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, (list, tuple)):
        return [_to(v, device) for v in x]
    return x.to(device, non_blocking=True)


def _read_losses(pending: list[torch.Tensor], into: list[float]) -> None:
    """Append the losses waiting on the device to ``into`` as floats (one transfer) and empty ``pending``."""
    if pending:
        into.extend(float(v) for v in torch.stack(pending).float().cpu().tolist())
        pending.clear()


def _clip_gradients(network: torch.nn.Module, max_norm: float) -> None:
    """Clip the gradient norm of each group separately: an error head's gradients never rescale the
    segmentation's (see :func:`autoseg.networks.error_head.gradient_groups`)."""
    for group in gradient_groups(network):
        torch.nn.utils.clip_grad_norm_(group, max_norm)


def _loss_extra(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """What a batch hands the loss besides outputs and targets: partially annotated datasets' ``annotated``
    (:class:`~autoseg.training.losses.partial.PartialLabelLoss`)."""
    if "annotated" not in batch:
        return {}
    return {"annotated": torch.as_tensor(batch["annotated"], dtype=torch.bool).to(device)}


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, (list, tuple)) else x


@dataclass
class LoopState:
    """Everything that changes while training and is saved in a checkpoint."""

    epoch: int = 0  # next epoch to run
    iteration: int = 0  # training iterations of ``epoch`` already done (a preempted run's checkpoint)
    train_losses: list[float] = field(default_factory=list)  # their losses
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
        amp_dtype: its type: ``torch.float16`` (with a gradient scaler) or ``torch.bfloat16`` (no scaler).
        initial_lr, weight_decay, momentum: the default optimiser's settings (unused with ``optimizer``).
        grad_clip: gradient-norm clipping threshold.
        is_main: this process writes logs and checkpoints (rank 0 under DDP).
        optimizer: the optimiser of ``network``'s parameters (e.g. from
            :data:`~autoseg.training.optim.OPTIMIZERS`); None = SGD with Nesterov momentum from ``initial_lr``,
            ``weight_decay`` and ``momentum``. Its state is saved in every checkpoint.
        schedule: ``schedule(initial_lr, epoch, epochs) -> lr``, applied at the start of every epoch to each
            parameter group with the group's learning rate at construction as ``initial_lr``; None = poly.
        compile: run the network's and the loss's forward through ``torch.compile`` (compiled at the first step).
            ``network`` itself stays the eager module: checkpoints hold its own state (no ``_orig_mod.`` keys).
    """

    def __init__(self, network: torch.nn.Module, loss: Callable[[Any, Any], torch.Tensor], *, folder: Path,
                 device: torch.device, regions: bool, ignore_label: int | None, amp: bool, initial_lr: float,
                 weight_decay: float, momentum: float, grad_clip: float, is_main: bool = True,
                 optimizer: torch.optim.Optimizer | None = None,
                 schedule: Callable[[float, int, int], float] | None = None,
                 amp_dtype: torch.dtype = torch.float16, compile: bool = False) -> None:
        self.network, self.loss, self.folder, self.device = network, loss, folder, device
        # what the steps call: the compiled wrappers share the modules' parameters, state_dict stays the module's
        self._forward, self._loss = (torch.compile(network), torch.compile(loss)) if compile else (network, loss)
        self.amp_dtype = amp_dtype
        self.regions, self.ignore_label, self.amp, self.grad_clip = regions, ignore_label, amp, grad_clip
        self.initial_lr, self.is_main = initial_lr, is_main
        if optimizer is None:
            optimizer = sgd(network.parameters(), lr=initial_lr, weight_decay=weight_decay, momentum=momentum,
                            nesterov=True)
        self.optimizer = optimizer
        self.schedule = schedule if schedule is not None else poly()
        # each group's rate before any schedule step (a restored state_dict holds the last scheduled one)
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        use_scaler = amp and device.type == "cuda" and amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.state = LoopState()
        self.tracker: Tracker = Tracker()  # set by run()
        self._signals: PreemptionSignals | None = None

    def _module(self) -> torch.nn.Module:
        return getattr(self.network, "module", self.network)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    # ---- checkpoints ---------------------------------------------------------------------------------
    def checkpoint(self, name: str) -> None:
        """Save the full training state as ``name`` in the fold folder (main process only)."""
        if not self.is_main:
            return
        # inside an epoch (preemption): where in it, and the losses so far; epoch-end checkpoints are as before
        partial = {"iteration": self.state.iteration, "train_losses": list(self.state.train_losses)} \
            if self.state.iteration else {}
        save_checkpoint(self.folder / name, {
            "network": self._module().state_dict(), "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.state.epoch, **partial, "best_ema": self.state.best_ema, "ema": self.state.ema,
            "rng": rng_state(), **self.state.extra})
        self.tracker.on_checkpoint(self.folder / name)

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Continue from a loaded checkpoint: its weights, optimiser state (momentum buffers) and learning rate; the
        optimiser's other settings (momentum, weight decay, ...) stay this run's, as it was built."""
        self._module().load_state_dict(ckpt["network"])
        configured = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                      for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group, own in zip(self.optimizer.param_groups, configured, strict=True):
            group.update(own)
        if self.scaler is not None and ckpt.get("grad_scaler"):
            self.scaler.load_state_dict(ckpt["grad_scaler"])
        self.state.epoch = int(ckpt["epoch"])
        self.state.iteration = int(ckpt.get("iteration", 0))
        self.state.train_losses = [float(v) for v in ckpt.get("train_losses", [])]
        self.state.best_ema = float(ckpt.get("best_ema", -math.inf))
        self.state.ema = ckpt.get("ema")
        set_rng_state(ckpt["rng"])

    # ---- steps ---------------------------------------------------------------------------------------
    def train_step(self, batch: dict[str, Any]) -> float:
        """One optimiser step; returns the loss."""
        return float(self._step(batch))

    def _step(self, batch: dict[str, Any]) -> torch.Tensor:
        """One optimiser step; returns the loss as a tensor on the device (reading it would wait for the step)."""
        data, target = _to(batch["data"], self.device), _to(batch["target"], self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self._loss(self._forward(data), target, **_loss_extra(batch, self.device))
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            _clip_gradients(self.network, self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            _clip_gradients(self.network, self.grad_clip)
            self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def val_step(self, batch: dict[str, Any]) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        """Loss and TP/FP/FN per class on one validation batch (highest-resolution output)."""
        data, target = _to(batch["data"], self.device), _to(batch["target"], self.device)
        with self._autocast():
            out = self._forward(data)
            loss = self._loss(out, target, **_loss_extra(batch, self.device))
        tp, fp, fn = tp_fp_fn(_first(out).float(), _first(target), regions=self.regions,
                              ignore_label=self.ignore_label)
        return float(loss), tp, fp, fn

    # ---- preemption -----------------------------------------------------------------------------------
    def _stop_requested(self) -> bool:
        """Whether a preemption signal arrived (under DDP: at any process, so that all stop at the same point)."""
        requested = self._signals is not None and self._signals.received is not None
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([1 if requested else 0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
        return requested

    def _interrupt(self, iters_per_epoch: int, epochs: int) -> TrainingInterrupted:
        """Save the state reached as ``checkpoint_latest.pt`` (a finished run has its ``FINAL`` already) and
        return the error that ends training."""
        st = self.state
        done = st.epoch >= epochs
        path = self.folder / (FINAL if done else LATEST)
        if not done:
            self.checkpoint(LATEST)
        received = self._signals.received if self._signals is not None else None
        by = signal.Signals(received).name if received is not None else "a signal to another DDP process"
        where = "after its last epoch, before the final validation" if done else \
            f"at epoch {st.epoch}, iteration {min(st.iteration, iters_per_epoch)} of {iters_per_epoch}"
        saved = f"the full state is in {path}" if self.is_main else "rank 0 saved the full state"
        return TrainingInterrupted(f"training of {self.folder} stopped by {by} {where}; {saved}. Rerun the same "
                                   "command with --resume to continue exactly where it stopped (exit status 75: "
                                   "requeue the job).", signal=received, checkpoint=path if self.is_main else None,
                                   epoch=st.epoch, iteration=st.iteration)

    def _next_batch(self, stream: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
        """The next batch (None: a stop was asked for and the stream's worker ended with the signal).

        The preemption signals are blocked meanwhile: data-loading workers that the stream starts inherit the mask
        and so survive a signal sent to the whole process group (they end with the stream); a signal arriving
        meanwhile is handled right after.
        """
        blocked = self._signals.installed if self._signals is not None and hasattr(signal, "pthread_sigmask") else []
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked) if blocked else None
        try:
            return next(stream)
        except WorkerError:
            if self._signals is not None and self._signals.received is not None:
                return None  # a worker ended by the signal all the same (no signal masks here): the stop wins
            raise
        finally:
            if old is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    # ---- epochs --------------------------------------------------------------------------------------
    def run(self, train: Iterator[dict[str, Any]], val: Iterator[dict[str, Any]], *, epochs: int,
            iters_per_epoch: int, val_iters: int, save_every: int, log: TrainingLog,
            progress: bool = True, tracker: Tracker | None = None) -> None:
        """Train until ``epochs``; checkpoint every ``save_every`` epochs and at the end (``FINAL``).

        ``tracker`` gets each epoch's record and each checkpoint written (main process only). A run restored from a
        preempted checkpoint continues inside its epoch: ``train`` must then start at batch
        ``epoch * iters_per_epoch + state.iteration`` and ``val`` at ``epoch * val_iters``.

        Raises:
            TrainingInterrupted: SIGTERM or SIGUSR1 arrived; the state reached is saved (module docstring).
        """
        self.tracker = tracker if tracker is not None and self.is_main else Tracker()
        with PreemptionSignals() as signals:
            self._signals = signals
            try:
                while self.state.epoch < epochs:
                    record = self._epoch(train, val, epochs=epochs, iters=iters_per_epoch, val_iters=val_iters,
                                         progress=progress)
                    if record is None:
                        raise self._interrupt(iters_per_epoch, epochs)
                    self._end_epoch(record, log, epochs=epochs, save_every=save_every)
                if self._stop_requested():  # it came during the last epoch's validation or writes
                    raise self._interrupt(iters_per_epoch, epochs)
            finally:
                self._signals = None

    def _epoch(self, train: Iterator[dict[str, Any]], val: Iterator[dict[str, Any]], *, epochs: int, iters: int,
               val_iters: int, progress: bool) -> dict[str, Any] | None:
        """Train (from ``state.iteration`` on) and validate one epoch; returns its record, or None when a
        preemption signal stopped it (``state`` then holds the iterations done)."""
        epoch, st = self.state.epoch, self.state
        start = time.perf_counter()
        lrs = [self.schedule(base, epoch, epochs) for base in self.base_lrs]
        for group, group_lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = group_lr
        t_train = time.perf_counter()
        data_wait = self._train(train, iters, progress)
        if data_wait is None:
            return None
        t_train = time.perf_counter() - t_train
        val_losses, dice = self._validate(val, val_iters)
        if val_losses is None:  # validation changes nothing: the resumed run validates this epoch again
            return None
        mean_dice = float(np.nanmean(dice)) if dice.size and not np.all(np.isnan(dice)) else math.nan
        if not math.isnan(mean_dice):
            st.ema = mean_dice if st.ema is None else 0.9 * st.ema + 0.1 * mean_dice
        train_losses = st.train_losses
        st.epoch, st.iteration, st.train_losses = epoch + 1, 0, []
        return {"epoch": epoch, "train_loss": float(np.mean(train_losses)) if train_losses else None,
                "val_loss": float(np.mean(val_losses)) if val_losses else None,
                "pseudo_dice": [None if math.isnan(d) else round(float(d), 5) for d in dice],
                "mean_fg_dice": None if math.isnan(mean_dice) else mean_dice, "ema_fg_dice": st.ema,
                "lr": lrs[0], "epoch_time": time.perf_counter() - start, "train_time": t_train,
                "data_wait": data_wait}

    def _train(self, train: Iterator[dict[str, Any]], iters: int, progress: bool) -> float | None:
        """The epoch's training iterations from ``state.iteration`` on. Returns the seconds spent blocked on the
        next batch (the step waiting for data), or None when a preemption signal stopped them (after a finished
        iteration)."""
        st = self.state
        self.network.train()
        first, waited = min(st.iteration, iters), 0.0
        pending: list[torch.Tensor] = []  # losses read every LOSS_READ_EVERY steps: no wait for the device per step
        for _ in tqdm(range(first, iters), desc=f"epoch {st.epoch}", leave=False, initial=first, total=iters,
                      disable=not (progress and self.is_main)):
            asked = time.perf_counter()
            batch = None if self._stop_requested() else self._next_batch(train)
            waited += time.perf_counter() - asked
            if batch is None:
                _read_losses(pending, st.train_losses)
                return None
            pending.append(self._step(batch))
            st.iteration += 1
            if len(pending) >= LOSS_READ_EVERY:
                _read_losses(pending, st.train_losses)
        _read_losses(pending, st.train_losses)
        st.iteration = max(st.iteration, iters)
        return waited

    def _validate(self, val: Iterator[dict[str, Any]], val_iters: int) -> tuple[list[float] | None, np.ndarray]:
        """The epoch's online validation: its losses (None when a preemption signal stopped it) and the pseudo
        Dice per class."""
        self.network.eval()
        val_losses, sums = [], None
        for _ in range(val_iters):
            batch = None if self._stop_requested() else self._next_batch(val)
            if batch is None:
                return None, np.array([])
            vl, tp, fp, fn = self.val_step(batch)
            val_losses.append(vl)
            stats = np.stack([tp, fp, fn])
            sums = stats if sums is None else sums + stats
        return val_losses, pseudo_dice(*sums) if sums is not None else np.array([])

    def _end_epoch(self, record: dict[str, Any], log: TrainingLog, *, epochs: int, save_every: int) -> None:
        """Log the epoch, tell the tracker, and checkpoint (main process only)."""
        if not self.is_main:
            return
        log.append(record)
        self.tracker.on_epoch_end(record)
        plot_progress(log, self.folder / "progress.png")
        if self.state.ema is not None and self.state.ema > self.state.best_ema:
            self.state.best_ema = self.state.ema
        if self.state.epoch == epochs:
            self.checkpoint(FINAL)
            (self.folder / LATEST).unlink(missing_ok=True)
        elif self.state.epoch % save_every == 0:
            self.checkpoint(LATEST)

