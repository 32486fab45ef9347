"""Training settings: every knob is a parameter with a default (no subclass per setting)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from autoseg.device import Runtime
from autoseg.errors import TrainingConfigError
from autoseg.training.modality_dropout import check_modality_dropout
from autoseg.training.tracking import parse_trackers


@dataclass(frozen=True)
class TrainSettings:
    """How a fold is trained. ``None`` means "the plan's default" (epochs, iterations) or "automatic".

    Attributes:
        epochs: training epochs (plan default: 1000, the cpu preset 250).
        iters_per_epoch: training iterations per epoch (plan default 250 / cpu 100).
        val_iters: online-validation iterations per epoch (plan default 50 / cpu 20).
        initial_lr: SGD learning rate at epoch 0, decayed as ``(1 - epoch / epochs) ** 0.9``.
        weight_decay: SGD weight decay.
        momentum: SGD Nesterov momentum.
        grad_clip: gradient-norm clipping threshold.
        save_every: write ``checkpoint_latest.pt`` every this many epochs.
        workers: data-loading worker processes, which read and crop (and augment, with ``nnunet_cpu``) (None: half
            the CPU cores on CPU, up to 8 on a GPU, at most one per 2 GiB of free memory; 0 = none).
        device: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        deterministic: deterministic torch algorithms (bit-identical CPU runs for the same seed).
        amp: mixed precision (None: on for CUDA).
        amp_dtype: the mixed-precision type on CUDA: ``float16`` (with a gradient scaler, the default) or
            ``bfloat16`` (no scaler needed: float32's range).
        compile: ``torch.compile`` the network and the loss: ``auto`` (on for CUDA with Triton installed, off
            elsewhere: on a CPU the compiled step measured no faster, ``benchmarks/compile_step.py``), ``on`` or
            ``off``.
        save_probabilities: final validation also writes probabilities (``.npz``) for ensembling.
        validate: run the full-volume validation of the held-out cases at the end.
        step_size: sliding-window step of the final validation (fraction of the patch).
        progress: show progress bars.
        modality_dropout: probability per input channel per training sample that the channel is blanked
            (set to 0, its mean after normalisation), so the model learns to cope with a missing sequence
            (predict with ``missing``). Never all channels of a sample; needs >= 2 channels; 0 = off.
        init_from: fine-tuning: start from the matching weights of this checkpoint file, fold folder, work
            folder or bundle (see :mod:`autoseg.training.transfer`); ignored when resuming.
        recipe: recipe overrides for this run, e.g. ``("optimizer=adamw:lr=3e-4", "schedule=cosine:warmup=50")``
            (:mod:`autoseg.planner.recipe`), applied on top of the configuration's planned recipe.
        log_to: experiment trackers, from ``csv``, ``tensorboard`` and ``mlflow`` (a comma-separated string is
            accepted too); see :mod:`autoseg.training.tracking`. Their packages are checked when training starts.

    Raises:
        TrainingConfigError: ``modality_dropout`` is not in [0, 1), ``log_to`` names an unknown tracker, or
            ``amp_dtype`` is neither ``float16`` nor ``bfloat16``, or ``compile`` is not auto, on or off.
    """

    epochs: int | None = None
    iters_per_epoch: int | None = None
    val_iters: int | None = None
    initial_lr: float = 1e-2
    weight_decay: float = 3e-5
    momentum: float = 0.99
    grad_clip: float = 12.0
    save_every: int = 5
    workers: int | None = None
    device: str = "auto"
    deterministic: bool = False
    amp: bool | None = None
    amp_dtype: str = "float16"
    compile: str = "auto"
    save_probabilities: bool = False
    validate: bool = True
    step_size: float = 0.5
    progress: bool = True
    modality_dropout: float = 0.0
    init_from: str | None = None
    recipe: tuple[str, ...] = ()
    log_to: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "modality_dropout", check_modality_dropout(self.modality_dropout))
        if self.init_from is not None:  # a Path would make the checkpoint unloadable with weights_only=True
            object.__setattr__(self, "init_from", os.fspath(self.init_from))
        object.__setattr__(self, "recipe", (self.recipe,) if isinstance(self.recipe, str) else tuple(self.recipe))
        object.__setattr__(self, "log_to", parse_trackers(self.log_to))
        if self.amp_dtype not in ("float16", "bfloat16"):
            raise TrainingConfigError(f"amp_dtype={self.amp_dtype!r} is not valid; valid: 'float16' (default, with a "
                                      "gradient scaler) or 'bfloat16'.")
        if self.compile not in ("auto", "on", "off"):
            raise TrainingConfigError(f"compile={self.compile!r} is not valid; valid: 'auto' (on for CUDA), 'on' or "
                                      "'off'.")

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)

    def runtime(self) -> Runtime:
        """The :class:`~autoseg.device.Runtime` these settings ask for (device, mixed precision, determinism).

        Raises:
            TrainingError: the device is not available.
        """
        return Runtime.create(self.device, amp=self.amp, deterministic=self.deterministic, purpose="training")

    def resolved_compile(self, device_type: str) -> bool:
        """Whether to ``torch.compile`` on a device type (``auto``: on CUDA, where Triton, which compiles the GPU
        kernels, is installed)."""
        return self.compile == "on" or (self.compile == "auto" and device_type == "cuda" and _triton_installed())

    def resolved_workers(self, device_type: str) -> int:
        """Worker count to use on a device type: from the cores (all but one, at most 8, on a GPU; half of them on
        the CPU), and at most one per 2 GiB of free memory (a worker holds a few batches of the initial patch)."""
        if self.workers is not None:
            return max(0, int(self.workers))
        cores = os.cpu_count() or 1
        by_cores = min(8, max(1, cores - 1)) if device_type == "cuda" else max(1, cores // 2)
        return max(1, min(by_cores, _free_memory_bytes() // (2 * 2**30)))


def _triton_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _free_memory_bytes() -> int:
    """Memory available to new processes (Linux: ``MemAvailable``; a large number where the platform does not say)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 2**62
