"""The real NRRD cases shipped beside the project: check, fingerprint and plan them end to end.

Skipped when the shared data folder is absent (e.g. on a user's machine).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import autoseg

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pyradiomics_cases"
pytestmark = pytest.mark.skipif(not (DATA / "brain1_image.nrrd").is_file(), reason="shared real cases absent")


@pytest.fixture(scope="module")
def brain_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("real") / "Dataset020_Brain"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case in ("brain1", "brain2"):
        shutil.copy(DATA / f"{case}_image.nrrd", root / "imagesTr" / f"{case}_0000.nrrd")
        shutil.copy(DATA / f"{case}_label.nrrd", root / "labelsTr" / f"{case}.nrrd")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MR"}, "labels": {"background": 0, "lesion": 1}, "numTraining": 2,
        "file_ending": ".nrrd"}))
    return root


def test_real_cases_pass_the_check(brain_dataset):
    report = autoseg.check(brain_dataset, progress=False)
    assert report.ok, report.format_table()


def test_real_cases_fingerprint_and_plan_keep_their_anisotropy(brain_dataset, tmp_path):
    plans = autoseg.plan(brain_dataset, workdir=tmp_path, progress=False)
    fp = autoseg.load_fingerprint(tmp_path / "fingerprint.json")
    assert fp.median_spacing[0] == pytest.approx(6.5, rel=1e-3)
    assert fp.median_spacing[1] == pytest.approx(0.78125, rel=1e-3)
    assert [c.shape[0] for c in fp.cases] == [25, 23]
    assert all(c.component_sizes[1] for c in fp.cases)  # both cases hold a lesion
    full = plans.configurations["3d_fullres"]
    assert full.spacing[0] == pytest.approx(6.5, rel=1e-3)
    assert full.patch_size[0] <= 32 and full.patch_size[1] >= 4 * full.patch_size[0]  # thin slabs, wide in-plane
