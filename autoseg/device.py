"""Where and how computations run: one :class:`Runtime` record, built once and passed down.

It holds the device, the mixed-precision policy, determinism and the process's place in a ``torchrun`` job
(rank, world size). It is the only place that reads torchrun's environment (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``) or decides between CUDA, MPS and the CPU::

    >>> rt = Runtime.create("cpu", amp=False)
    >>> (rt.device.type, rt.amp, rt.rank, rt.world_size)
    ('cpu', False, 0, 1)

Mixed precision has one policy, :func:`default_amp`: fp16 on CUDA for training and prediction; on the CPU,
bf16 for prediction where the processor computes it natively (float32 training on a CPU is faster).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import torch

from autoseg.errors import TrainingError

Purpose = Literal["training", "inference"]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if available, else MPS, else CPU; other names are checked.

    Raises:
        TrainingError: the requested device is not available.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise TrainingError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or mps.") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was requested but torch sees no CUDA GPU (this torch build: "
                            f"{torch.__version__}); use --device cpu, or install a CUDA build of torch.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise TrainingError("--device mps was requested but MPS is not available; use --device cpu.")
    return dev


def fast_bf16_cpu() -> bool:
    """True when this CPU computes bfloat16 natively (AMX or AVX512-BF16), where bf16 autocast is ~2-3x faster.

    Elsewhere bf16 is emulated and slower than float32, so automatic mixed precision stays off.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def default_amp(device: torch.device, purpose: Purpose) -> bool:
    """Whether mixed precision is on when the user did not say: CUDA always; the CPU only to predict, and only
    where bf16 is native."""
    if device.type == "cuda":
        return True
    return purpose == "inference" and device.type == "cpu" and fast_bf16_cpu()


def resolve_amp(amp: bool | None, device: torch.device, purpose: Purpose = "inference") -> bool:
    """``amp`` if given, else :func:`default_amp`."""
    return bool(amp) if amp is not None else default_amp(device, purpose)


def distributed_environment(env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment; (0, 0, 1) without it."""
    env = os.environ if env is None else env
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def is_main_process(env: Mapping[str, str] | None = None) -> bool:
    """False in the torchrun processes other than rank 0 (which alone write shared files and report)."""
    return distributed_environment(env)[0] == 0


@dataclass(frozen=True)
class Runtime:
    """How this process computes.

    Attributes:
        device: where tensors live (for torchrun on CUDA, this process's GPU).
        amp: mixed precision (fp16 on CUDA, bf16 on the CPU); accumulation and losses stay float32.
        deterministic: deterministic algorithms (bit-identical runs for the same seed).
        rank: this process's rank under torchrun (0 otherwise).
        local_rank: its rank on this machine.
        world_size: processes in the job (1 without torchrun).
    """

    device: torch.device
    amp: bool = False
    deterministic: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def create(cls, device: str | torch.device = "auto", *, amp: bool | None = None, deterministic: bool = False,
               purpose: Purpose = "inference", env: Mapping[str, str] | None = None) -> Runtime:
        """Resolve a device name, the precision policy and the torchrun position (no process group is joined).

        ``deterministic`` turns mixed precision off for inference, so the same inputs give the same files.

        Raises:
            TrainingError: the requested device is not available.
        """
        rank, local_rank, world = distributed_environment(env)
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        if world > 1 and dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
        if deterministic and purpose == "inference":
            amp = False
        return cls(dev, resolve_amp(amp, dev, purpose), deterministic, rank, local_rank, world)

    @property
    def is_main(self) -> bool:
        """Whether this process writes shared files and reports (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether this is one process of a multi-process (DDP) job."""
        return self.world_size > 1

    def with_amp(self, amp: bool) -> Runtime:
        """The same runtime with mixed precision switched."""
        return replace(self, amp=bool(amp))

    def start(self) -> Runtime:
        """Join the torchrun process group (NCCL on CUDA, else gloo) and apply the determinism switches.

        Returns:
            ``self``, for chaining.
        """
        if self.distributed:
            import torch.distributed as dist

            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        return self


def barrier() -> None:
    """Wait for every DDP process (no-op outside torchrun)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
