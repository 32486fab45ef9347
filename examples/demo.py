"""The demo behind `make demo`: generate a small BraTS-like dataset, check it, plan and preprocess it for CPU
training, train fold 0 of the 3D U-Net for a few minutes and print the validation Dice per region.

    python examples/demo.py [--data demo_data] [-j 2] [--epochs 10] [--iters 25]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autoseg.cli import main as autoseg
from autoseg.data.synthetic import make_synthetic_dataset


def run(data: Path, jobs: int, epochs: int = 10, iters: int = 25) -> int:
    dataset = data / "Dataset001_SyntheticBraTS"
    if not (dataset / "dataset.json").is_file():
        print(f"generating the demo dataset in {dataset} ...")
        make_synthetic_dataset(dataset, n_cases=12, shape=(64, 64, 64), n_channels=4, kind="brats",
                               regions=True, n_test=2, seed=0)
    workdir = data / "autoseg_work"
    steps = [
        ["check", str(dataset), "-j", str(jobs)],
        ["plan", str(dataset), "--workdir", str(workdir), "--preset", "cpu", "--explain", "-j", str(jobs)],
        ["train", str(dataset), "3d_fullres", "0", "--workdir", str(workdir), "--device", "cpu", "--epochs",
         str(epochs), "--iters-per-epoch", str(iters), "--val-iters", "4", "--resume"],
    ]
    for step in steps:
        print(f"\n$ autoseg {' '.join(step)}", flush=True)
        status = autoseg(step)
        if status:
            return status
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("demo_data"), help="folder for the dataset and work files")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    ap.add_argument("--iters", type=int, default=25, help="training iterations per epoch (default 25)")
    args = ap.parse_args()
    sys.exit(run(args.data, args.jobs, args.epochs, args.iters))
