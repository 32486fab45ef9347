"""Bring your own data: arrange scans and masks exported from elsewhere into the nnU-Net v2 layout that autoseg
reads, write dataset.json, check it, then plan, train, predict and evaluate with the command line.

    python examples/own_dataset.py [--out own_dataset_example] [--quick]

Step 1 writes a stand-in for "your export": one folder per patient holding a CT-like scan and a liver mask in
NRRD, under names of its own. Replace `find_my_cases()` with a loop over your files; everything after it is
what you would run on real data. With --quick the training is a smoke test (seconds, poor Dice).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoseg.cli import main as autoseg


def make_my_export(raw: Path, n_patients: int = 10, seed: int = 7) -> None:
    """Stand-in for your data: raw/patient_XX/scan.nrrd (CT-like, HU) and raw/patient_XX/liver_mask.nrrd."""
    rng = np.random.default_rng(seed)
    for i in range(n_patients):
        shape = (32, 48, 48) if i % 2 else (36, 44, 52)            # cases need not share a size
        z, y, x = np.indices(shape, dtype=np.float32)
        centre = np.array(shape) / 2 + rng.uniform(-4, 4, 3)
        radii = rng.uniform(0.25, 0.35, 3) * np.array(shape)
        organ = ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + \
                ((x - centre[2]) / radii[2]) ** 2 <= 1
        scan = rng.normal(-100, 30, shape) + 160 * organ             # soft tissue around a brighter organ
        folder = raw / f"patient_{i:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for array, name in ((scan.astype(np.int16), "scan.nrrd"), (organ.astype(np.uint8), "liver_mask.nrrd")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((0.8, 0.8, 2.5))                           # x, y, z in mm: thick slices
            sitk.WriteImage(image, str(folder / name))


def find_my_cases(raw: Path) -> list[tuple[str, list[Path], Path]]:
    """(case id, one image file per channel, mask file) for every case. Adapt this to your file names."""
    return [(folder.name, [folder / "scan.nrrd"], folder / "liver_mask.nrrd") for folder in sorted(raw.iterdir())]


def to_nnunet_layout(cases: list[tuple[str, list[Path], Path]], dataset: Path, *, channel_names: dict[str, str],
                     labels: dict[str, int], n_test: int = 2) -> None:
    """Write Dataset/imagesTr/CASE_0000.nii.gz ..., labelsTr/CASE.nii.gz and dataset.json.

    Headers (spacing, origin, direction) are kept: SimpleITK converts the file format without resampling. The
    last ``n_test`` cases go to imagesTs/ (their masks to labelsTs/, to score the predictions at the end)."""
    for n, (case, images, mask) in enumerate(cases):
        test = n >= len(cases) - n_test
        for channel, path in enumerate(images):
            out = dataset / ("imagesTs" if test else "imagesTr") / f"{case}_{channel:04d}.nii.gz"
            out.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(sitk.ReadImage(str(path)), str(out))
        out = dataset / ("labelsTs" if test else "labelsTr") / f"{case}.nii.gz"
        out.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.ReadImage(str(mask)), str(out))
    spec = {"channel_names": channel_names, "labels": labels, "numTraining": len(cases) - n_test,
            "file_ending": ".nii.gz"}
    (dataset / "dataset.json").write_text(json.dumps(spec, indent=2) + "\n")


def run(out: Path, quick: bool) -> int:
    raw, dataset, work = out / "my_export", out / "Dataset010_Liver", out / "work"
    if not raw.is_dir():
        make_my_export(raw)
    if not (dataset / "dataset.json").is_file():
        # "CT" as the channel name selects CT normalisation (clip to the foreground's 0.5-99.5 percentiles and
        # z-score with the dataset's statistics); any other name gets per-case z-scoring.
        to_nnunet_layout(find_my_cases(raw), dataset, channel_names={"0": "CT"},
                         labels={"background": 0, "liver": 1})
    epochs, iters = ("2", "4") if quick else ("20", "25")
    steps = [
        ["check", str(dataset)],                                        # every problem at once, nothing written
        ["plan", str(dataset), "--workdir", str(work), "--preset", "cpu", "--explain"],
        # 'all' trains one model on every training case; use 'cv' for 5-fold cross-validation and find-best
        ["train", str(dataset), "3d_fullres", "all", "--workdir", str(work), "--device", "cpu",
         "--epochs", epochs, "--iters-per-epoch", iters, "--val-iters", "2", "--resume"],
        ["predict", "-i", str(dataset / "imagesTs"), "-o", str(out / "predictions"), "--workdir", str(work),
         "--overwrite", *(["--fast"] if quick else [])],
        ["evaluate", str(out / "predictions"), str(dataset / "labelsTs"), "--dataset-json",
         str(dataset / "dataset.json")],
    ]
    for step in steps:
        print(f"\n$ autoseg {' '.join(step)}", flush=True)
        if status := autoseg(step):
            return status
    return 0


if __name__ == "__main__":  # worker processes are spawned: keep the work under this guard
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("own_dataset_example"), help="folder for everything written")
    ap.add_argument("--quick", action="store_true", help="a smoke-test length training (for CI)")
    args = ap.parse_args()
    sys.exit(run(args.out, args.quick))
