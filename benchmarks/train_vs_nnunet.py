"""Train fold 0 of the same dataset with autoseg and with nnU-Net v2, same epochs and iterations, on CPU.

    python benchmarks/train_vs_nnunet.py [DATASET] [--epochs 10] [--iters 25] [--val-iters 5] [--preset cpu]
    python benchmarks/train_vs_nnunet.py --same-plan [--augmentation nnunet_cpu] --epochs 2 --iters 10

Without DATASET the demo's synthetic BraTS-like dataset (12 cases, 64^3, 4 channels, 3 regions) is made.
Both tools use the same fold-0 split (autoseg's ``splits.json`` is handed to nnU-Net as ``splits_final.json``)
and each tool's own plan (autoseg: ``--preset``; nnU-Net: its default 3d_fullres plan). nnU-Net's epochs and
iterations are set the way its users do it, with a small trainer subclass (nnU-Net has no CLI flag for them).
Prints per tool: wall time per epoch (median), total wall time of the training command, peak RSS and the final
validation Dice (mean over foreground classes/regions, full volumes), then the ratios. Then autoseg trains
again with as many more epochs as fit in nnU-Net's wall time (the goal: Dice >= nnU-Net's at <= its wall time).

``--same-plan`` plans autoseg with the ``default`` preset (nnU-Net's rules: the same patch, batch and U-Net as
nnU-Net's own plan) and prints the seconds per training iteration of both (median epoch time / iterations, the
epoch's validation batches included) and their ratio; ``--augmentation`` picks autoseg's augmentation part.
It then times the bare training step of both (forward, loss, backward, clipping, SGD; one pre-made batch of the
plan's patch with labels 0-3, no data pipeline; ``--step-iters`` timed steps after 2 warm-up steps, one process at a time), so a
gap in seconds per iteration can be told apart into the step and the data pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import nnunet_layout, run_measured  # noqa: E402

TRAINER = '''
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_AutosegBench(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = {epochs}
        self.num_iterations_per_epoch = {iters}
        self.num_val_iterations_per_epoch = {val_iters}
'''


NNUNET_STEP = '''
import json, os, sys, time, torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
pre, n = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(os.cpu_count())  # as nnUNetv2_train does on the CPU
plans, dj = json.load(open(pre + "/nnUNetPlans.json")), json.load(open(pre + "/dataset.json"))
plans["continue_training"] = False
trainer = nnUNetTrainer(plans, "3d_fullres", 0, dj, device=torch.device("cpu"))
trainer.initialize()
patch, batch = trainer.configuration_manager.patch_size, trainer.configuration_manager.batch_size
g = torch.Generator().manual_seed(0)
heads, regions = trainer.label_manager.num_segmentation_heads, trainer.label_manager.has_regions
shapes = [[int(round(p * f)) for p, f in zip(patch, s)] for s in trainer._get_deep_supervision_scales()]
target = [(torch.rand(batch, heads, *s, generator=g) > 0.7).float() if regions
          else torch.randint(0, heads, (batch, 1, *s), generator=g).float() for s in shapes]
step = {"data": torch.randn(batch, len(dj["channel_names"]), *patch, generator=g), "target": target}
for _ in range(2):
    trainer.train_step(step)
t = time.perf_counter()
for _ in range(n):
    trainer.train_step(step)
print("STEP", (time.perf_counter() - t) / n)
'''


def _autoseg_step(dataset: Path, out: Path, n: int) -> float:
    """Seconds per bare training step of autoseg's 3d_fullres loop on one pre-made augmented batch."""
    import time

    import numpy as np
    import torch
    from train_pipeline import _synthetic, training_loop

    from autoseg.io.dataset import load_dataset
    from autoseg.planner.plans import Plans
    from autoseg.training.augmentation import augmentation_params
    from autoseg.training.augmentation_presets import nnunet
    from autoseg.training.batch_augment import BatchAugmenter
    from autoseg.training.feeding import CompactBatch

    plans = Plans.load(out / "autoseg_work" / "plans.json")
    config, layout, scales, loop = training_loop(plans, load_dataset(dataset), torch.device("cpu"), out / "step_only")
    aug = augmentation_params(config.patch_size)
    raw = CompactBatch()(**_synthetic(aug.initial_patch_size, config.batch_size, len(plans.channel_names), 0))
    step = BatchAugmenter(aug, nnunet(), regions=layout.regions, ignore_label=None, ds_scales=scales)(
        {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in raw.items()})
    for _ in range(2):
        loop.train_step(step)
    t = time.perf_counter()
    for _ in range(n):
        loop.train_step(step)
    return (time.perf_counter() - t) / n


def _nnunet_step(out: Path, args: argparse.Namespace) -> float:
    """Seconds per bare training step of nnU-Net's own trainer (its network, loss and optimiser) at its plan."""
    pre = next((out / "nnunet" / "nnUNet_preprocessed").glob(f"Dataset{args.nnunet_id:03d}_*"))
    script = out / "nnunet_step.py"
    script.write_text(NNUNET_STEP)
    env, _ = nnunet_layout(Path(args.dataset_used), out / "nnunet", dataset_id=args.nnunet_id)
    env["OMP_NUM_THREADS"] = str(os.cpu_count())
    run = run_measured([str(args.nnunet_venv.resolve() / "bin" / "python"), str(script), str(pre),
                        str(args.step_iters)], env=env)
    lines = [ln for ln in run.output.splitlines() if ln.startswith("STEP ")]
    if run.returncode or not lines:
        raise SystemExit(run.output[-4000:])
    return float(lines[-1].split()[1])


def _autoseg(dataset: Path, out: Path, args: argparse.Namespace, epochs: int | None = None) -> dict:
    epochs = epochs or args.epochs
    work = out / "autoseg_work"
    shutil.rmtree(work / "models", ignore_errors=True)
    py = [sys.executable, "-m", "autoseg", "-q"]
    plan = run_measured(py + ["plan", str(dataset), "--workdir", str(work), "--preset", args.preset, "-j", "2"])
    if plan.returncode:
        raise SystemExit(plan.output)
    run = run_measured(py + ["train", str(dataset), "3d_fullres", "0", "--workdir", str(work), "--device", "cpu",
                             "--epochs", str(epochs), "--iters-per-epoch", str(args.iters),
                             "--val-iters", str(args.val_iters), "--recipe", f"augmentation={args.augmentation}"])
    if run.returncode:
        raise SystemExit(run.output)
    fold = work / "models" / "3d_fullres" / "fold_0"
    epochs = [json.loads(line)["epoch_time"] for line in (fold / "log.jsonl").read_text().splitlines()]
    summary = json.loads((fold / "val" / "summary.json").read_text())
    return {"epoch_s": statistics.median(epochs), "train_s": run.seconds, "rss_mb": run.peak_rss_mb,
            "dice": summary["mean_foreground_dice"], "per_class": summary["mean"],
            "splits": work / "splits.json", "plan_s": plan.seconds}


def _nnunet(dataset: Path, out: Path, splits: Path, args: argparse.Namespace) -> dict:
    work = out / "nnunet"
    shutil.rmtree(work / "nnUNet_results", ignore_errors=True)
    env, did = nnunet_layout(dataset, work, dataset_id=args.nnunet_id)
    env.pop("OMP_NUM_THREADS", None)  # let nnU-Net choose its threads as its users get them
    bin_dir = args.nnunet_venv.resolve() / "bin"
    py = str(bin_dir / "python")
    pkg = Path(run_measured([py, "-c", "import nnunetv2, os; print(os.path.dirname(nnunetv2.__file__))"],
                            env=env).output.strip().splitlines()[-1])
    (pkg / "training" / "nnUNetTrainer" / "nnUNetTrainer_AutosegBench.py").write_text(
        TRAINER.format(epochs=args.epochs, iters=args.iters, val_iters=args.val_iters))
    prep = run_measured([str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", str(did), "-c", "3d_fullres",
                         "-np", "2", "-npfp", "2"], env=env)
    if prep.returncode:
        raise SystemExit(prep.output)
    name = next((work / "nnUNet_preprocessed").glob(f"Dataset{did:03d}_*"))
    shutil.copy(splits, name / "splits_final.json")
    run = run_measured([str(bin_dir / "nnUNetv2_train"), str(did), "3d_fullres", "0", "-tr",
                        "nnUNetTrainer_AutosegBench", "-device", "cpu"], env=env)
    if run.returncode:
        raise SystemExit(run.output[-4000:])
    fold = next((work / "nnUNet_results").glob(f"Dataset{did:03d}_*/nnUNetTrainer_AutosegBench__*/fold_0"))
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    log = next(fold.glob("training_log_*.txt")).read_text().splitlines()
    epochs = [float(line.split("Epoch time:")[1].split()[0]) for line in log if "Epoch time:" in line]
    return {"epoch_s": statistics.median(epochs) if epochs else float("nan"), "train_s": run.seconds,
            "rss_mb": run.peak_rss_mb, "dice": summary["foreground_mean"]["Dice"],
            "per_class": {k: v["Dice"] for k, v in summary["mean"].items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", nargs="?", type=Path, help="raw dataset folder (nnU-Net v2 layout)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--iters", type=int, default=25, help="training iterations per epoch")
    ap.add_argument("--val-iters", type=int, default=5, help="online validation iterations per epoch")
    ap.add_argument("--preset", default="cpu", help="autoseg planner preset (default cpu)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/train_vs_nnunet"))
    ap.add_argument("--nnunet-venv", type=Path, default=Path(".nnunet-venv"))
    ap.add_argument("--nnunet-id", type=int, default=991)
    ap.add_argument("--skip-nnunet", action="store_true")
    ap.add_argument("--same-plan", action="store_true", help="autoseg plans with nnU-Net's rules (preset default)")
    ap.add_argument("--augmentation", default="nnunet",
                    help="autoseg's augmentation part (nnunet: on the training device; nnunet_cpu: CPU workers)")
    ap.add_argument("--step-iters", type=int, default=6, help="timed bare steps per tool (--same-plan)")
    ap.add_argument("--no-equal-time", action="store_true", help="skip the equal-wall-time autoseg run")
    args = ap.parse_args()
    if args.same_plan:
        args.preset, args.no_equal_time = "default", True
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = args.dataset
    if dataset is None:
        from autoseg.data.synthetic import make_synthetic_dataset

        dataset = args.out / "Dataset001_SyntheticBraTS"
        if not (dataset / "dataset.json").is_file():
            make_synthetic_dataset(dataset, n_cases=12, shape=(64, 64, 64), n_channels=4, kind="brats",
                                   regions=True, n_test=2, seed=0)
    dataset = dataset.resolve()
    args.dataset_used = dataset
    print(f"dataset {dataset.name}, fold 0, {args.epochs} epochs x {args.iters} iterations "
          f"(+{args.val_iters} validation), CPU, {os.cpu_count()} cores")
    ours = _autoseg(dataset, args.out, args)
    print(f"autoseg  ({args.preset} preset): {ours['epoch_s']:.1f} s/epoch, train command {ours['train_s']:.0f} s, "
          f"peak RSS {ours['rss_mb']:.0f} MB, validation Dice {ours['dice']:.4f} {ours['per_class']}")
    if args.skip_nnunet:
        return 0
    theirs = _nnunet(dataset, args.out, ours["splits"], args)
    print(f"nnU-Net v2 (default plan): {theirs['epoch_s']:.1f} s/epoch, train command {theirs['train_s']:.0f} s, "
          f"peak RSS {theirs['rss_mb']:.0f} MB, validation Dice {theirs['dice']:.4f} {theirs['per_class']}")
    print(f"ratio nnU-Net/autoseg epoch time: {theirs['epoch_s'] / ours['epoch_s']:.2f}x")
    if args.same_plan:
        print(f"same plan, seconds per iteration: autoseg ({args.augmentation}) {ours['epoch_s'] / args.iters:.2f}, "
              f"nnU-Net {theirs['epoch_s'] / args.iters:.2f}, autoseg/nnU-Net {ours['epoch_s'] / theirs['epoch_s']:.2f}")
        mine, nn = _autoseg_step(dataset, args.out, args.step_iters), _nnunet_step(args.out, args)
        print(f"same plan, bare training step (pre-made batch, no data pipeline): autoseg {mine:.2f} s, "
              f"nnU-Net {nn:.2f} s, autoseg/nnU-Net {mine / nn:.2f}")
    print(f"ratio nnU-Net/autoseg train command wall time: {theirs['train_s'] / ours['train_s']:.2f}x")
    print(f"ratio nnU-Net/autoseg peak RSS: {theirs['rss_mb'] / ours['rss_mb']:.2f}x")
    print(f"Dice difference autoseg - nnU-Net at equal iterations: {ours['dice'] - theirs['dice']:+.4f}")
    factor = int(theirs["train_s"] // ours["train_s"])
    if factor >= 2 and not args.no_equal_time:
        more = _autoseg(dataset, args.out, args, epochs=args.epochs * factor)
        print(f"autoseg with {args.epochs * factor} epochs (within nnU-Net's wall time): train command "
              f"{more['train_s']:.0f} s ({more['train_s'] / theirs['train_s']:.2f}x nnU-Net's), validation Dice "
              f"{more['dice']:.4f} {more['per_class']}")
        print(f"Dice difference autoseg - nnU-Net at no more wall time: {more['dice'] - theirs['dice']:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
