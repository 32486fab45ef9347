"""The phases of ``benchmarks/gpu_race.sh``: autoseg against nnU-Net v2 on one GPU, same data, same plan.

    python benchmarks/gpu_race.py --out DIR [--device cuda] [--nnunet-python PY] [--tiny]

Phases, each adding to DIR/results.json and DIR/results.md as soon as it ends:

1. ``data``: a synthetic 4-channel BraTS-like dataset (3 nested regions) and a 1-channel CT-like one (blob lesions)
   in the nnU-Net raw layout; autoseg plans them with nnU-Net's rules (preset ``default``) and preprocesses
   3d_fullres; nnU-Net (when its Python is given and imports nnunetv2) plans and preprocesses its own copy.
2. ``autoseg_gpu_only``: steady-state iterations/s of autoseg's training step (compiled on CUDA, as training does) on one batch already on the device
   (no data pipeline), and the peak device memory of a step against the planner's estimate.
3. ``autoseg_pipeline``: steady-state iterations/s with the real pipeline: workers that read and crop, the feeding
   thread, ``nnunet`` augmentation on the device.
4. ``bf16_check``: loss and outputs of one batch in float32 and under bf16 autocast: the relative differences.
5. ``nnunet``: nnU-Net v2's iterations/s at its own plan of the same data (12 augmentation workers, compiled), from
   its training log (epoch time / iterations, first epoch left out).

``--tiny`` (a CPU dry run) uses 4 cases of 24^3, the ``cpu`` preset's smaller U-Net, a 16^3 patch, batch 2 and
one timed step; the race 10 cases of
128^3 per dataset, 20 warm-up and 60 timed steps per autoseg measurement, 3 nnU-Net epochs of 40 iterations.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import nnunet_layout  # noqa: E402
from train_pipeline import training_loop  # noqa: E402

from autoseg.api import plan, preprocess  # noqa: E402
from autoseg.data.synthetic import make_synthetic_dataset  # noqa: E402
from autoseg.io.dataset import load_dataset  # noqa: E402
from autoseg.networks.memory import estimate_training_bytes  # noqa: E402
from autoseg.planner.plans import load_plans  # noqa: E402
from autoseg.training.augmentation import augmentation_params  # noqa: E402
from autoseg.training.augmentation_presets import nnunet  # noqa: E402
from autoseg.training.batch_augment import BatchAugmenter  # noqa: E402
from autoseg.training.batch_stream import BatchStream  # noqa: E402
from autoseg.training.dataloader import CaseStore, PatchLoader  # noqa: E402
from autoseg.training.feeding import CompactBatch, DeviceFeeder  # noqa: E402
from autoseg.training.loop import TrainingLoop  # noqa: E402

DATASETS = {"brats4": ("brats", 4, True), "ct1": ("binary", 1, False)}
TRAINER = '''
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_Race(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = {epochs}
        self.num_iterations_per_epoch = {iters}
        self.num_val_iterations_per_epoch = 2

    def perform_actual_validation(self, save_probabilities: bool = False):
        pass  # the race measures training; the full-volume validation is left out
'''


class Results:
    """results.json / results.md, rewritten after every phase."""

    def __init__(self, out: Path, device: str) -> None:
        self.out, self.data = out, {"device": device, "phases": {}}

    def add(self, phase: str, values: dict) -> None:
        self.data["phases"][phase] = values
        (self.out / "results.json").write_text(json.dumps(self.data, indent=1, default=str))
        lines = [f"# GPU race on {self.data['device']}", ""]
        for name, vals in self.data["phases"].items():
            lines += [f"## {name}", ""] + [f"- {k}: {v}" for k, v in vals.items()] + [""]
        (self.out / "results.md").write_text("\n".join(lines))
        print(f"[{phase}] {json.dumps(values, default=str)}", flush=True)


def _data(args: argparse.Namespace) -> dict:
    out = {}
    for name, (kind, channels, regions) in DATASETS.items():
        root = args.out / "raw" / f"Dataset00{1 + len(out)}_{name}"
        if not (root / "dataset.json").is_file():
            make_synthetic_dataset(root, n_cases=args.cases, shape=(args.shape,) * 3, n_channels=channels, kind=kind,
                                   regions=regions, seed=0)
        sets = [f"3d_fullres.patch_size={','.join([str(args.patch)] * 3)}", "3d_fullres.batch_size=2"] \
            if args.tiny else []
        wd = args.out / f"autoseg_{name}"
        plan(root, workdir=wd, preset="cpu" if args.tiny else "default", progress=False, overrides=sets or None)
        preprocess(root, ["3d_fullres"], workdir=wd, progress=False)
        out[name] = {"raw": str(root), "nnunet": _nnunet_prepare(args, root, 990 + len(out)) if args.nnunet_python
                     else "skipped (no --nnunet-python)"}
    return out


def _nnunet_env(args: argparse.Namespace, root: Path, did: int) -> dict[str, str]:
    env, _ = nnunet_layout(root, args.out / "nnunet", dataset_id=did)
    env.update({"nnUNet_compile": "true", "nnUNet_n_proc_DA": str(args.nnunet_workers)})
    env.pop("OMP_NUM_THREADS", None)
    return env


def _nnunet_prepare(args: argparse.Namespace, root: Path, did: int) -> str:
    env = _nnunet_env(args, root, did)
    done = subprocess.run([args.nnunet_python, "-m", "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints",
                           "-d", str(did), "-c", "3d_fullres", "-np", "4", "-npfp", "4"], env=env,
                          capture_output=True, text=True)
    return "planned and preprocessed" if done.returncode == 0 else f"failed: {done.stderr[-500:]}"


def _setup(args: argparse.Namespace, name: str, device: torch.device):
    wd = args.out / f"autoseg_{name}"
    plans = load_plans(wd / "plans.json")
    ds = load_dataset(next((args.out / "raw").glob(f"Dataset*_{name}")))
    # the step training runs: compiled on CUDA (TrainSettings.compile "auto")
    config, layout, scales, loop = training_loop(plans, ds, device, args.out, compile=device.type == "cuda")
    aug = augmentation_params(config.patch_size)
    augmenter = BatchAugmenter(aug, nnunet(), regions=layout.regions, ignore_label=None, ds_scales=scales)
    loader = PatchLoader(CaseStore(wd / "preprocessed" / config.data_identifier, [c.case_id for c in ds.cases]),
                         patch_size=aug.initial_patch_size, final_patch_size=config.patch_size,
                         batch_size=config.batch_size, seed=0)
    return plans, config, layout, loop, augmenter, loader


def _steady(loop: TrainingLoop, batches, warmup: int, steps: int, device: torch.device) -> float:
    for _ in range(warmup):
        loop._step(next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        loop._step(next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t)


def _autoseg(args: argparse.Namespace, name: str, device: torch.device, results: Results) -> None:
    plans, config, layout, loop, augmenter, loader = _setup(args, name, device)
    first = DeviceFeeder(BatchStream(loader, CompactBatch(), workers=0), device, transform=augmenter)
    batch = next(first)
    first.close()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def same():
        while True:
            yield batch

    gpu_only = _steady(loop, same(), args.warmup, args.steps, device)
    planned = estimate_training_bytes(config.topology, config.patch_size, batch_size=config.batch_size,
                                      in_channels=len(plans.channel_names), num_classes=layout.num_outputs)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    results.add(f"autoseg_gpu_only[{name}]", {
        "patch": config.patch_size, "batch": config.batch_size, "compiled": device.type == "cuda",
        "it_per_s": round(gpu_only, 3),
        "peak_bytes": peak, "planned_bytes": planned,
        "peak_over_planned": round(peak / planned, 3) if peak else "n/a (no CUDA)"})
    stream = DeviceFeeder(BatchStream(loader, CompactBatch(), workers=args.workers), device, transform=augmenter)
    try:
        real = _steady(loop, stream, args.warmup, args.steps, device)
    finally:
        stream.close()
    results.add(f"autoseg_pipeline[{name}]", {"it_per_s": round(real, 3), "workers": args.workers,
                                              "share_waiting_for_data": round(max(0.0, 1 - real / gpu_only), 3)})
    _bf16(loop, batch, device, name, results)


def _bf16(loop: TrainingLoop, batch: dict, device: torch.device, name: str, results: Results) -> None:
    net = loop.network.eval()
    with torch.no_grad():
        out32 = net(batch["data"])
        loss32 = float(loop.loss(out32, batch["target"]))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out16 = net(batch["data"])
            loss16 = float(loop.loss(out16, batch["target"]))
    a, b = out32[0].float(), out16[0].float()
    results.add(f"bf16_check[{name}]", {
        "loss_fp32": round(loss32, 6), "loss_bf16": round(loss16, 6),
        "loss_rel_diff": round(abs(loss16 - loss32) / max(abs(loss32), 1e-12), 6),
        "output_rel_l2": round(float((a - b).norm() / a.norm().clamp(min=1e-12)), 6)})


def _nnunet(args: argparse.Namespace, name: str, did: int, results: Results) -> None:
    env = _nnunet_env(args, Path(json.loads((args.out / "results.json").read_text())["phases"]["data"][name]["raw"]),
                      did)
    pkg = subprocess.run([args.nnunet_python, "-c", "import nnunetv2, os; print(os.path.dirname(nnunetv2.__file__))"],
                         capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
    (Path(pkg) / "training" / "nnUNetTrainer" / "nnUNetTrainer_Race.py").write_text(
        TRAINER.format(epochs=args.nnunet_epochs, iters=args.nnunet_iters))
    t = time.perf_counter()
    done = subprocess.run([args.nnunet_python, "-m", "nnunetv2.run.run_training", str(did), "3d_fullres", "0", "-tr",
                           "nnUNetTrainer_Race", "-device", args.device.split(":")[0]], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    logs = list((args.out / "nnunet" / "nnUNet_results").rglob("training_log_*.txt"))
    times = [float(line.split("Epoch time:")[1].split()[0]) for log in logs for line in log.read_text().splitlines()
             if "Epoch time:" in line][1:]
    results.add(f"nnunet[{name}]", {
        "returncode": done.returncode, "wall_s": round(wall, 1), "workers": args.nnunet_workers, "compiled": True,
        "it_per_s": round(args.nnunet_iters / float(np.median(times)), 3) if times else "n/a",
        "note": "epoch time includes 2 validation iterations" if times else done.stderr[-500:]})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--nnunet-python", default=None, help="a Python that imports nnunetv2 (none: skip nnU-Net)")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: tiny data, patch and step counts")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tiny = args.tiny
    args.cases, args.shape, args.patch = (4, 24, 16) if tiny else (10, 128, 0)
    args.warmup, args.steps = (1, 1) if tiny else (20, 60)
    args.workers = 0 if tiny else min(12, max(1, (os.cpu_count() or 2) - 2))
    args.nnunet_workers = 2 if tiny else 12
    args.nnunet_epochs, args.nnunet_iters = (2, 2) if tiny else (3, 40)
    device = torch.device(args.device)
    results = Results(args.out, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    results.add("data", _data(args))
    for name in DATASETS:
        _autoseg(args, name, device, results)
    for k, name in enumerate(DATASETS):
        if args.nnunet_python:
            _nnunet(args, name, 990 + k, results)
        else:
            results.add(f"nnunet[{name}]", {"skipped": "no --nnunet-python that imports nnunetv2"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
