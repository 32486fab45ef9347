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
    peak_rss_mb: float  # sum of RSS over the process tree (counts pages shared between processes repeatedly)
    returncode: int
    output: str
    peak_pss_mb: float = 0.0  # sum of proportional set sizes (shared pages split between their processes)


def _tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def _tree_pss_kb(root: int) -> int:
    """Sum of Pss over ``root`` and its descendants (``/proc/PID/smaps_rollup``; Linux >= 4.14)."""
    total = 0
    for pid in _tree_pids(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("Pss:")), 0)
        except OSError:
            continue
    return total


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


def run_measured(cmd: list[str], *, env: dict[str, str] | None = None, poll: float = 0.05,
                 pss: bool = False) -> Run:
    """Run ``cmd``; return wall seconds, peak RSS (MB) of its whole process tree and its output.

    ``pss`` also samples the tree's proportional set size every 4th poll (fairer for multi-process tools,
    whose workers share torch's pages; slower to read)."""
    log = Path(tempfile.gettempdir()) / f"bench_{os.getpid()}_{time.monotonic_ns()}.log"
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak, peak_pss, n = 0, 0, 0
        while proc.poll() is None:
            peak = max(peak, _tree_rss_kb(proc.pid))
            if pss and n % 4 == 0:
                peak_pss = max(peak_pss, _tree_pss_kb(proc.pid))
            n += 1
            time.sleep(poll)
    seconds = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    log.unlink()
    return Run(seconds, peak / 1024, proc.returncode, text, peak_pss / 1024)


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


def small_3d_plans(plans):  # type: ignore[no-untyped-def]
    """Only 3d_fullres, as a 4-stage 8-64 feature U-Net on a 32^3 patch (quick CPU training for benchmarks)."""
    import dataclasses

    from autoseg.networks.topology import UNetTopology

    cfg = plans.configuration("3d_fullres")
    topo = UNetTopology(strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)), kernel_sizes=((3, 3, 3),) * 4,
                        features_per_stage=(8, 16, 32, 64), n_blocks_per_stage=(1, 1, 1, 1),
                        n_conv_per_stage_decoder=(1, 1, 1), block=cfg.topology.block)
    cfg = dataclasses.replace(cfg, patch_size=(32, 32, 32), topology=topo, batch_size=2)
    return dataclasses.replace(plans, configurations={"3d_fullres": cfg})
