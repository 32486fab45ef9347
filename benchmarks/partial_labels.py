"""Partial labels: how much of a region does a model learn when that region was annotated in only half the cases?

A synthetic BraTS-like dataset (4 channels, 3 nested regions: whole tumour, tumour core, enhancing tumour). In every other
case the enhancing tumour was not delineated: its voxels are painted as core (label 3 -> 2), as happens when
datasets annotated with different label sets are merged. Three small 3d_fullres U-Nets are trained with the cpu
preset (shrunk to a small U-Net), the same seed, splits and iterations:

- ``full``: every case fully annotated (the reference),
- ``naive``: the partially annotated labels, taken at face value (the missing enhancing tumour is learnt as
  absent),
- ``masked``: the same labels with dataset.json ``"annotated"`` naming the cases' annotated regions, so the
  enhancing tumour's loss terms are masked in those cases.

Each model's cross-validation predictions (the held-out cases of the folds trained) are scored against the FULL
reference labels, so all three are judged on the same truth. Prints, one per line: each model's CV Dice per region,
and ``masked / full`` and ``naive / full`` for the enhancing tumour (goal: masked >= 0.90).

    python benchmarks/partial_labels.py                 # 2D, fold 0, 10 cases: ~10 minutes on 2 loaded cores
    python benchmarks/partial_labels.py --ndim 3 --shape 40 --folds 0,1,2,3,4 --epochs 20 --iters 25   # hours
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

REGIONS = ("whole_tumor", "tumor_core", "enhancing_tumor")
PARTIAL_REGION = "enhancing_tumor"


def make_variant(full: Path, dest: Path, *, declare: bool) -> Path:
    """A copy of ``full`` whose odd-numbered cases lack the enhancing tumour (painted as core)."""
    from autoseg.io.image import read_label, write_label

    shutil.copytree(full, dest)
    spec = json.loads((dest / "dataset.json").read_text())
    labels = sorted((dest / "labelsTr").iterdir())
    partial = []
    for path in labels[1::2]:
        img = read_label(path)
        write_label(path, np.where(img.array == 3, 2, img.array).astype(img.array.dtype), img.geometry)
        partial.append(path.name[: -len(spec["file_ending"])])
    if declare:
        spec["annotated"] = {cid: ["whole_tumor", "tumor_core"] for cid in partial}
    (dest / "dataset.json").write_text(json.dumps(spec, indent=1))
    return dest


def small_2d_plans(plans):  # type: ignore[no-untyped-def]
    """Only 2d, as a 4-stage 8-64 feature U-Net on a 64^2 patch, batch 4 (quick CPU training)."""
    import dataclasses

    from autoseg.networks.topology import UNetTopology

    cfg = plans.configuration("2d")
    topo = UNetTopology(strides=((1, 1), (2, 2), (2, 2), (2, 2)), kernel_sizes=((3, 3),) * 4,
                        features_per_stage=(8, 16, 32, 64), n_blocks_per_stage=(1, 1, 1, 1),
                        n_conv_per_stage_decoder=(1, 1, 1), block=cfg.topology.block)
    cfg = dataclasses.replace(cfg, patch_size=(64, 64), topology=topo, batch_size=4)
    return dataclasses.replace(plans, configurations={"2d": cfg})


def cv_dice(wd: Path, full: Path, folds: list[int], config: str) -> dict[str, float]:
    """Mean Dice per region of the folds' validation predictions against the full reference labels."""
    from autoseg.evaluation.evaluate import evaluate_pairs
    from autoseg.io.dataset import read_dataset_json

    spec = read_dataset_json(full / "dataset.json")
    pairs = []
    for f in folds:
        for pred in sorted((wd / "models" / config / f"fold_{f}" / "val").glob(f"*{spec.file_ending}")):
            cid = pred.name[: -len(spec.file_ending)]
            pairs.append((cid, pred, full / "labelsTr" / pred.name))
    classes = {k: v for k, v in spec.labels.items() if k != "background"}
    summary = evaluate_pairs(pairs, classes, lesion_wise=False, surface=False, progress=False)
    return {r: summary.mean("dice", r) for r in REGIONS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ndim", type=int, choices=(2, 3), default=2, help="2: 2D slices, 64^2 patch (default, "
                    "quick); 3: volumes, 32^3 patch")
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--shape", type=int, default=96, help="image size per axis")
    ap.add_argument("--folds", default="0", help="folds trained per model (comma-separated)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--models", default="full,naive,masked", help="models trained (comma-separated)")
    ap.add_argument("--keep", type=Path, help="work here and keep the files (default: a temporary folder)")
    args = ap.parse_args()

    from measure import small_3d_plans

    import autoseg
    from autoseg.data.synthetic import make_synthetic_dataset

    folds = [int(f) for f in args.folds.split(",")]
    base = args.keep or Path(tempfile.mkdtemp(prefix="autoseg_partial_"))
    t0 = time.perf_counter()
    try:
        full = make_synthetic_dataset(base / "Dataset012_Full", n_cases=args.cases, shape=(args.shape,) * 3,
                                      ndim=args.ndim, n_channels=4, kind="brats", regions=True, seed=5)
        config, shrink = ("2d", small_2d_plans) if args.ndim == 2 else ("3d_fullres", small_3d_plans)
        roots = {"full": full, "naive": make_variant(full, base / "Dataset013_Naive", declare=False),
                 "masked": make_variant(full, base / "Dataset014_Masked", declare=True)}
        print(f"cases: {args.cases} of {args.shape}^{args.ndim}, {PARTIAL_REGION} unannotated in {args.cases // 2}; "
              f"{config}, folds {args.folds}; {args.epochs} epochs x {args.iters} iterations")
        scores = {}
        for name in args.models.split(","):
            root = roots[name]
            wd = base / f"work_{name}"
            plans = autoseg.plan(root, workdir=wd, preset="cpu", progress=False)
            shrink(plans).save(wd / "plans.json")
            for f in folds:
                autoseg.train(root, config, f, workdir=wd, epochs=args.epochs, iters_per_epoch=args.iters,
                              val_iters=1, workers=0, device="cpu", progress=False)
            scores[name] = cv_dice(wd, full, folds, config)
            for r in REGIONS:
                print(f"{name}_cv_dice_{r}: {scores[name][r]:.4f}")
        for name in ("masked", "naive"):
            if name in scores and "full" in scores:
                print(f"{name}_over_full_{PARTIAL_REGION}: "
                      f"{scores[name][PARTIAL_REGION] / scores['full'][PARTIAL_REGION]:.3f}")
        print(f"seconds: {time.perf_counter() - t0:.0f}")
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
