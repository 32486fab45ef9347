"""Does the per-case quality score rank the real errors? Spearman on 5-fold cross-validation.

A synthetic BraTS-like dataset (2 channels, 3 nested regions) where cases differ in difficulty as real scans
do: each case gets its own severity ``s`` in [0, 1] that adds noise (up to 0.9 of the intensity scale), blurs
the image and lowers the tumour contrast. A small 3d_fullres U-Net is trained on 5 folds; ``find-best`` then
compares each validation case's quality scores with its real error ``1 - Dice`` and learns the flag threshold.

Prints, one per line: Spearman(1 - score, 1 - Dice) per score, the chosen score, the threshold's precision and
recall at catching the worst 10% of cases, and the number of CV cases.

    python benchmarks/quality_vs_error.py --epochs 40      # about 15 minutes on 2 cores (12 epochs: 2-3)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage


def degrade(root: Path, seed: int) -> dict[str, float]:
    """Give every training case a random severity: noise, blur and a lower tumour contrast."""
    from autoseg.io.image import read_image, read_label, write_image

    rng = np.random.default_rng(seed)
    severity = {}
    for label_path in sorted((root / "labelsTr").glob("*.nii.gz")):
        cid = label_path.name[: -len(".nii.gz")]
        s = float(rng.uniform(0, 1)) ** 1.5  # most cases mild, a few hard
        severity[cid] = s
        tumour = read_label(label_path).array > 0
        for img_path in sorted((root / "imagesTr").glob(f"{cid}_*.nii.gz")):
            img = read_image(img_path)
            a = img.array[0]
            brain = a > 0
            scale = float(a[brain].mean())
            background = float(np.median(a[brain & ~tumour])) if (brain & ~tumour).any() else 0.0
            a = np.where(tumour, background + (a - background) * (1 - 0.6 * s), a)  # lower contrast
            a = ndimage.gaussian_filter(a, sigma=1.5 * s)
            a = a + rng.normal(0, 0.9 * s * scale, a.shape)
            write_image(img_path, np.where(brain, np.maximum(a, 0.5), 0).astype(np.float32), img.geometry)
    return severity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--shape", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, help="work here and keep the files (default: a temporary folder)")
    args = ap.parse_args()

    from measure import small_3d_plans

    import autoseg
    from autoseg.data.synthetic import make_synthetic_dataset

    base = args.keep or Path(tempfile.mkdtemp(prefix="autoseg_quality_"))
    t0 = time.perf_counter()
    try:
        root = make_synthetic_dataset(base / "Dataset010_Quality", n_cases=args.cases, shape=(args.shape,) * 3,
                                      n_channels=2, kind="brats", regions=True, seed=args.seed)
        degrade(root, args.seed)
        wd = base / "work"
        plans = autoseg.plan(root, workdir=wd, preset="cpu", progress=False)
        small_3d_plans(plans).save(wd / "plans.json")
        autoseg.train(root, "3d_fullres", "cv", workdir=wd, epochs=args.epochs, iters_per_epoch=args.iters,
                      val_iters=2, workers=1, device="cpu", progress=False)
        sel = autoseg.find_best(wd, dataset=root, ensembles=False, postprocessing=False, progress=False)
        rule = sel.quality
        assert rule is not None
        for name, rho in rule.spearman.items():
            print(f"spearman_{name}: {'n/a' if rho is None else f'{rho:.3f}'}")
        print(f"chosen_score: {rule.score}")
        print(f"flag_precision_worst10: {rule.precision:.3f}")
        print(f"flag_recall_worst10: {rule.recall:.3f}")
        print(f"cv_cases: {rule.n_cases}")
        print(f"cv_mean_dice: {sel.final.foreground_mean('dice'):.4f}")
        print(f"seconds: {time.perf_counter() - t0:.0f}")
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
