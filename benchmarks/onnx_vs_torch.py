"""CPU inference speed, torch float32 vs ONNX Runtime, on the demo model (3d_fullres, fold 0).

    python benchmarks/onnx_vs_torch.py [--workdir demo_data/autoseg_work] [--config 3d_fullres] [--threads N]

Per window: one patch (batch 1) through the network as the sliding window calls it — torch's
``inference_network`` (traced, frozen and optimised for float32 CPU patches of up to 300k voxels) and the ONNX
Runtime session (CPUExecutionProvider, as many threads as torch) — the median of ``--repeat`` calls after two
warm-up calls. Per case: ``Predictor.logits`` on the preprocessed test case(s) with the default settings
(mirroring, step 0.5), best of ``--case-repeat`` runs; also the largest logit difference and the fraction of
voxels whose label differs. The demo work folder is not modified: its plans and fold 0 are copied to a temporary
folder, where the ONNX file is exported on first use. Prints one figure per line.

Both backends use the same number of threads (``--threads``; the ONNX session takes torch's). On a machine where
other processes compete for the cores, torch's OpenMP threads slow down much more than ONNX Runtime's (a thread
waiting at a barrier for a descheduled one): compare with ``--threads 1`` there, or on an idle machine.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from autoseg.inference.inputs import collect_cases
from autoseg.inference.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]


def _copy_model(src: Path, dst: Path, config: str, fold: str) -> None:
    for name in ("plans.json", "dataset.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    model = dst / "models" / config
    (model / f"fold_{fold}").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        if (src / "models" / config / name).is_file():
            shutil.copy2(src / "models" / config / name, model / name)
    shutil.copy2(src / "models" / config / f"fold_{fold}" / "checkpoint_final.pt", model / f"fold_{fold}")


def _per_window(nets: dict, x: torch.Tensor, repeat: int) -> dict[str, float]:
    """Median seconds per call of each network; calls alternate between them, so that load from other
    processes on the machine affects both alike."""
    times: dict[str, list[float]] = {b: [] for b in nets}
    with torch.inference_mode():
        for i in range(repeat + 2):
            for b, net in nets.items():
                t0 = time.perf_counter()
                net(x)
                if i >= 2:
                    times[b].append(time.perf_counter() - t0)
    return {b: statistics.median(t) for b, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "demo_data" / "autoseg_work")
    ap.add_argument("--images", type=Path, default=ROOT / "demo_data" / "Dataset001_SyntheticBraTS" / "imagesTs")
    ap.add_argument("--config", default="3d_fullres", help="configuration (default 3d_fullres)")
    ap.add_argument("--fold", default="0")
    ap.add_argument("--repeat", type=int, default=20, help="windows timed per backend (median)")
    ap.add_argument("--case-repeat", type=int, default=2, help="runs per case and backend (best)")
    ap.add_argument("--cases", type=int, default=1, help="test cases to predict")
    ap.add_argument("--threads", type=int, help="threads for torch and ONNX Runtime (default: torch's default); 1 "
                                                "gives stable figures on a machine busy with other work")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(prefix="autoseg-onnx-bench-") as tmp:
        wd = Path(tmp)
        _copy_model(args.workdir, wd, args.config, args.fold)
        t0 = time.perf_counter()
        models = {b: Predictor.from_workdir(wd, args.config, folds=[args.fold], device="cpu", amp=False, backend=b)
                  for b in ("torch", "onnx")}
        print(f"load both backends (ONNX export included): {time.perf_counter() - t0:.2f} s")
        config = models["torch"].config
        in_channels = len(models["torch"].plans.channel_names)
        x = torch.randn((1, in_channels, *config.patch_size), generator=torch.Generator().manual_seed(0))
        window = _per_window({b: m.networks[0] for b, m in models.items()}, x, args.repeat)
        for b, t in window.items():
            print(f"per window {tuple(config.patch_size)} {b}: {1000 * t:.1f} ms")
        print(f"per window ratio onnx/torch: {window['onnx'] / window['torch']:.2f}")

        cases = collect_cases([args.images], models["torch"].plans.channel_names)[:args.cases]
        for case in cases:
            images, geometry = case.read()
            pre = models["torch"].preprocess(images, geometry)
            best, logits = {b: float("inf") for b in models}, {}
            for _ in range(args.case_repeat):
                for b, m in models.items():
                    t0 = time.perf_counter()
                    logits[b] = m.logits(pre.data)
                    best[b] = min(best[b], time.perf_counter() - t0)
            for b, m in models.items():
                print(f"per case {case.case_id} grid {tuple(pre.data.shape[1:])} {b}: {best[b]:.2f} s "
                      f"(mirroring {bool(m.mirror_axes)}, step {m.step_size})")
            print(f"per case ratio onnx/torch: {best['onnx'] / best['torch']:.2f}")
            diff = float(np.abs(logits["onnx"] - logits["torch"]).max())
            labels = {b: m.export(logits[b], pre.properties)[0] for b, m in models.items()}
            print(f"max |logit difference| {diff:.2e}; voxels with another label: "
                  f"{float((labels['onnx'] != labels['torch']).mean()):.2e}")


if __name__ == "__main__":
    main()
