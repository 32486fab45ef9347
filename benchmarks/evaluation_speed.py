"""Cost of the evaluation metrics on one BraTS-size case (155x240x240, 3 nested regions, one spurious blob):
overlap metrics alone, plus surface metrics (HD95, ASSD, NSD), plus lesion-wise metrics. This is why
`find-best` ranks candidates on the chosen metric alone and computes every metric for the chosen pipeline.

    python benchmarks/evaluation_speed.py [--repeat 3]

Prints one figure per line (median seconds per case).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from scipy import ndimage

from autoseg.evaluation.dice import dice_scores
from autoseg.evaluation.metrics import case_metrics


def brats_like_case() -> tuple[np.ndarray, np.ndarray]:
    zz, yy, xx = np.ogrid[:155, :240, :240]
    ref = np.zeros((155, 240, 240), np.uint8)
    ref[((zz - 70) ** 2 / 900 + (yy - 120) ** 2 / 1600 + (xx - 110) ** 2 / 1600) < 1] = 2
    ref[((zz - 70) ** 2 / 400 + (yy - 120) ** 2 / 700 + (xx - 110) ** 2 / 700) < 1] = 1
    ref[((zz - 70) ** 2 / 100 + (yy - 125) ** 2 / 200 + (xx - 110) ** 2 / 200) < 1] = 3
    pred = ndimage.shift(ref, (1, 2, 0), order=0)
    pred[10:13, 10:13, 10:13] = 3
    return pred, ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    pred, ref = brats_like_case()
    classes = {"whole": (1, 2, 3), "core": (1, 3), "enhancing": (3,)}
    runs = {
        "dice only (dice_scores)": lambda: dice_scores(pred, ref, list(classes.values())),
        "overlap metrics": lambda: case_metrics(pred, ref, classes, (1.0, 1.0, 1.0), surface=False, lesion_wise=False),
        "overlap + surface": lambda: case_metrics(pred, ref, classes, (1.0, 1.0, 1.0), lesion_wise=False),
        "overlap + surface + lesion-wise": lambda: case_metrics(pred, ref, classes, (1.0, 1.0, 1.0)),
    }
    for name, fn in runs.items():
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        print(f"{name}: {statistics.median(times):.3f} s per case")


if __name__ == "__main__":
    main()
