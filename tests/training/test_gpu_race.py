"""The GPU race script runs end to end as a CPU dry run (tiny data, no nnU-Net) and writes its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_race_dry_run_writes_every_phase(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_race.sh"), "--tiny", str(tmp_path / "race")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "race" / "results.json").read_text())
    phases = results["phases"]
    for name in ("brats4", "ct1"):
        assert phases[f"autoseg_gpu_only[{name}]"]["it_per_s"] > 0
        assert phases[f"autoseg_pipeline[{name}]"]["it_per_s"] > 0
        assert phases[f"bf16_check[{name}]"]["loss_rel_diff"] < 0.05
        assert "nnunet" in phases["data"][name] and f"nnunet[{name}]" in phases
    assert "## bf16_check[ct1]" in (tmp_path / "race" / "results.md").read_text()
