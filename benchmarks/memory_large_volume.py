"""Peak memory (RSS) of fingerprinting, preprocessing and predicting one 512x512x400 CT volume with 3 classes.

    python benchmarks/memory_large_volume.py [--shape 400 512 512] [--patch 64 128 128] [--step 0.5]
        [--tta-step 1.0] [--stages fingerprint preprocess predict predict_tta] [--out DIR]

Writes a synthetic CT-like dataset (int16 NIfTI, air -1000 outside an elliptic body, so cropping to the nonzero
region removes nothing; labels background, liver, kidney) to ``--out`` (default ``benchmarks/out/memory_large_volume``,
gitignored; reused while its shape is unchanged). The big case has spacing 1.5 x 0.8 x 0.8 mm (z, y, x); two
half-size training cases have 1.5 x 0.78 x 0.78 mm, so the planned target spacing is 0.78 mm in-plane and the big
volume is *upsampled* slightly (to about 400x525x525) for preprocessing and prediction, then resampled back:
every resampling step runs, on a grid a little larger than the input (the worst case of "full resolution").

Each stage runs in its own fresh Python process, with one worker (``jobs=1``, so no process pool holds memory
that would not be counted); the child reads its own peak RSS (``VmHWM`` in ``/proc/self/status``) at the end:

* ``fingerprint``: ``autoseg.api.plan`` (integrity check + fingerprint + plan) of the three cases;
* ``preprocess``: ``autoseg.api.preprocess`` of the three training cases for ``3d_fullres``;
* ``predict`` / ``predict_tta``: ``autoseg.api.predict`` of the big volume from its file (read, drift check,
  preprocess, sliding window without / with test-time mirroring over 3 axes, export to the input grid, write),
  float32 on the CPU, with a tiny untrained U-Net (3 stages, 4-8-16 features, patch ``--patch``) saved as a
  valid final checkpoint. ``predict_tta`` runs at ``--tta-step`` (default 1.0, no overlap): the mirrored passes
  are averaged per window, so the held buffers (input, logits accumulator) are the same at any step.

Prints one line per stage: peak RSS (GB), the RSS after imports (baseline), the bytes per input voxel above the
baseline, the volume and the seconds. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STAGES = ("fingerprint", "preprocess", "predict", "predict_tta")
BIG = "ct_000"
DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "memory_large_volume"


def _status_kb(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def ct_case(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like int16 volume ``(z, y, x)`` in HU and its uint8 label map (1 liver, 2 kidneys).

    Air (-1000) surrounds an elliptic body of fat and soft tissue; a liver-like ellipsoid and two kidney-like
    ones are brighter. Built slice by slice (float32), so the generator needs little more than the output.
    """
    nz, ny, nx = shape
    rng = np.random.default_rng(seed)
    image = np.empty(shape, np.int16)
    label = np.zeros(shape, np.uint8)
    y, x = np.meshgrid(np.linspace(-1, 1, ny, dtype=np.float32), np.linspace(-1, 1, nx, dtype=np.float32),
                       indexing="ij")
    organs = ((1, 60.0, (0.50, -0.15, -0.30), (0.30, 0.45, 0.40)),   # label, HU, centre (z, y, x), radii
              (2, 150.0, (0.55, 0.25, -0.45), (0.12, 0.14, 0.12)),
              (2, 150.0, (0.55, 0.25, 0.45), (0.12, 0.14, 0.12)))
    for k in range(nz):
        zf = k / max(nz - 1, 1)
        body = (y / 0.80) ** 2 + (x / 0.92) ** 2 <= 1.0 - 0.1 * (2 * zf - 1) ** 2
        inner = (y / 0.72) ** 2 + (x / 0.85) ** 2 <= 1.0 - 0.1 * (2 * zf - 1) ** 2
        sl = np.where(body, -100.0, -1000.0).astype(np.float32)
        sl[inner] = 40.0
        lab = label[k]
        for value, hu, (cz, cy, cx), (rz, ry, rx) in organs:
            inside = ((zf - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
            sl[inside] = hu
            lab[inside] = value
        sl += rng.normal(0.0, 15.0, sl.shape).astype(np.float32) * body
        image[k] = np.rint(sl).astype(np.int16)
    return image, label


def write_dataset(root: Path, big_shape: tuple[int, int, int]) -> Path:
    """The big case plus two half-size training cases (see the module docstring); returns the dataset folder."""
    from autoseg.io.atomic import write_json_atomic
    from autoseg.io.image import Geometry, write_image, write_label

    marker = root / "shape.json"
    if marker.is_file() and json.loads(marker.read_text()) == list(big_shape):
        return root
    small = tuple(max(16, s // 2) for s in big_shape)
    cases = [(BIG, big_shape, (1.5, 0.8, 0.8)), ("ct_001", small, (1.5, 0.78, 0.78)),
             ("ct_002", small, (1.5, 0.78, 0.78))]
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, (cid, shape, spacing) in enumerate(cases):
        image, label = ct_case(shape, seed=i)
        geometry = Geometry.from_array_spacing(spacing)
        write_image(root / "imagesTr" / f"{cid}_0000.nii.gz", image, geometry)
        write_label(root / "labelsTr" / f"{cid}.nii.gz", label, geometry)
        del image, label
    write_json_atomic(root / "dataset.json", {"name": "MemoryCT", "channel_names": {"0": "CT"},
                                              "labels": {"background": 0, "liver": 1, "kidney": 2},
                                              "numTraining": len(cases), "file_ending": ".nii.gz"})
    marker.write_text(json.dumps(list(big_shape)))
    return root


def tiny_plans(plans, patch: tuple[int, ...], kernel: int = 3):  # type: ignore[no-untyped-def]
    """Only ``3d_fullres``, as a 3-stage 4-8-16 feature U-Net on ``patch`` (the planned spacing is kept);
    ``kernel`` 1 makes it several times faster (for the test, where only memory matters)."""
    from autoseg.networks.topology import UNetTopology

    cfg = plans.configuration("3d_fullres")
    topo = UNetTopology(strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)), kernel_sizes=((kernel,) * 3,) * 3,
                        features_per_stage=(4, 8, 16), n_blocks_per_stage=(1, 1, 1), n_conv_per_stage_decoder=(1, 1),
                        block=cfg.topology.block)
    cfg = dataclasses.replace(cfg, patch_size=tuple(patch), topology=topo, batch_size=2)
    return dataclasses.replace(plans, configurations={"3d_fullres": cfg})


def save_untrained_model(workdir: Path, n_classes: int, mirror_axes: tuple[int, ...] = (0, 1, 2)) -> None:
    """An untrained (seeded) network of the plans' ``3d_fullres`` as fold 0's final checkpoint; test-time
    mirroring flips ``mirror_axes``."""
    import torch

    from autoseg.networks.checkpoint import FINAL, save_checkpoint
    from autoseg.networks.unet import build_network
    from autoseg.planner.plans import Plans

    cfg = Plans.load(workdir / "plans.json").configuration("3d_fullres")
    torch.manual_seed(0)
    net = build_network(cfg, in_channels=1, num_classes=n_classes, deep_supervision=False)
    save_checkpoint(workdir / "models" / "3d_fullres" / "fold_0" / FINAL,
                    {"network": net.state_dict(), "epoch": 0, "configuration": "3d_fullres", "fold": "0",
                     "mirror_axes": list(mirror_axes), "in_channels": 1, "num_outputs": n_classes,
                     "cascade_labels": []})


def child(stage: str, dataset: Path, workdir: Path, image: Path, step: float) -> dict[str, float]:
    """Run one stage in this (fresh) process; returns baseline and peak RSS (kB) and seconds."""
    import autoseg.api as api

    if stage.startswith("predict"):
        importlib.import_module("torch")  # part of the stage's baseline
    baseline = _status_kb("VmRSS")
    t0 = time.perf_counter()
    if stage == "fingerprint":
        api.plan(dataset, workdir=workdir, jobs=1, progress=False, reuse_fingerprint=False)
    elif stage == "preprocess":
        api.preprocess(dataset, ["3d_fullres"], workdir=workdir, jobs=1, progress=False, overwrite=True)
    elif stage in ("predict", "predict_tta"):
        api.predict([image], workdir / f"pred_{stage}", workdir=workdir, configuration="3d_fullres", folds=[0],
                    device="cpu", tta=stage == "predict_tta", step_size=step, amp=False, progress=False,
                    overwrite=True, on_warning=lambda m: None)
    else:
        raise SystemExit(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    return {"baseline_kb": baseline, "peak_kb": _status_kb("VmHWM"), "seconds": time.perf_counter() - t0}


def run_stage(stage: str, dataset: Path, workdir: Path, image: Path, step: float = 0.5,
              env: dict[str, str] | None = None) -> dict[str, float]:
    """Run :func:`child` in a fresh interpreter; returns its measurements (raises with its output on failure)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stage, "--dataset", str(dataset),
           "--workdir", str(workdir), "--image", str(image), "--step", str(step)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def prepare(out: Path, shape: tuple[int, int, int]) -> tuple[Path, Path, Path]:
    """Write the dataset; returns (dataset, workdir, big image file)."""
    dataset = write_dataset(out / "Dataset900_MemoryCT", shape)
    return dataset, out / "work", dataset / "imagesTr" / f"{BIG}_0000.nii.gz"


def after_planning(workdir: Path, patch: tuple[int, ...], *, kernel: int = 3,
                   mirror_axes: tuple[int, ...] = (0, 1, 2)) -> None:
    """Shrink the planned network (tiny plans) and save its untrained checkpoint."""
    from autoseg.planner.plans import Plans

    plans = tiny_plans(Plans.load(workdir / "plans.json"), patch, kernel)
    plans.save(workdir / "plans.json")
    save_untrained_model(workdir, n_classes=3, mirror_axes=mirror_axes)


def grid_of(workdir: Path) -> tuple[int, ...] | None:
    """Spatial shape of the big case after preprocessing (None before the preprocess stage ran)."""
    from autoseg.planner.plans import Plans
    from autoseg.preprocessing.properties import CaseProperties

    ident = Plans.load(workdir / "plans.json").configuration("3d_fullres").data_identifier
    path = workdir / "preprocessed" / ident / f"{BIG}.json"
    return CaseProperties.load(path).shape_after_resampling_t if path.is_file() else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(400, 512, 512), metavar=("Z", "Y", "X"))
    ap.add_argument("--patch", type=int, nargs=3, default=(64, 128, 128), metavar=("Z", "Y", "X"))
    ap.add_argument("--step", type=float, default=0.5, help="sliding-window step of predict (fraction of the patch)")
    ap.add_argument("--tta-step", type=float, default=1.0,
                    help="step of predict_tta (default 1: 8 mirrored passes per window at step 0.5 would take about "
                         "an hour on 2 cores; the step changes the time, not the volume-sized buffers)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="data and work folder (reused)")
    ap.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--dataset", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dataset, args.workdir, args.image, args.step)))
        return 0
    shape, patch = tuple(args.shape), tuple(args.patch)
    dataset, workdir, image = prepare(args.out, shape)
    voxels = math.prod(shape)
    print(f"volume: {shape[2]}x{shape[1]}x{shape[0]} int16 ({voxels / 1e6:.1f} M voxels, "
          f"{voxels * 2 / 2**30:.2f} GiB as int16, {voxels * 4 / 2**30:.2f} GiB as float32), 3 classes; "
          f"jobs=1 (no worker processes), torch threads {os.cpu_count()}")
    stages = list(args.stages)
    if "fingerprint" in stages or not (workdir / "plans.json").is_file():
        stages = ["fingerprint", *[s for s in stages if s != "fingerprint"]]
    for stage in stages:
        if stage.startswith("predict") and grid_of(workdir) is None:
            run_stage("preprocess", dataset, workdir, image)
        step = args.tta_step if stage == "predict_tta" else args.step
        r = run_stage(stage, dataset, workdir, image, step)
        if stage == "fingerprint":
            after_planning(workdir, patch)
        per_voxel = (r["peak_kb"] - r["baseline_kb"]) * 1024 / voxels
        extra = f" grid {grid_of(workdir)} patch {patch} step {step}" if stage.startswith("predict") else ""
        print(f"{stage}: peak_rss_gb {r['peak_kb'] * 1024 / 1e9:.2f} (baseline {r['baseline_kb'] * 1024 / 1e9:.2f}, "
              f"{per_voxel:.1f} bytes/voxel above it) seconds {r['seconds']:.1f} volume {shape[2]}x{shape[1]}x"
              f"{shape[0]}{extra}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
