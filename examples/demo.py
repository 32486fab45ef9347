"""The demo behind `make demo`: generate a small BraTS-like dataset, check it, and plan it for CPU training.

    python examples/demo.py [--data demo_data] [-j 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autoseg.cli import main as autoseg
from autoseg.data.synthetic import make_synthetic_dataset


def run(data: Path, jobs: int) -> int:
    dataset = data / "Dataset001_SyntheticBraTS"
    if not (dataset / "dataset.json").is_file():
        print(f"generating the demo dataset in {dataset} ...")
        make_synthetic_dataset(dataset, n_cases=12, shape=(64, 64, 64), n_channels=4, kind="brats",
                               regions=True, n_test=2, seed=0)
    workdir = data / "autoseg_work"
    steps = [
        ["check", str(dataset), "-j", str(jobs)],
        ["plan", str(dataset), "--workdir", str(workdir), "--preset", "cpu", "--explain", "-j", str(jobs)],
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
    args = ap.parse_args()
    sys.exit(run(args.data, args.jobs))
