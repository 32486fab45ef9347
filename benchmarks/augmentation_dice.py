"""Does the batched torch augmentation (``nnunet``) train as well as the CPU worker pipeline (``nnunet_cpu``)?

The demo dataset (12 synthetic BraTS-like cases, 4 channels, 64^3, 3 nested regions; generated under
benchmarks/out/ when missing) is planned with the ``cpu`` preset once per seed (``autoseg plan --seed S``: the seed
every later random stream derives from), and fold 0 of 3d_fullres is trained with each augmentation from a copy of
that work folder for the same number of iterations on the CPU, then validated on the held-out cases (full volumes).
Prints, per seed, the validation mean Dice (``val/summary.json``, mean over the regions) of both and their
difference, then the mean difference over the seeds and the seconds per training iteration of each
(``log.jsonl`` epoch times after the first epoch / iterations; the machine's load makes these noisy).

    python benchmarks/augmentation_dice.py [--seeds 1 2 3] [--epochs 5] [--iters 20] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipes import autoseg_cmd, autoseg_env, copy_workdir  # noqa: E402

from autoseg.data.synthetic import make_synthetic_dataset  # noqa: E402

CONFIG = "3d_fullres"


def _run(*args: str) -> str:
    done = subprocess.run(autoseg_cmd(*args), capture_output=True, text=True, env=autoseg_env())
    if done.returncode:
        raise RuntimeError(f"autoseg {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def _result(workdir: Path, iters: int) -> tuple[float, float]:
    fold = next((workdir / "models").rglob("fold_0"))
    summary = json.loads((fold / "val" / "summary.json").read_text())
    dice = sum(summary["mean"].values()) / len(summary["mean"])
    log = [json.loads(line) for line in (fold / "log.jsonl").read_text().splitlines() if line.strip()]
    times = [r["epoch_time"] for r in log if "epoch_time" in r][1:]
    return float(dice), (sum(times) / len(times) / iters) if times else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/augmentation_dice"))
    args = ap.parse_args()
    root = args.out / "Dataset001_SyntheticBraTS"
    if not (root / "dataset.json").is_file():
        make_synthetic_dataset(root, n_cases=12, shape=(64, 64, 64), n_channels=4, kind="brats", regions=True, seed=0)
    diffs, speed = [], {"nnunet_cpu": [], "nnunet": []}
    for seed in args.seeds:
        base = args.out / f"plan_seed{seed}"
        if not (base / "plans.json").is_file():
            _run("plan", str(root), "--workdir", str(base), "--preset", "cpu", "--seed", str(seed),
                 "--preprocess", CONFIG)
        dice = {}
        for aug in ("nnunet_cpu", "nnunet"):
            wd = args.out / f"seed{seed}_{aug}"
            copy_workdir(base, wd)
            _run("train", str(root), CONFIG, "0", "--workdir", str(wd), "--device", "cpu", "--epochs",
                 str(args.epochs), "--iters-per-epoch", str(args.iters), "--val-iters", "4", "--workers",
                 str(args.workers), "--recipe", f"augmentation={aug}")
            dice[aug], s_iter = _result(wd, args.iters)
            speed[aug].append(s_iter)
        diffs.append(dice["nnunet"] - dice["nnunet_cpu"])
        print(f"seed {seed}: val mean Dice nnunet_cpu {dice['nnunet_cpu']:.4f}, nnunet {dice['nnunet']:.4f}, "
              f"difference {diffs[-1]:+.4f}", flush=True)
    print(f"mean difference over {len(diffs)} seeds (nnunet - nnunet_cpu): {sum(diffs) / len(diffs):+.4f}; "
          f"max |difference| {max(abs(d) for d in diffs):.4f}")
    for aug, values in speed.items():
        print(f"{aug}: {sum(values) / len(values):.2f} s per training iteration (mean over seeds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
