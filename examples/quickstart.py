"""Quick start from Python: make a small dataset, check it, fingerprint it and plan it."""

from pathlib import Path

import autoseg
from autoseg.data.synthetic import make_synthetic_dataset

if __name__ == "__main__":  # worker processes are spawned: keep the work under this guard
    dataset = make_synthetic_dataset(Path("quickstart_data/Dataset002_Quick"), n_cases=6, shape=(48, 48, 48), seed=1)

    report = autoseg.check(dataset, jobs=2)          # every problem at once; report.ok is False on errors
    print(report.format_table())

    plans = autoseg.plan(dataset, workdir="quickstart_data/work", preset="cpu", jobs=2)
    print(plans.summary_table())                     # one row per configuration
    print("\n".join(plans.explain()))                # each decision and why
    fingerprint = autoseg.load_fingerprint("quickstart_data/work/fingerprint.json")
    print("median spacing:", fingerprint.median_spacing)
