"""Does the per-case quality score rank the real errors? Spearman on 5-fold cross-validation.

A synthetic BraTS-like dataset (2 channels, 3 nested regions) where cases differ in difficulty as real scans
do: each case gets its own severity ``s`` in [0, 1] that adds noise (up to 0.9 of the intensity scale), blurs
the image and lowers the tumour contrast. A small 3d_fullres U-Net is trained on 5 folds; ``find-best`` then
compares each validation case's quality scores with its real error ``1 - Dice`` and learns the flag threshold.

Prints, one per line: Spearman(1 - score, 1 - Dice) per score, the chosen score, the threshold's precision and
recall at catching the worst 10% of cases, and the number of CV cases.

``--error-head`` compares the learned error head (``network=unet:error_head=true``) with the test-time
mirroring's agreement instead, on held-out cases degraded the same way: one model with and one without the head
(fold ``all``, same seed) are trained, and the held-out cases are predicted with ``--uncertainty``. Prints the
training time of each and their ratio, the mean test Dice of each (the head must leave it within noise), the
prediction time of one pass (the error head alone, no mirroring) and of the 8 mirror variants, Spearman(1 -
score, 1 - Dice) of the case scores ``tta_agreement``, ``combined``, ``error_head`` (8 variants and one pass) and
``error_head_tta`` (both), and the voxel-level calibration RMSD (10 bins, every voxel of every held-out case) of
the error map, of the mirror variants' disagreement map, and of their mean, as probabilities that the label is wrong.

    python benchmarks/quality_vs_error.py --epochs 40      # about 15 minutes on 2 cores (12 epochs: 2-3)
    python benchmarks/quality_vs_error.py --error-head --cases 20 --test-cases 20 --epochs 10
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage


def degrade(root: Path, seed: int, split: str = "Tr") -> dict[str, float]:
    """Give every case of ``images<split>`` a random severity: noise, blur and a lower tumour contrast."""
    from autoseg.io.image import read_image, read_label, write_image

    rng = np.random.default_rng(seed)
    severity = {}
    for label_path in sorted((root / f"labels{split}").glob("*.nii.gz")):
        cid = label_path.name[: -len(".nii.gz")]
        s = float(rng.uniform(0, 1)) ** 1.5  # most cases mild, a few hard
        severity[cid] = s
        tumour = read_label(label_path).array > 0
        for img_path in sorted((root / f"images{split}").glob(f"{cid}_*.nii.gz")):
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


def calibration_rmsd(prob: np.ndarray, wrong: np.ndarray, bins: int = 10) -> float:
    """Root mean square, over voxels, of (mean predicted probability - observed error rate) of each voxel's bin."""
    idx = np.minimum((prob * bins).astype(np.int64), bins - 1)
    n = np.bincount(idx, minlength=bins).astype(np.float64)
    gap = np.bincount(idx, weights=prob, minlength=bins) - np.bincount(idx, weights=wrong, minlength=bins)
    used = n > 0
    return float(np.sqrt(np.sum(gap[used] ** 2 / n[used]) / n.sum()))


def _train(root: Path, wd: Path, args: argparse.Namespace, recipe: tuple[str, ...]) -> float:
    from measure import small_3d_plans

    import autoseg

    plans = autoseg.plan(root, workdir=wd, preset="cpu", progress=False, recipe=list(recipe))
    small_3d_plans(plans).save(wd / "plans.json")
    autoseg.preprocess(root, ["3d_fullres"], workdir=wd, progress=False)
    t0 = time.perf_counter()
    autoseg.train(root, "3d_fullres", "all", workdir=wd, epochs=args.epochs, iters_per_epoch=args.iters,
                  val_iters=2, workers=1, device="cpu", progress=False, validate=False)
    return time.perf_counter() - t0


def _predict(root: Path, wd: Path, out: Path, **kw: object) -> tuple[float, dict]:
    import json

    import autoseg

    t0 = time.perf_counter()
    autoseg.predict(root / "imagesTs", out, workdir=wd, configuration="3d_fullres", device="cpu", progress=False,
                    drift=False, **kw)
    seconds = time.perf_counter() - t0
    table = out / "quality.json"
    return seconds, json.loads(table.read_text())["cases"] if table.is_file() else {}


def _case_dice(root: Path, out: Path) -> dict[str, float]:
    from autoseg.evaluation.dice import dice_scores
    from autoseg.inference.export import LabelLayout
    from autoseg.io.dataset import load_dataset
    from autoseg.io.image import read_label
    from autoseg.training.validation import eval_classes

    spec = load_dataset(root).spec
    classes = eval_classes(LabelLayout.from_labels(spec.labels, spec.regions_class_order))
    dice = {}
    for ref in sorted((root / "labelsTs").glob("*.nii.gz")):
        scores = dice_scores(read_label(out / ref.name).array, read_label(ref).array, classes)
        dice[ref.name[: -len(".nii.gz")]] = float(np.nanmean(scores))
    return dice


def _voxels(root: Path, out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observed errors, error-head map and disagreement map over every voxel of every held-out case."""
    from autoseg.io.image import read_image, read_label

    wrong, err, dis = [], [], []
    for ref in sorted((root / "labelsTs").glob("*.nii.gz")):
        cid = ref.name[: -len(".nii.gz")]
        wrong.append((read_label(out / ref.name).array != read_label(ref).array).ravel().astype(np.float64))
        err.append(read_image(out / "uncertainty" / f"{cid}_error.nii.gz").array.ravel().astype(np.float64))
        dis.append(read_image(out / "uncertainty" / f"{cid}_disagreement.nii.gz").array.ravel().astype(np.float64))
    return np.concatenate(wrong), np.clip(np.concatenate(err), 0, 1), np.clip(np.concatenate(dis), 0, 1)


def error_head_main(args: argparse.Namespace, base: Path) -> None:
    from autoseg.data.synthetic import make_synthetic_dataset
    from autoseg.evaluation.quality import spearman

    root = make_synthetic_dataset(base / "Dataset011_ErrorHead", n_cases=args.cases, shape=(args.shape,) * 3,
                                  n_channels=2, kind="brats", regions=True, seed=args.seed, n_test=args.test_cases)
    degrade(root, args.seed)
    degrade(root, args.seed + 1, "Ts")
    t_plain = _train(root, base / "plain", args, ())
    t_head = _train(root, base / "head", args, ("network=unet:error_head=true",))
    print(f"train_seconds_plain: {t_plain:.0f}\ntrain_seconds_error_head: {t_head:.0f}")
    print(f"train_time_ratio: {t_head / t_plain:.3f}")
    _predict(root, base / "plain", base / "pred_plain")
    t_one, one = _predict(root, base / "head", base / "pred_one", tta=False, uncertainty=True)
    t_tta, tta = _predict(root, base / "head", base / "pred_tta", uncertainty=True)
    print(f"predict_seconds_one_pass_error_head: {t_one:.1f}\npredict_seconds_8_mirror_variants: {t_tta:.1f}")
    dice_plain, dice = _case_dice(root, base / "pred_plain"), _case_dice(root, base / "pred_tta")
    print(f"test_dice_plain: {np.mean(list(dice_plain.values())):.4f}\ntest_dice_error_head: "
          f"{np.mean(list(dice.values())):.4f}")
    cases = sorted(dice)
    errors = [1 - dice[c] for c in cases]
    for name, table in (("tta_agreement", tta), ("combined", tta), ("error_head", tta), ("error_head_tta", tta),
                        ("error_head_one_pass", one)):
        key = name.replace("_one_pass", "")
        rho = spearman([1 - float(table[c][key]) for c in cases], errors)
        print(f"spearman_{name}: {'n/a' if rho is None else f'{rho:.3f}'}")
    wrong, err, dis = _voxels(root, base / "pred_tta")
    print(f"voxel_error_rate: {wrong.mean():.4f}")
    for name, prob in (("error_head", err), ("disagreement", dis), ("mean_of_both", (err + dis) / 2)):
        print(f"calibration_rmsd_{name}: {calibration_rmsd(prob, wrong):.4f}")
    print(f"test_cases: {len(cases)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--shape", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, help="work here and keep the files (default: a temporary folder)")
    ap.add_argument("--error-head", action="store_true", help="compare the learned error head with the mirror "
                    "variants' agreement on held-out cases (see above)")
    ap.add_argument("--test-cases", type=int, default=20, help="held-out cases (--error-head)")
    args = ap.parse_args()

    from measure import small_3d_plans

    import autoseg
    from autoseg.data.synthetic import make_synthetic_dataset

    base = args.keep or Path(tempfile.mkdtemp(prefix="autoseg_quality_"))
    t0 = time.perf_counter()
    if args.error_head:
        try:
            error_head_main(args, base)
            print(f"seconds: {time.perf_counter() - t0:.0f}")
        finally:
            if args.keep is None:
                shutil.rmtree(base, ignore_errors=True)
        return
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
