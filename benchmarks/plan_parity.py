"""Plan one raw dataset with autoseg and with nnU-Net v2 and print the two plans side by side.

    python benchmarks/plan_parity.py DATASET [--preset default] [--gpu-memory 8] [--nnunet-venv .nnunet-venv]

DATASET is a folder in nnU-Net v2 raw layout (dataset.json, imagesTr/, labelsTr/). It is linked into a
temporary ``nnUNet_raw/Dataset999_X`` folder; nnU-Net's environment variables are set for its subprocesses
only. Per configuration the script prints spacing, patch, batch size and strides of both planners and a
match column (spacing within 1 %, the rest equal). Exit status 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import nnunet_layout, run_measured  # noqa: E402

NNUNET_PLANNERS = {  # autoseg preset -> (nnU-Net planner class, plans file name)
    "default": ("ExperimentPlanner", "nnUNetPlans"),
    "resenc_m": ("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans"),
    "resenc_l": ("nnUNetPlannerResEncL", "nnUNetResEncUNetLPlans"),
}


def nnunet_plans(dataset: Path, venv: Path, preset: str, gpu_memory_gb: float, jobs: int) -> dict:
    """Run nnU-Net's fingerprint extraction and planner; return its plans JSON."""
    planner, plans_name = NNUNET_PLANNERS[preset]
    with tempfile.TemporaryDirectory(prefix="plan_parity_") as tmp:
        env, did = nnunet_layout(dataset.resolve(), Path(tmp))
        bindir = venv / "bin"
        steps = [[str(bindir / "nnUNetv2_extract_fingerprint"), "-d", str(did), "-np", str(jobs)],
                 [str(bindir / "nnUNetv2_plan_experiment"), "-d", str(did), "-pl", planner,
                  "-gpu_memory_target", f"{gpu_memory_gb:g}"]]
        for cmd in steps:
            run = run_measured(cmd, env=env)
            if run.returncode != 0:
                sys.exit(f"{' '.join(cmd)} failed (exit {run.returncode}):\n{run.output[-3000:]}")
            print(f"nnU-Net {Path(cmd[0]).name}: {run.seconds:.1f} s, peak RSS {run.peak_rss_mb:.0f} MB")
        found = list((Path(tmp) / "nnUNet_preprocessed").glob(f"Dataset{did:03d}_*/{plans_name}.json"))
        if not found:
            sys.exit(f"nnU-Net wrote no {plans_name}.json under {tmp}/nnUNet_preprocessed")
        return json.loads(found[0].read_text())


def autoseg_plans(dataset: Path, preset: str, gpu_memory_gb: float, jobs: int):
    """Run autoseg's fingerprint and planner."""
    import time

    from autoseg.fingerprint.extract import fingerprint_dataset
    from autoseg.io.dataset import load_dataset
    from autoseg.planner.planner import plan_experiment

    t0 = time.perf_counter()
    fp = fingerprint_dataset(load_dataset(dataset), jobs=jobs, progress=False)
    t1 = time.perf_counter()
    plans = plan_experiment(fp, gpu_memory_gb=gpu_memory_gb, preset=preset)
    print(f"autoseg fingerprint: {t1 - t0:.1f} s, plan: {time.perf_counter() - t1:.2f} s")
    return plans


def _nn_config(nn: dict, name: str) -> dict | None:
    """A configuration of nnU-Net's plans with ``inherits_from`` resolved."""
    cfgs = nn["configurations"]
    if name not in cfgs:
        return None
    cfg = dict(cfgs[name])
    parent = cfg.pop("inherits_from", None)
    if parent:
        cfg = {**(_nn_config(nn, parent) or {}), **cfg}
    return cfg


def _fmt(v, digits: int = 4) -> str:
    return "-" if v is None else "x".join(f"{float(x):.{digits}g}" for x in v)


def compare(plans, nn: dict) -> list[tuple[str, ...]]:
    """One row per (configuration, field): name, field, autoseg value, nnU-Net value, verdict."""
    rows = []
    names = list(dict.fromkeys([*plans.configurations, *nn["configurations"]]))
    for name in names:
        ours = plans.configurations.get(name)
        theirs = _nn_config(nn, name)
        arch = (theirs or {}).get("architecture", {}).get("arch_kwargs", {})
        fields = {
            "spacing": (ours and ours.spacing, theirs and theirs.get("spacing"), "rel"),
            "median": (ours and ours.median_shape, theirs and theirs.get("median_image_size_in_voxels"), "rel"),
            "patch": (ours and ours.patch_size, theirs and theirs.get("patch_size"), "eq"),
            "batch": (ours and (ours.batch_size,), theirs and (theirs.get("batch_size"),), "eq"),
            "strides": (ours and [list(s) for s in ours.topology.strides], arch.get("strides"), "eq"),
            "kernels": (ours and [list(k) for k in ours.topology.kernel_sizes], arch.get("kernel_sizes"), "eq"),
        }
        for field, (a, b, how) in fields.items():
            if a is None or b is None:
                ok = False
            elif how == "rel":
                ok = len(a) == len(b) and all(abs(float(x) - float(y)) <= 0.01 * abs(float(y)) + 0.5 * (field == "median")
                                              for x, y in zip(a, b))
            else:
                ok = [list(map(int, x)) if isinstance(x, list | tuple) else int(x) for x in a] == \
                     [list(map(int, x)) if isinstance(x, list | tuple) else int(x) for x in b]
            show = (lambda v: "-" if v is None else str([list(map(int, s)) for s in v]).replace(" ", "")) \
                if field in ("strides", "kernels") else _fmt
            rows.append((name, field, show(a), show(b), "match" if ok else "MISMATCH"))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", type=Path, help="raw dataset folder (nnU-Net v2 layout)")
    ap.add_argument("--preset", default="default", choices=sorted(NNUNET_PLANNERS))
    ap.add_argument("--gpu-memory", type=float, default=None,
                    help="GPU memory target in GB (default: 8, or 24 for resenc_l as nnU-Net does)")
    ap.add_argument("--nnunet-venv", type=Path, default=Path(".nnunet-venv"), help="virtualenv with nnunetv2")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    if not (args.dataset / "dataset.json").is_file():
        sys.exit(f"{args.dataset}: no dataset.json; give a folder in nnU-Net v2 raw layout")
    if not (args.nnunet_venv / "bin" / "nnUNetv2_plan_experiment").exists():
        sys.exit(f"{args.nnunet_venv}: no nnUNetv2_plan_experiment; pass --nnunet-venv PATH")
    gpu = args.gpu_memory or (24.0 if args.preset == "resenc_l" else 8.0)
    nn = nnunet_plans(args.dataset, args.nnunet_venv, args.preset, gpu, args.jobs)
    ours = autoseg_plans(args.dataset, args.preset, gpu, args.jobs)
    rows = [("config", "field", "autoseg", "nnU-Net", "")] + compare(ours, nn)
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    bad = [r for r in rows[1:] if r[4] != "match"]
    print(f"\n{len(rows) - 1 - len(bad)}/{len(rows) - 1} fields match")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
