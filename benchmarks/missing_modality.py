"""Missing sequences: how much Dice does a model lose when one input channel is absent, with and without
modality dropout in training?

A synthetic BraTS-like dataset with 4 channels (FLAIR, T1, T1ce, T2 contrasts) and 3 nested regions. Two small
3d_fullres U-Nets are trained on the same cases with the same seed, one normally and one with
``--modality-dropout P``. ``evaluate-missing`` then scores both on held-out test cases with every non-empty
subset of channels (absent channels blanked as in training dropout).

Prints, one per line: each model's Dice with all channels, its mean Dice drop with one channel missing (and per
channel), and the ratio dropout-drop / normal-drop (goal: <= 0.5).

    python benchmarks/missing_modality.py            # about 20 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--test", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--dropout", type=float, default=0.25)
    ap.add_argument("--shape", type=int, default=40)
    ap.add_argument("--keep", type=Path, help="work here and keep the files (default: a temporary folder)")
    args = ap.parse_args()

    from measure import small_3d_plans

    import autoseg
    from autoseg.data.synthetic import make_synthetic_dataset

    base = args.keep or Path(tempfile.mkdtemp(prefix="autoseg_missing_"))
    t0 = time.perf_counter()
    try:
        root = make_synthetic_dataset(base / "Dataset011_Missing", n_cases=args.cases, n_test=args.test,
                                      shape=(args.shape,) * 3, n_channels=4, kind="brats", regions=True, seed=3)
        drops = {}
        for name, p in (("normal", 0.0), ("dropout", args.dropout)):
            wd = base / f"work_{name}"
            plans = autoseg.plan(root, workdir=wd, preset="cpu", progress=False)
            small_3d_plans(plans).save(wd / "plans.json")
            autoseg.train(root, "3d_fullres", "all", workdir=wd, epochs=args.epochs, iters_per_epoch=args.iters,
                          val_iters=2, workers=1, device="cpu", progress=False, validate=False,
                          modality_dropout=p)
            summary = autoseg.evaluate_missing(wd, images=root / "imagesTs", labels=root / "labelsTs",
                                               progress=False)
            one = summary.one_missing_drop()
            drops[name] = float(np.mean(list(one.values())))
            print(f"{name}_dice_all_channels: {summary.foreground_mean(summary.full):.4f}")
            for channel, d in one.items():
                print(f"{name}_drop_without_{channel}: {d:.4f}")
            print(f"{name}_mean_drop_one_missing: {drops[name]:.4f}")
        print(f"ratio_dropout_to_normal_drop: {drops['dropout'] / drops['normal']:.3f}")
        print(f"seconds: {time.perf_counter() - t0:.0f}")
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
