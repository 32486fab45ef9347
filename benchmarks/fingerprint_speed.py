"""Time autoseg's check + fingerprint + plan against nnU-Net v2's fingerprint extraction (with its integrity
check) + experiment planning, both with 2 processes, on the same raw dataset.

    python benchmarks/fingerprint_speed.py DATASET [--jobs 2] [--nnunet-venv .nnunet-venv]
    python benchmarks/fingerprint_speed.py --synthetic 20 --size 128    # BraTS-like generated data

Prints one figure per line: wall time and peak RSS (whole process tree) of each tool, and the ratios.
nnU-Net's virtualenv comes from ``shared/nnunet_cpu_env.sh`` (CPU-only torch).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import nnunet_layout, run_measured, synthetic_dataset  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", nargs="?", type=Path, help="raw dataset folder (nnU-Net v2 layout)")
    ap.add_argument("--synthetic", type=int, metavar="N", help="generate N BraTS-like cases instead")
    ap.add_argument("--size", type=int, default=96, help="edge length of generated cases (default 96)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--nnunet-venv", type=Path, default=Path(".nnunet-venv"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="autoseg_bench_") as tmp:
        tmp = Path(tmp)
        dataset = args.dataset or synthetic_dataset(tmp / "Synthetic", args.synthetic or 10, args.size)
        ours = run_measured([sys.executable, "-m", "autoseg", "-q", "plan", str(dataset), "--workdir",
                             str(tmp / "autoseg_work"), "--force", "-j", str(args.jobs), "--preset", args.preset])
        if ours.returncode:
            print(ours.output)
            return 1
        env, did = nnunet_layout(dataset, tmp / "nnunet")
        nn_bin = args.nnunet_venv.resolve() / "bin"
        fp = run_measured([str(nn_bin / "nnUNetv2_extract_fingerprint"), "-d", str(did), "-np", str(args.jobs),
                           "--verify_dataset_integrity", "--clean"], env=env)
        pl = run_measured([str(nn_bin / "nnUNetv2_plan_experiment"), "-d", str(did)], env=env)
        for r in (fp, pl):
            if r.returncode:
                print(r.output[-3000:])
                return 1
        theirs_s, theirs_mb = fp.seconds + pl.seconds, max(fp.peak_rss_mb, pl.peak_rss_mb)
        print(f"dataset: {dataset.name}")
        print(f"autoseg check+fingerprint+plan wall_s: {ours.seconds:.2f}")
        print(f"nnunet verify+fingerprint+plan wall_s: {theirs_s:.2f} (fingerprint {fp.seconds:.2f}, plan {pl.seconds:.2f})")
        print(f"speedup (nnunet / autoseg): {theirs_s / ours.seconds:.2f}x")
        print(f"autoseg peak_rss_mb: {ours.peak_rss_mb:.0f}")
        print(f"nnunet peak_rss_mb: {theirs_mb:.0f}")
        print(f"memory ratio (autoseg / nnunet): {ours.peak_rss_mb / theirs_mb:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
