"""Peak memory of fingerprinting, preprocessing and prediction grows by a bounded number of bytes per voxel.

The stages run as ``benchmarks/memory_large_volume.py`` runs them (each in a fresh process, one worker, its
peak RSS read from ``VmHWM`` at the end) on CT-like int16 volumes with 3 classes (upsampled slightly, as in the
benchmark), once at 224x224x160 (8.0 M voxels) and once at 112x112x80 (1.0 M voxels). What does not grow
with the volume (libraries, the network and its patch buffers, fixed-size slabs) differs between machines but
not between the two runs, so it cancels in the slope::

    ((peak - baseline) at 224x224x160  -  (peak - baseline) at 112x112x80) / (8.0 M - 1.0 M voxels)

The bound on the slope, in bytes per input voxel:

=============  =====  ================  ==========================================================
stage          bound  measured slope    bytes/voxel above baseline at 512x512x400 (before -> after)
=============  =====  ================  ==========================================================
fingerprint    8      6.2               14.1 -> 5.2
preprocess     19     15.6 - 15.9       25.1 -> 16.0
predict        21     16.8 - 18.0       41.0 -> 21.5 (21.9 with mirroring; the network adds ~0.2 GB)
=============  =====  ================  ==========================================================

A regression that keeps one (fingerprint) or two (preprocess, predict) more float32 copies of the volume
(4 bytes per voxel each) breaks it. glibc is told to hand every freed block over 1 MB back to the system
(``MALLOC_MMAP_THRESHOLD_``; by default the threshold adapts up to 32 MB and mid-sized arrays freed into the
heap would count as held), so the RSS follows the arrays actually held. Prediction uses a tiny 1x1x1-kernel
network and mirrors one axis (2 passes instead of 8; the passes are averaged per window either way) to stay
fast. Linux only (``/proc``).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]

SHAPES = {"large": (160, 224, 224), "small": (80, 112, 112)}  # z, y, x
PATCH = (32, 64, 64)
SLOPE_BOUND = {"fingerprint": 8.0, "preprocess": 19.0, "predict": 21.0}  # bytes per input voxel
#: glibc returns every freed block over 1 MB to the system (by default the threshold adapts up to 32 MB, and
#: mid-sized arrays freed into the heap would count as used): the RSS then follows the arrays actually held
ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def _benchmark_module():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "memory_large_volume.py"
    spec = importlib.util.spec_from_file_location("memory_large_volume", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """Both datasets planned (the fingerprint stage measured); the large one's work folder holds the model."""
    bench = _benchmark_module()
    root = tmp_path_factory.mktemp("memory")
    cases = {}
    for size, shape in SHAPES.items():
        dataset, workdir, image = bench.prepare(root / size, shape)
        cases[size] = (dataset, workdir, image, bench.run_stage("fingerprint", dataset, workdir, image, env=ENV))
    bench.after_planning(cases["large"][1], PATCH, kernel=1, mirror_axes=(0,))
    return bench, cases


def _check_slope(stage: str, results: dict[str, dict[str, float]]) -> None:
    used = {size: (r["peak_kb"] - r["baseline_kb"]) * 1024 for size, r in results.items()}
    voxels = {size: math.prod(shape) for size, shape in SHAPES.items()}
    slope = (used["large"] - used["small"]) / (voxels["large"] - voxels["small"])
    assert slope <= SLOPE_BOUND[stage], (
        f"{stage}: the peak RSS grows by {slope:.1f} bytes per voxel (bound {SLOPE_BOUND[stage]}): "
        f"{used['small'] / 1e6:.0f} MB above the baseline at {voxels['small']} voxels, "
        f"{used['large'] / 1e6:.0f} MB at {voxels['large']}")


def test_fingerprint_memory_per_voxel_is_bounded(planned):
    _, cases = planned
    _check_slope("fingerprint", {size: c[3] for size, c in cases.items()})


def test_preprocess_memory_per_voxel_is_bounded(planned):
    bench, cases = planned
    _check_slope("preprocess", {size: bench.run_stage("preprocess", *c[:3], env=ENV) for size, c in cases.items()})


@pytest.mark.parametrize("stage", ["predict", "predict_tta"])
def test_predict_memory_per_voxel_is_bounded_with_and_without_mirroring(planned, stage):
    bench, cases = planned
    workdir = cases["large"][1]  # one model predicts both volumes (same spacing)
    results = {}
    written = workdir / f"pred_{stage}" / "ct_000.nii.gz"
    for size, (dataset, _, image, _) in cases.items():
        written.unlink(missing_ok=True)
        results[size] = bench.run_stage(stage, dataset, workdir, image, step=1.0, env=ENV)  # step: time only
        assert written.is_file()
    _check_slope("predict", results)
