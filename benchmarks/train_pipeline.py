"""How fast the training data pipeline is: ms per augmented batch with the CPU worker pipeline (``nnunet_cpu``,
batchgenerators) against the batched torch pipeline (``nnunet``, the default), and how much of a training step waits
for data with the real loader.

    python benchmarks/train_pipeline.py [--device cpu|cuda] [--batches 8] [--epochs 3] [--iters 10] [--workers 1]
                                        [--preset cpu] [--augmentations nnunet nnunet_cpu] [--skip-steps]

Part 1, ms per augmented batch, one CPU thread for both (a worker process of the old pipeline has one thread):
at the demo plan (the demo dataset planned with ``--preset``, 3d_fullres) and at nnU-Net's default brain plan
(patch 40x112x128, batch 2, 4 channels, BraTS regions, deep supervision), on synthetic batches of the initial
(rotation-covering) patch; the new path is timed on ``--device`` too when that is CUDA.

Part 2, the real pipeline: fold 0 of the demo plan trained by ``autoseg.api.train`` with ``--workers`` loader
processes for ``--epochs`` x ``--iters`` iterations (1 validation batch per epoch, no final validation), once per
augmentation. The share of the training time spent waiting for data is read from the run's own ``log.jsonl``: the
seconds the loop blocked on the next batch (``data_wait``) over the seconds of its training iterations
(``train_time``), summed over the epochs after the first (worker start-up). On CUDA, the peak memory of training next
to the planner's estimate.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from autoseg.api import plan, preprocess, train
from autoseg.data.synthetic import make_synthetic_dataset
from autoseg.device import resolve_device
from autoseg.inference.export import LabelLayout
from autoseg.io.dataset import load_dataset
from autoseg.networks.memory import estimate_training_bytes
from autoseg.networks.unet import build_network
from autoseg.training.augmentation import augmentation_params, training_transforms
from autoseg.training.augmentation_presets import nnunet, nnunet_cpu
from autoseg.training.batch_augment import BatchAugmenter
from autoseg.training.components import deep_supervision_scales
from autoseg.training.feeding import CompactBatch
from autoseg.training.loop import TrainingLoop
from autoseg.training.losses import build_loss

BRATS_REGIONS = [(1, 2, 3), (2, 3), (3,)]


def _synthetic(initial, batch: int, channels: int, k: int) -> dict:
    rng = np.random.default_rng(k)
    coarse = rng.choice([0, 0, 1, 2, 3], size=(batch, 1, *[max(1, s // 8) for s in initial]))
    seg = coarse
    for ax in range(len(initial)):
        seg = seg.repeat(8, 2 + ax)
    seg = np.pad(seg, [(0, 0), (0, 0)] + [(0, max(0, s - n)) for s, n in zip(initial, seg.shape[2:])],
                 constant_values=-1)[(slice(None), slice(None), *[slice(0, s) for s in initial])]
    data = rng.normal(size=(batch, channels, *initial)).astype(np.float32)
    return {"data": data, "seg": seg.astype(np.int16), "keys": ["x"] * batch, "seed": 0, "batch_index": k}


def _augment_ms(patch, batch: int, channels: int, ds_scales, n: int, device: torch.device) -> tuple[float, float]:
    """ms per batch: old pipeline (numpy, in this process), new pipeline (torch on ``device``)."""
    aug = augmentation_params(patch)
    old = training_transforms(aug, label_values=None, regions=BRATS_REGIONS, ignore_label=None, ds_scales=ds_scales,
                              mask_channels=(), preset=nnunet_cpu())
    new = BatchAugmenter(aug, nnunet(), regions=BRATS_REGIONS, ignore_label=None, ds_scales=ds_scales)
    batches = [_synthetic(aug.initial_patch_size, batch, channels, k) for k in range(n)]
    t_old = 0.0
    for b in batches:
        np.random.seed(b["batch_index"])
        x = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in b.items()}
        t = time.perf_counter()
        old(**x)
        t_old += time.perf_counter() - t
    t_new = 0.0
    for b in batches:
        x = CompactBatch()(**{k: v.copy() if isinstance(v, np.ndarray) else v for k, v in b.items()})
        x = {k: torch.from_numpy(v).to(device) if isinstance(v, np.ndarray) else v for k, v in x.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        new(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_new += time.perf_counter() - t
    return 1000 * t_old / n, 1000 * t_new / n


def demo_plan(out: Path, preset: str = "cpu"):
    """The demo dataset (generated once under ``out``) planned with ``preset`` and preprocessed (3d_fullres)."""
    root = out / "Dataset001_SyntheticBraTS"
    if not (root / "dataset.json").is_file():
        make_synthetic_dataset(root, n_cases=12, shape=(64, 64, 64), n_channels=4, kind="brats", regions=True, seed=0)
    wd = out / f"work_{preset}"
    plans = plan(root, workdir=wd, preset=preset, progress=False)
    preprocess(root, ["3d_fullres"], workdir=wd, progress=False)
    return root, wd, plans, load_dataset(root)


def training_loop(plans, ds, device: torch.device, folder: Path, *, compile: bool = False):
    """3d_fullres's U-Net, loss and training loop as training builds them (seed 0, AMP on CUDA): (config, label
    layout, deep-supervision scales, loop)."""
    config = plans.configuration("3d_fullres")
    layout = LabelLayout.from_labels(plans.labels, ds.spec.regions_class_order)
    torch.manual_seed(0)
    net = build_network(config, in_channels=len(plans.channel_names), num_classes=layout.num_outputs).to(device)
    scales = deep_supervision_scales(config)
    loss = build_loss(regions=layout.regions is not None, batch_dice=config.batch_dice, ignore_label=None,
                      n_outputs=len(scales))
    loop = TrainingLoop(net, loss, folder=folder, device=device, regions=layout.regions is not None,
                        ignore_label=None, amp=device.type == "cuda", initial_lr=1e-2, weight_decay=3e-5,
                        momentum=0.99, grad_clip=12, compile=compile)
    return config, layout, scales, loop


def data_wait_share(args: argparse.Namespace, root: Path, wd: Path, augmentation: str) -> tuple[float, float]:
    """Train fold 0 with ``augmentation``; from its log.jsonl (epochs after the first): (share of the training time
    blocked on the next batch, seconds per iteration)."""
    folder = wd / "models" / "3d_fullres" / "fold_0"
    shutil.rmtree(folder, ignore_errors=True)
    train(root, "3d_fullres", 0, workdir=wd, epochs=args.epochs, iters_per_epoch=args.iters, val_iters=1,
          workers=args.workers, device=args.device, validate=False, progress=False,
          recipe=(f"augmentation={augmentation}",))
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()][1:]
    train_time = sum(r["train_time"] for r in log)
    return sum(r["data_wait"] for r in log) / train_time, train_time / (len(log) * args.iters)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batches", type=int, default=8, help="batches timed per plan and path (part 1)")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs per augmentation (part 2)")
    ap.add_argument("--iters", type=int, default=10, help="training iterations per epoch (part 2)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--augmentations", nargs="+", default=["nnunet", "nnunet_cpu"], help="trained in part 2")
    ap.add_argument("--skip-steps", action="store_true", help="part 1 only")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/train_pipeline"))
    args = ap.parse_args()
    device = resolve_device(args.device)
    root, wd, plans, ds = demo_plan(args.out, args.preset)
    config = plans.configuration("3d_fullres")
    n_ch = len(plans.channel_names)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print("ms per augmented batch, 1 CPU thread (old = nnunet_cpu on batchgenerators, new = nnunet):")
    brain_ds = [(1.0, 1.0, 1.0), (1.0, 0.5, 0.5), (0.5, 0.25, 0.25), (0.25, 0.125, 0.125), (0.125, 0.0625, 0.0625)]
    for name, patch, bs, ch, ds_scales in (
            ("demo plan", config.patch_size, config.batch_size, n_ch, deep_supervision_scales(config)),
            ("nnU-Net brain plan", (40, 112, 128), 2, 4, brain_ds)):
        old, new = _augment_ms(patch, bs, ch, ds_scales, args.batches, torch.device("cpu"))
        print(f"  {name} (patch {tuple(patch)}, batch {bs}, {ch} channels): old {old:.0f} ms, new {new:.0f} ms, "
              f"{old / new:.1f}x faster", flush=True)
        if device.type == "cuda":
            _, gpu = _augment_ms(patch, bs, ch, ds_scales, args.batches, device)
            print(f"  {name}: new on {torch.cuda.get_device_name(device)}: {gpu:.1f} ms")
    if args.skip_steps:
        return 0
    torch.set_num_threads(threads)
    print(f"training on {device} ({threads} torch threads), demo plan, {args.workers} loader worker(s), "
          f"{args.epochs} x {args.iters} iterations, from log.jsonl (epochs after the first):")
    for augmentation in args.augmentations:
        share, s_iter = data_wait_share(args, root, wd, augmentation)
        print(f"  {augmentation}: {s_iter:.2f} s per iteration, waiting for data {share:.1%} of the training time",
              flush=True)
    if device.type == "cuda":
        planned = estimate_training_bytes(config.topology, config.patch_size, batch_size=config.batch_size,
                                          in_channels=n_ch, num_classes=LabelLayout.from_labels(
                                              plans.labels, ds.spec.regions_class_order).num_outputs)
        peak = torch.cuda.max_memory_allocated(device)
        print(f"CUDA peak memory of training: {peak / 2**30:.2f} GiB, planned {planned / 2**30:.2f} GiB, "
              f"ratio {peak / planned:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
