"""The demo behind `make demo`: generate a small BraTS-like dataset, check it, plan and preprocess it for CPU
training, train fold 0 of the 3D and the 2D U-Net for a few minutes each, choose the best of them or their
ensemble on the held-out fold and learn postprocessing (`autoseg find-best`, printing the CV table), export a
reproducible bundle and verify it, then segment the two test cases from the bundle alone (with uncertainty maps,
the quality table and the clinical volume/lesion tables) and print their Dice against labelsTs.

    python examples/demo.py [--data demo_data] [-j 2] [--epochs 10] [--iters 25] [--deterministic]

``--deterministic`` trains and predicts with deterministic algorithms in float32, so two runs write the same files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autoseg.cli import main as autoseg
from autoseg.data.synthetic import make_synthetic_dataset


def run(data: Path, jobs: int, epochs: int = 10, iters: int = 25, deterministic: bool = False) -> int:
    dataset = data / "Dataset001_SyntheticBraTS"
    if not (dataset / "dataset.json").is_file():
        print(f"generating the demo dataset in {dataset} ...")
        make_synthetic_dataset(dataset, n_cases=12, shape=(64, 64, 64), n_channels=4, kind="brats",
                               regions=True, n_test=2, seed=0)
    workdir = data / "autoseg_work"
    same = ["--deterministic"] if deterministic else []
    steps = [
        ["check", str(dataset), "-j", str(jobs)],
        ["plan", str(dataset), "--workdir", str(workdir), "--preset", "cpu", "--explain", "-j", str(jobs)],
        *[["train", str(dataset), config, "0", "--workdir", str(workdir), "--device", "cpu", "--epochs",
           str(epochs), "--iters-per-epoch", str(iters), "--val-iters", "4", "--resume", "--save-probabilities", *same]
          for config in ("3d_fullres", "2d")],
        ["find-best", "--workdir", str(workdir), "-j", str(jobs)],
        ["export", "--workdir", str(workdir), "-o", str(data / "bundle"), "--overwrite"],
        ["verify-bundle", str(data / "bundle")],
        ["predict", "-i", str(dataset / "imagesTs"), "-o", str(data / "predictions"), "--bundle", str(data / "bundle"),
         "--device", "cpu", "--overwrite", "--uncertainty", "--tables", *same],
    ]
    for step in steps:
        print(f"\n$ autoseg {' '.join(step)}", flush=True)
        status = autoseg(step)
        if status:
            return status
    print(test_dice(dataset, data / "predictions"))
    return 0


def test_dice(dataset: Path, predictions: Path) -> str:
    """Dice per region of the predicted test cases against ``labelsTs``, as a small table."""
    import numpy as np

    from autoseg.evaluation.dice import dice_scores
    from autoseg.io.dataset import read_dataset_json
    from autoseg.io.image import read_label

    spec = read_dataset_json(dataset / "dataset.json")
    regions = {k: tuple(v) if isinstance(v, (list, tuple)) else (v,) for k, v in spec.labels.items()
               if k not in ("background", "ignore")}
    refs = sorted((dataset / "labelsTs").glob(f"*{spec.file_ending}"))
    scores = np.array([dice_scores(read_label(predictions / r.name).array, read_label(r).array,
                                   list(regions.values())) for r in refs])
    width = max(map(len, regions))
    lines = [f"test Dice ({len(refs)} held-out case(s), predicted from the bundle with `autoseg predict`):"]
    lines += [f"  {n.ljust(width)}  {v:.4f}" for n, v in zip(regions, np.nanmean(scores, axis=0), strict=True)]
    lines.append(f"  {'mean'.ljust(width)}  {np.nanmean(scores):.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("demo_data"), help="folder for the dataset and work files")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    ap.add_argument("--iters", type=int, default=25, help="training iterations per epoch (default 25)")
    ap.add_argument("--deterministic", action="store_true", help="deterministic algorithms: same inputs, same files")
    args = ap.parse_args()
    sys.exit(run(args.data, args.jobs, args.epochs, args.iters, args.deterministic))
