"""Do the spatial explanations explain anything? Deletion/insertion AUCs and mass inside the reference of Grad-CAM,
Grad-CAM++, occlusion and attention-gate maps against a random and a distance-to-mask baseline.

The demo's synthetic BraTS-like data (4 channels, 3 nested regions; ``make_synthetic_dataset`` as in
``examples/demo.py``, at ``--shape`` voxels per axis to stay quick on a CPU), a small attention U-Net
(``--recipe network=attention_unet``, 8-64 features, 32^3 patch) trained on all training cases for a few
minutes, then ``autoseg.explain(..., method=[...], evaluate=True)`` on the held-out cases against their
references. Prints the table (means over cases and regions), the methods that do not beat a baseline, the
seconds taken, and with ``--figures DIR`` copies one overlay per method (first test case, first region).

    python benchmarks/explanations.py --shape 32 --epochs 5 --iters 20 --figures docs/explanations

The README's table: that command (100 iterations; 20 s of training and 14 s of explaining and scoring 2 cases
on 2 lightly loaded cores), and ``--test 8`` (93 s for 8 cases).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--test", type=int, default=2)
    ap.add_argument("--shape", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--figures", type=Path, help="copy one overlay PNG per method here")
    ap.add_argument("--keep", type=Path, help="work here and keep the files (default: a temporary folder)")
    args = ap.parse_args()

    from measure import small_3d_plans

    import autoseg
    from autoseg.data.synthetic import make_synthetic_dataset

    base = args.keep or Path(tempfile.mkdtemp(prefix="autoseg_explain_"))
    try:
        root = make_synthetic_dataset(base / "Dataset001_SyntheticBraTS", n_cases=args.cases, n_test=args.test,
                                      shape=(args.shape,) * 3, n_channels=4, kind="brats", regions=True, seed=0)
        wd = base / "work"
        if not (wd / "models" / "3d_fullres" / "fold_all" / "checkpoint_final.pt").is_file():
            plans = autoseg.plan(root, workdir=wd, preset="cpu", recipe=["network=attention_unet"], progress=False)
            small_3d_plans(plans).save(wd / "plans.json")
            t0 = time.perf_counter()
            autoseg.train(root, "3d_fullres", "all", workdir=wd, epochs=args.epochs, iters_per_epoch=args.iters,
                          val_iters=2, workers=1, device="cpu", progress=False, validate=False)
            print(f"training_seconds: {time.perf_counter() - t0:.0f}")
        methods = ["gradcam", "gradcam++", "occlusion", "attention"]
        t0 = time.perf_counter()
        result = autoseg.explain(wd, root / "imagesTs", output=base / "explain", labels=root / "labelsTs",
                                 method=methods, evaluate=True, configuration="3d_fullres", device="cpu",
                                 progress=False)
        print(result.evaluation.format_table())
        print(f"explain_and_evaluate_seconds: {time.perf_counter() - t0:.0f}")
        if args.figures is not None:
            args.figures.mkdir(parents=True, exist_ok=True)
            first = result.rows[0]
            for row in result.rows:
                if row["case"] == first["case"] and row["class"] == first["class"]:
                    dest = args.figures / f"{row['method'].replace('+', 'p')}.png"
                    shutil.copyfile(row["overlay"], dest)
                    print(f"figure: {dest} ({dest.stat().st_size // 1024} KB)")
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
