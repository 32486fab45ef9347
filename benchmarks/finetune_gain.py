"""Fine-tuning: does starting from another dataset's model (`train --init-from`) help on a small new dataset?

Source: the demo's 3d_fullres fold 0 (`make demo`: 12 synthetic BraTS-like cases, 4 MR channels, 3 regions), or a model
trained here the same way when there is none. Target: a different task, synthetic lesions on one channel
(different contrast, one class instead of three regions), with only a few training cases. Two 3d_fullres
models are trained on the target with the same plan, seed, epochs and iterations: one from scratch, one
initialised from the source (the stem and the heads do not match and start fresh; every other layer is
copied). Both predict the same held-out test cases.

Prints, one per line: layers copied, the test Dice of each model after each training length, and the gain.

    python benchmarks/finetune_gain.py [--source demo_data/autoseg_work] [--cases 4] [--epochs 1 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def _source(base: Path, given: Path | None) -> Path:
    if given is not None:
        return given
    demo = Path("demo_data/autoseg_work")  # the work folder: its bundle may hold only the 2d model
    if (demo / "models" / "3d_fullres" / "fold_0" / "checkpoint_final.pt").is_file():
        return demo
    import autoseg
    from autoseg.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(base / "Dataset001_Source", n_cases=12, shape=(64, 64, 64), n_channels=4,
                                  kind="brats", regions=True, seed=0)
    autoseg.plan(root, workdir=base / "source", preset="cpu", progress=False)
    autoseg.train(root, "3d_fullres", "all", workdir=base / "source", epochs=10, iters_per_epoch=25, val_iters=4,
                  device="cpu", progress=False, validate=False)
    return base / "source"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, help="bundle or work folder to start from (default: demo_data/autoseg_work)")
    ap.add_argument("--cases", type=int, default=4, help="training cases of the new dataset")
    ap.add_argument("--test", type=int, default=6, help="held-out test cases")
    ap.add_argument("--epochs", type=int, nargs="+", default=[1, 3], help="training lengths to compare")
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--keep", type=Path, help="work here and keep the files (default: a temporary folder)")
    args = ap.parse_args()

    import autoseg
    from autoseg.data.synthetic import make_synthetic_dataset

    base = args.keep or Path(tempfile.mkdtemp(prefix="autoseg_finetune_"))
    t0 = time.perf_counter()
    try:
        source = _source(base, args.source)
        root = make_synthetic_dataset(base / "Dataset002_NewLesions", n_cases=args.cases, n_test=args.test,
                                      shape=(64, 64, 64), n_channels=1, kind="binary", seed=21)
        plans = autoseg.plan(root, workdir=base / "scratch", preset="cpu", progress=False)
        for epochs in args.epochs:
            dice = {}
            for name, init in (("scratch", None), ("finetuned", source)):
                wd = base / f"{name}_{epochs}"
                wd.mkdir(parents=True, exist_ok=True)
                plans.save(wd / "plans.json")  # the same plan for both
                (result,) = autoseg.train(root, "3d_fullres", "all", workdir=wd, epochs=epochs,
                                          iters_per_epoch=args.iters, val_iters=2, device="cpu", progress=False,
                                          validate=False, deterministic=True, init_from=init)
                if result.transfer is not None and epochs == args.epochs[0]:
                    t = result.transfer
                    print(f"tensors_copied: {len(t.matched)} ({t.matched_fraction:.2%} of the parameters)")
                    print(f"tensors_not_matched: {', '.join(n for n, _, _ in t.reshaped) or '-'}")
                autoseg.predict(root / "imagesTs", wd / "pred", workdir=wd, progress=False, deterministic=True)
                scores = autoseg.evaluate_folder(wd / "pred", root / "labelsTs", dataset_json=root / "dataset.json",
                                                 lesion_wise=False, progress=False)
                dice[name] = scores.foreground_mean("dice")
                print(f"test_dice_{name}_{epochs}_epochs: {dice[name]:.4f}")
            print(f"gain_{epochs}_epochs: {dice['finetuned'] - dice['scratch']:+.4f}")
        print(f"wall_seconds: {time.perf_counter() - t0:.0f}")
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
