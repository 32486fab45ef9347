"""Shared benchmark helpers: run a command and measure its wall time and the peak RSS of its process tree,
and lay a raw dataset out where nnU-Net v2 finds it."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float
    returncode: int
    output: str


def _tree_rss_kb(root: int) -> int:
    """Sum of VmRSS over ``root`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as f:
                ppid, kb = 0, 0
                for line in f:
                    if line.startswith("PPid:"):
                        ppid = int(line.split()[1])
                    elif line.startswith("VmRSS:"):
                        kb = int(line.split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(d))
        rss[int(d)] = kb
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def run_measured(cmd: list[str], *, env: dict[str, str] | None = None, poll: float = 0.05) -> Run:
    """Run ``cmd``; return wall seconds, peak RSS (MB) of its whole process tree and its output."""
    log = Path(tempfile.gettempdir()) / f"bench_{os.getpid()}_{time.monotonic_ns()}.log"
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _tree_rss_kb(proc.pid))
            time.sleep(poll)
    seconds = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    log.unlink()
    return Run(seconds, peak / 1024, proc.returncode, text)


def nnunet_layout(dataset: Path, work: Path, dataset_id: int = 999) -> tuple[dict[str, str], int]:
    """Link ``dataset`` into ``work/nnUNet_raw/Dataset{id}_{name}``; return the env vars nnU-Net needs."""
    raw = work / "nnUNet_raw" / f"Dataset{dataset_id:03d}_{dataset.name.replace('_', '')[:40] or 'X'}"
    raw.mkdir(parents=True, exist_ok=True)
    for item in dataset.iterdir():
        link = raw / item.name
        if not link.exists():
            link.symlink_to(item.resolve())
    env = dict(os.environ)
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / key).mkdir(exist_ok=True)
        env[key] = str(work / key)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env, dataset_id


def synthetic_dataset(dest: Path, n_cases: int, size: int, seed: int = 0) -> Path:
    """A BraTS-like 4-channel synthetic dataset of ``n_cases`` cases of ``size``³ voxels."""
    from autoseg.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(dest, n_cases=n_cases, shape=(size, size, size), seed=seed)
