"""Cross-validate two configurations, let `find-best` choose a configuration or their ensemble and learn
postprocessing, export the choice as a bundle, verify it, and predict from the bundle alone.

    python examples/ensemble_export.py [--out ensemble_example] [--quick]

To keep it short on a CPU this uses a custom 2-fold split (a `splits.json` in nnU-Net's `splits_final.json`
format that you write yourself; without one autoseg makes 5 folds). It also shows ensembling by hand: predict
each configuration with probabilities, then `autoseg ensemble` the folders.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from autoseg.cli import main as autoseg
from autoseg.data.synthetic import make_synthetic_dataset


def run(out: Path, quick: bool) -> int:
    dataset, work, bundle = out / "Dataset030_Lesions", out / "work", out / "bundle"
    if not (dataset / "dataset.json").is_file():
        make_synthetic_dataset(dataset, n_cases=6, shape=(40, 48, 48), n_channels=1, kind="binary", n_test=2,
                               seed=5)
    work.mkdir(parents=True, exist_ok=True)
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (dataset / "labelsTr").glob("*.nii.gz"))
    folds = [cases[0::2], cases[1::2]]
    (work / "splits.json").write_text(json.dumps(
        [{"train": folds[1 - k], "val": folds[k]} for k in range(2)], indent=1))  # read by train and find-best
    epochs, iters = ("1", "3") if quick else ("10", "25")
    train = ["--workdir", str(work), "--device", "cpu", "--epochs", epochs, "--iters-per-epoch", iters,
             "--val-iters", "2", "--resume", "--save-probabilities"]  # probabilities: find-best ensembles them
    test = str(dataset / "imagesTs")
    steps = [
        ["plan", str(dataset), "--workdir", str(work), "--preset", "cpu", "--preprocess", "3d_fullres", "2d"],
        ["train", str(dataset), "3d_fullres", "cv", *train],       # every fold of splits.json in turn
        ["train", str(dataset), "2d", "cv", *train],
        ["find-best", "--workdir", str(work)],                     # CV table, the choice, postprocessing rules
        ["export", "--workdir", str(work), "-o", str(bundle), "--overwrite"],
        ["verify-bundle", str(bundle)],                            # hashes + the sample case re-predicted bit for bit
        ["predict", "-i", test, "-o", str(out / "submission"), "--bundle", str(bundle), "--overwrite"],
        # by hand: each configuration with probabilities, then average the folders
        ["predict", "-i", test, "-o", str(out / "pred_3d"), "--workdir", str(work), "-c", "3d_fullres",
         "--save-probabilities", "--overwrite"],
        ["predict", "-i", test, "-o", str(out / "pred_2d"), "--workdir", str(work), "-c", "2d",
         "--save-probabilities", "--overwrite"],
        ["ensemble", "-i", str(out / "pred_3d"), str(out / "pred_2d"), "-o", str(out / "pred_ensemble"),
         "--overwrite"],
        ["evaluate", str(out / "submission"), str(dataset / "labelsTs"), "--dataset-json",
         str(dataset / "dataset.json"), "--no-lesions"],
    ]
    for step in steps:
        print(f"\n$ autoseg {' '.join(step)}", flush=True)
        if status := autoseg(step):
            return status
    manifest = json.loads((bundle / "manifest.json").read_text())
    print(f"\nbundle: {len(manifest['files'])} files hashed; members {manifest['members']}; "
          f"postprocessing {manifest['postprocessing']}")
    return 0


if __name__ == "__main__":  # worker processes are spawned: keep the work under this guard
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("ensemble_example"), help="folder for everything written")
    ap.add_argument("--quick", action="store_true", help="a smoke-test length training (for CI)")
    args = ap.parse_args()
    sys.exit(run(args.out, args.quick))
