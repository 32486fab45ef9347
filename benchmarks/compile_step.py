"""Is ``torch.compile`` worth it for a training step? ms per step, eager against compiled, at the demo plan.

The demo dataset planned with ``--preset`` (3d_fullres, as ``benchmarks/train_pipeline.py`` plans it; the cpu preset:
56^3 patch, batch 2, 4 channels, 16-128 features, 3 regions with deep supervision) gives the U-Net, the loss and one
augmented batch (synthetic data of the plan's shapes). The training loop steps it eagerly and then compiled
(``TrainingLoop(compile=True)``, what ``TrainSettings(compile="on")`` trains with: network and loss through
``torch.compile``, default mode). Prints the time of the first compiled steps (the compilation, separately), then ms
per step of each after ``--warmup`` steps, timed over ``--steps`` steps, and their ratio. Same process, same batch,
same thread count; on a shared machine compare the ratio, not the milliseconds.

    python benchmarks/compile_step.py [--device cpu] [--steps 10] [--warmup 2] [--preset cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_pipeline import _synthetic, demo_plan, training_loop  # noqa: E402

from autoseg.device import resolve_device  # noqa: E402
from autoseg.training.augmentation import augmentation_params  # noqa: E402
from autoseg.training.augmentation_presets import nnunet  # noqa: E402
from autoseg.training.batch_augment import BatchAugmenter  # noqa: E402
from autoseg.training.feeding import CompactBatch  # noqa: E402


def _ms_per_step(loop, batch, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        loop.train_step(batch)  # reads the loss: waits for the step
    return 1000 * (time.perf_counter() - t) / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/train_pipeline"))
    args = ap.parse_args()
    device = resolve_device(args.device)
    _, _, plans, ds = demo_plan(args.out, args.preset)
    n_ch = len(plans.channel_names)
    results = {}
    for compiled in (False, True):
        config, layout, scales, loop = training_loop(plans, ds, device, args.out, compile=compiled)
        aug = augmentation_params(config.patch_size)
        augment = BatchAugmenter(aug, nnunet(), regions=layout.regions, ignore_label=None, ds_scales=scales)
        raw = CompactBatch()(**_synthetic(aug.initial_patch_size, config.batch_size, n_ch, 0))
        batch = augment({k: torch.from_numpy(v).to(device) if hasattr(v, "dtype") else v for k, v in raw.items()})
        t = time.perf_counter()
        loop.train_step(batch)
        first = time.perf_counter() - t
        _ms_per_step(loop, batch, args.warmup, device)
        results[compiled] = _ms_per_step(loop, batch, args.steps, device)
        name = "compiled" if compiled else "eager"
        print(f"{name}: first step {first:.1f} s{' (compilation included)' if compiled else ''}, "
              f"{results[compiled]:.0f} ms per step over {args.steps} steps", flush=True)
    print(f"demo plan (patch {config.patch_size}, batch {config.batch_size}) on {device}, {torch.get_num_threads()} "
          f"threads: compiled / eager = {results[True] / results[False]:.2f} (below 1: compiled is faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
