"""The example scripts and the notebook run as documented (in a scratch folder, in their quick variants)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    run = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "MPLBACKEND": "Agg", **(env or {})})
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:])
    return run.stdout


@pytest.mark.slow
def test_quickstart_runs_from_data_to_predictions(tmp_path):
    out = _run([str(EXAMPLES / "quickstart.py")], tmp_path)
    assert "labels in test_000" in out
    assert sorted(p.name for p in (tmp_path / "quickstart_data" / "predictions").glob("*.nii.gz")) == [
        "test_000.nii.gz", "test_001.nii.gz"]


@pytest.mark.slow
def test_own_dataset_example_converts_trains_predicts_and_scores(tmp_path):
    _run([str(EXAMPLES / "own_dataset.py"), "--quick"], tmp_path)
    root = tmp_path / "own_dataset_example"
    spec = json.loads((root / "Dataset010_Liver" / "dataset.json").read_text())
    assert spec["numTraining"] == 8 and spec["channel_names"] == {"0": "CT"}
    assert len(list((root / "Dataset010_Liver" / "imagesTr").glob("*_0000.nii.gz"))) == 8
    summary = json.loads((root / "predictions" / "summary.json").read_text())
    assert len(summary["cases"]) == 2


@pytest.mark.slow
def test_brats_regions_example_scores_each_region(tmp_path):
    out = _run([str(EXAMPLES / "brats_regions.py"), "--quick"], tmp_path)
    root = tmp_path / "brats_example"
    for region in ("whole_tumor", "tumor_core", "enhancing_tumor"):
        assert region in (root / "predictions" / "volumes.csv").read_text()
        assert region in out
    assert len(list((root / "predictions_no_t1ce").glob("test_*.nii.gz"))) == 2


@pytest.mark.slow
def test_ensemble_export_example_verifies_and_predicts_from_the_bundle(tmp_path):
    out = _run([str(EXAMPLES / "ensemble_export.py"), "--quick"], tmp_path)
    root = tmp_path / "ensemble_example"
    assert "OK" in out and (root / "bundle" / "manifest.json").is_file()
    for folder in ("submission", "pred_ensemble"):
        assert sorted(p.name for p in (root / folder).glob("test_*.nii.gz")) == ["test_000.nii.gz",
                                                                                 "test_001.nii.gz"]


@pytest.mark.slow
def test_uncertainty_example_flags_the_suspicious_inputs(tmp_path):
    out = _run([str(EXAMPLES / "uncertainty.py"), "--quick"], tmp_path)
    rows = {line.split()[0]: line for line in out.splitlines() if "flagged=" in line}
    assert "flagged=True" in rows["wrong_spacing"] and "flagged=True" in rows["corrupted"]
    assert (tmp_path / "uncertainty_example" / "predictions" / "uncertainty" / "test_000_entropy.nii.gz").is_file()


@pytest.mark.slow
def test_notebook_cells_run_in_order(tmp_path):
    notebook = json.loads((EXAMPLES / "tour.ipynb").read_text())
    code = "\n\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    (tmp_path / "tour.py").write_text(code + "\nprint('NOTEBOOK DONE')\n")
    # like a kernel, no __main__ file: spawned worker processes must not rerun the cells
    out = _run(["-c", "exec(open('tour.py').read())"], tmp_path, env={"AUTOSEG_EXAMPLE_QUICK": "1"})
    assert "NOTEBOOK DONE" in out and "mean foreground Dice" in out
