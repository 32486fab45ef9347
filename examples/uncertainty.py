"""Uncertainty maps and quality flags: predict with `--uncertainty`, read the per-case quality table, and see a
corrupted scan and a scan with the wrong voxel size get flagged.

    python examples/uncertainty.py [--out uncertainty_example] [--quick]

`find-best` measures on cross-validation which quality score ranks the real errors best and sets the flag's
threshold; `predict --uncertainty` then writes, per case, an entropy map and a fold/mirror disagreement map
(OUT/uncertainty/) and a row of OUT/quality.csv: the score, its parts, drift findings against the training data
(spacing, size, intensities), and whether the case is flagged and why.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoseg.cli import main as autoseg
from autoseg.data.synthetic import make_synthetic_dataset


def make_suspicious_inputs(test_images: Path, folder: Path) -> None:
    """Copies of the test scans, plus a noisy, over-bright one and one whose header has three times the voxel size."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(test_images.glob("*.nii.gz")):
        shutil.copy2(path, folder / path.name)
    first = sorted(test_images.glob("*_0000.nii.gz"))[0]
    image = sitk.ReadImage(str(first))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    noisy = array * 3 + np.random.default_rng(0).normal(0, array.std() * 2, array.shape).astype(np.float32)
    out = sitk.GetImageFromArray(noisy)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(folder / "corrupted_0000.nii.gz"))
    image.SetSpacing(tuple(3 * s for s in image.GetSpacing()))
    sitk.WriteImage(image, str(folder / "wrong_spacing_0000.nii.gz"))


def run(out: Path, quick: bool) -> int:
    dataset, work, inputs = out / "Dataset040_Spheres", out / "work", out / "inputs"
    if not (dataset / "dataset.json").is_file():
        make_synthetic_dataset(dataset, n_cases=6, shape=(40, 48, 48), n_channels=1, kind="binary", n_test=2,
                               seed=11)
    make_suspicious_inputs(dataset / "imagesTs", inputs)
    epochs, iters = ("2", "4") if quick else ("15", "25")
    steps = [
        ["plan", str(dataset), "--workdir", str(work), "--preset", "cpu"],
        ["train", str(dataset), "3d_fullres", "0", "--workdir", str(work), "--device", "cpu", "--epochs", epochs,
         "--iters-per-epoch", iters, "--val-iters", "2", "--resume", "--save-probabilities"],
        ["find-best", "--workdir", str(work)],            # learns which score to trust and the flag threshold
        ["predict", "-i", str(inputs), "-o", str(out / "predictions"), "--workdir", str(work), "--overwrite",
         "--uncertainty"],
    ]
    for step in steps:
        print(f"\n$ autoseg {' '.join(step)}", flush=True)
        if status := autoseg(step):
            return status
    print("\nOUT/quality.csv:")
    with open(out / "predictions" / "quality.csv", newline="") as f:
        for row in csv.DictReader(f):
            score = row["quality_score"] or "-"
            print(f"  {row['case']:<14} flagged={row['flagged']:<5} score={score:<7} {row['reasons']}")
    maps = sorted(p.name for p in (out / "predictions" / "uncertainty").iterdir())
    print(f"\nuncertainty maps (float32, the input's geometry): {', '.join(maps[:4])}, ...")
    return 0


if __name__ == "__main__":  # worker processes are spawned: keep the work under this guard
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("uncertainty_example"), help="folder for everything written")
    ap.add_argument("--quick", action="store_true", help="a smoke-test length training (for CI)")
    args = ap.parse_args()
    sys.exit(run(args.out, args.quick))
