"""Quick start from Python: make a small dataset, check, fingerprint and plan it, train a short fold, and
segment the held-out cases (from files, then one case from a numpy array). About two minutes on 2 cores."""

from pathlib import Path

import numpy as np

import autoseg
from autoseg.data.synthetic import make_synthetic_dataset

if __name__ == "__main__":  # worker processes are spawned: keep the work under this guard
    dataset = make_synthetic_dataset(Path("quickstart_data/Dataset002_Quick"), n_cases=6, shape=(48, 48, 48),
                                     n_test=2, seed=1)

    report = autoseg.check(dataset, jobs=2)          # every problem at once; report.ok is False on errors
    print(report.format_table())

    plans = autoseg.plan(dataset, workdir="quickstart_data/work", preset="cpu", jobs=2)
    print(plans.summary_table())                     # one row per configuration
    print("\n".join(plans.explain()))                # each decision and why
    fingerprint = autoseg.load_fingerprint("quickstart_data/work/fingerprint.json")
    print("median spacing:", fingerprint.median_spacing)

    # a deliberately short run; real training uses the plan's epochs (drop the overrides)
    (result,) = autoseg.train(dataset, "3d_fullres", 0, workdir="quickstart_data/work", epochs=2,
                              iters_per_epoch=10, val_iters=2, device="cpu", resume=True)
    print("validation Dice:", result.validation["mean"] if result.validation else "-")

    summary = autoseg.predict(dataset / "imagesTs", "quickstart_data/predictions", workdir="quickstart_data/work")
    print("written:", {case: str(path) for case, path in summary.outputs.items()})

    predictor = autoseg.Predictor.from_workdir("quickstart_data/work", "3d_fullres", folds=[0])
    channels = [autoseg.read_image(p) for p in sorted((dataset / "imagesTs").glob("test_000_*.nii.gz"))]
    images = np.concatenate([c.array for c in channels])  # (4, z, y, x): the four channels of one case
    seg = predictor.predict(images, channels[0].geometry.array_spacing)  # spacing (z, y, x) in mm
    print("labels in test_000:", sorted(set(seg.ravel().tolist())))
