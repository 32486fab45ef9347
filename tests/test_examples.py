"""The example scripts run as documented (in a scratch folder)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_quickstart_runs_from_data_to_predictions(tmp_path):
    run = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "labels in test_000" in run.stdout
    assert sorted(p.name for p in (tmp_path / "quickstart_data" / "predictions").glob("*.nii.gz")) == [
        "test_000.nii.gz", "test_001.nii.gz"]
