"""How much the data pipeline slows training: step time with the real loader + augmentation workers vs with
one pre-made batch, plus measured vs planned memory of a step (CUDA peak memory when run on a GPU).

    python benchmarks/train_pipeline.py [--device cpu|cuda] [--steps 20] [--workers N] [--preset cpu|default]

Uses the demo dataset (made under benchmarks/out/ if missing), planned with ``--preset``, 3d_fullres.
Prints one figure per line: iterations/s with the real pipeline, iterations/s with a pre-made batch, the
share of step time spent waiting for data (1 - premade/real), and on CUDA the measured peak memory of a
step next to ``estimate_training_bytes``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from autoseg.api import plan, preprocess
from autoseg.data.synthetic import make_synthetic_dataset
from autoseg.device import resolve_device
from autoseg.inference.export import LabelLayout
from autoseg.io.dataset import load_dataset
from autoseg.networks.memory import estimate_training_bytes
from autoseg.networks.unet import build_network
from autoseg.training.augmentation import augmentation_params, training_transforms
from autoseg.training.components import deep_supervision_scales
from autoseg.training.dataloader import BatchStream, CaseStore, PatchLoader
from autoseg.training.loop import TrainingLoop
from autoseg.training.losses import build_loss
from autoseg.training.settings import TrainSettings


def _timed(loop: TrainingLoop, batches, steps: int, device: torch.device) -> float:
    for _ in range(3):  # warm-up (cudnn autotuning, worker start)
        loop.train_step(next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        loop.train_step(next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/train_pipeline"))
    args = ap.parse_args()
    root = args.out / "Dataset001_SyntheticBraTS"
    if not (root / "dataset.json").is_file():
        make_synthetic_dataset(root, n_cases=12, shape=(64, 64, 64), n_channels=4, kind="brats", regions=True, seed=0)
    wd = args.out / f"work_{args.preset}"
    plans = plan(root, workdir=wd, preset=args.preset, progress=False)
    preprocess(root, ["3d_fullres"], workdir=wd, progress=False)
    ds = load_dataset(root)
    config = plans.configuration("3d_fullres")
    device = resolve_device(args.device)
    layout = LabelLayout.from_labels(plans.labels, ds.spec.regions_class_order)
    net = build_network(config, in_channels=len(plans.channel_names), num_classes=layout.num_outputs).to(device)
    scales = deep_supervision_scales(config)
    loss = build_loss(regions=layout.regions is not None, batch_dice=config.batch_dice, ignore_label=None,
                      n_outputs=len(scales))
    amp = device.type == "cuda"
    loop = TrainingLoop(net, loss, folder=args.out, device=device, regions=layout.regions is not None,
                        ignore_label=None, amp=amp, initial_lr=1e-2, weight_decay=3e-5, momentum=0.99, grad_clip=12)
    aug = augmentation_params(config.patch_size)
    transform = training_transforms(aug, label_values=None, regions=layout.regions, ignore_label=None,
                                     ds_scales=scales, mask_channels=[i for i, n in enumerate(config.normalization)
                                                                      if n.use_mask])
    workers = TrainSettings(workers=args.workers).resolved_workers(device.type)
    loader = PatchLoader(CaseStore(wd / "preprocessed" / "3d_fullres", [c.case_id for c in ds.cases]),
                         patch_size=aug.initial_patch_size, final_patch_size=config.patch_size,
                         batch_size=config.batch_size, seed=0)
    stream = BatchStream(loader, transform, workers=workers, pin_memory=device.type == "cuda")
    try:
        real = _timed(loop, stream, args.steps, device)
        batch = next(stream)
    finally:
        stream.close()

    def same():
        while True:
            yield batch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    premade = _timed(loop, same(), args.steps, device)
    print(f"device {device}, preset {args.preset}, patch {config.patch_size}, batch {config.batch_size}, "
          f"{workers} augmentation workers")
    print(f"real pipeline: {real:.2f} it/s")
    print(f"pre-made batch: {premade:.2f} it/s")
    print(f"share of step time waiting for data: {max(0.0, 1 - real / premade):.0%}")
    planned = estimate_training_bytes(config.topology, config.patch_size, batch_size=config.batch_size,
                                      in_channels=len(plans.channel_names), num_classes=layout.num_outputs)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        print(f"CUDA peak memory of a step: {peak / 2**30:.2f} GiB, planned estimate {planned / 2**30:.2f} GiB, "
              f"ratio {peak / planned:.2f}")
    else:
        print(f"planned estimate of a mixed-precision GPU step: {planned / 2**30:.2f} GiB (no GPU to compare)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
