"""BraTS-style regions: train on overlapping regions (whole tumour, tumour core, enhancing tumour) instead of
exclusive labels, predict, and score and measure each region.

    python examples/brats_regions.py [--out brats_example] [--quick]

A region is a set of label values. Declaring them in dataset.json is all it takes:

    "labels": {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3},
    "regions_class_order": [1, 2, 3]

The network then has one sigmoid output per region and trains with Dice + binary cross-entropy; predictions are
turned back into label maps by painting the regions in `regions_class_order` (whole tumour as 1, then core as
2 over it, then enhancing as 3), so output files hold the usual labels 1/2/3. `evaluate` and `--tables` report
the regions, which is how BraTS is scored. The dataset here is synthetic (4 MR channels, nested tumours).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from autoseg.cli import main as autoseg
from autoseg.data.synthetic import make_synthetic_dataset


def run(out: Path, quick: bool) -> int:
    dataset, work = out / "Dataset020_BraTSLike", out / "work"
    if not (dataset / "dataset.json").is_file():
        make_synthetic_dataset(dataset, n_cases=8, shape=(48, 48, 48), n_channels=4, kind="brats", regions=True,
                               n_test=2, seed=3)
    spec = json.loads((dataset / "dataset.json").read_text())
    print("labels:", spec["labels"], "\nregions_class_order:", spec["regions_class_order"])
    epochs, iters = ("2", "4") if quick else ("15", "25")
    steps = [
        ["plan", str(dataset), "--workdir", str(work), "--preset", "cpu"],
        # --modality-dropout makes the model usable when a sequence is missing (predict --missing T1ce)
        ["train", str(dataset), "3d_fullres", "0", "--workdir", str(work), "--device", "cpu", "--epochs", epochs,
         "--iters-per-epoch", iters, "--val-iters", "2", "--resume", "--modality-dropout", "0.1"],
        ["predict", "-i", str(dataset / "imagesTs"), "-o", str(out / "predictions"), "--workdir", str(work),
         "--overwrite", "--tables", *(["--fast"] if quick else [])],
        # one row per region: Dice, HD95, NSD and lesion-wise scores
        ["evaluate", str(out / "predictions"), str(dataset / "labelsTs"), "--dataset-json",
         str(dataset / "dataset.json")],
        # the same model without the T1ce files at all (blanked as in modality-dropout training)
        ["predict", "-i", str(dataset / "imagesTs"), "-o", str(out / "predictions_no_t1ce"), "--workdir",
         str(work), "--overwrite", "--missing", "T1ce", *(["--fast"] if quick else [])],
    ]
    for step in steps:
        print(f"\n$ autoseg {' '.join(step)}", flush=True)
        if status := autoseg(step):
            return status
    print("\nvolumes per region (ml), from predictions/volumes.csv:")
    print((out / "predictions" / "volumes.csv").read_text())
    return 0


if __name__ == "__main__":  # worker processes are spawned: keep the work under this guard
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("brats_example"), help="folder for everything written")
    ap.add_argument("--quick", action="store_true", help="a smoke-test length training (for CI)")
    args = ap.parse_args()
    sys.exit(run(args.out, args.quick))
