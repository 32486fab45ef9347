"""Does the KLE residual anomaly channel (``--plugin kle_residual``) help on the demo setting?

The demo dataset (12 synthetic BraTS-like cases, 64^3, 4 channels, 3 nested regions, seed 0) is planned with the
``cpu`` preset twice, without and with ``kle_residual`` (default parameters: 48^3 grid, 32 components capped at
11), and fold 0 of 3d_fullres is trained in each work folder for 10 epochs x 25 iterations with 4 validation
iterations per epoch on the CPU, from the same plans seed. Both networks start from the same seed, but the one with
the extra input channel has a differently shaped first layer, so the initial weights differ too.

Prints, one per line: each run's final (full-volume) validation Dice per region and their mean, the differences
(kle - baseline), the KLE fit time and each run's training time. Ten short epochs are sensitive to the initial
weights: ``--seed`` changes the plans seed (initial weights, batch stream) and keeps the demo's split (seed 12345).

    python benchmarks/kle_demo.py [--seed 999]     # about 10-12 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--seed", type=int, default=12345, help="plans seed (the split stays the demo's)")
    ap.add_argument("--keep", type=Path, help="work here and keep the files (default: a temporary folder)")
    args = ap.parse_args()

    import autoseg
    from autoseg.data.synthetic import make_synthetic_dataset
    from autoseg.training.splits import get_splits

    base = args.keep or Path(tempfile.mkdtemp(prefix="autoseg_kle_"))
    try:
        root = base / "Dataset001_SyntheticBraTS"
        if not (root / "dataset.json").is_file():
            make_synthetic_dataset(root, n_cases=12, shape=(64, 64, 64), n_channels=4, kind="brats", regions=True,
                                   n_test=2, seed=0)
        results = {}
        for name, plugins in (("baseline", []), ("kle", ["kle_residual"])):
            wd = base / f"work_{name}"
            autoseg.plan(root, workdir=wd, preset="cpu", progress=False, plugins=plugins, seed=args.seed)
            get_splits(wd, [c.case_id for c in autoseg.load_dataset(root).cases], seed=12345)  # the demo's split
            t0 = time.perf_counter()
            autoseg.preprocess(root, ["3d_fullres"], workdir=wd, progress=False)
            prep = time.perf_counter() - t0
            t0 = time.perf_counter()
            (res,) = autoseg.train(root, "3d_fullres", 0, workdir=wd, epochs=args.epochs,
                                   iters_per_epoch=args.iters, val_iters=4, device="cpu", progress=False)
            results[name] = res.validation
            print(f"{name}_preprocess_seconds (KLE fit included for kle): {prep:.1f}")
            print(f"{name}_train_seconds: {time.perf_counter() - t0:.0f}")
            for region, dice in res.validation["mean"].items():
                print(f"{name}_val_dice_{region}: {dice:.4f}")
            print(f"{name}_val_dice_mean: {res.validation['mean_foreground_dice']:.4f}")
        base_mean, kle_mean = results["baseline"]["mean"], results["kle"]["mean"]
        for region in base_mean:
            print(f"difference_val_dice_{region}: {kle_mean[region] - base_mean[region]:+.4f}")
        diff = results["kle"]["mean_foreground_dice"] - results["baseline"]["mean_foreground_dice"]
        print(f"difference_val_dice_mean: {diff:+.4f}")
        print(f"validation_cases: {', '.join(sorted(results['kle']['cases']))}")
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
