"""Unusual but valid datasets go through plan, train and predict: huge intensities, integer types that overflow
narrower ones, extreme anisotropy, unicode and spaces in paths, images smaller than the patch, a single case.
Each ends with a segmentation in every input's geometry."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.data.synthetic import make_synthetic_dataset

FAST = ["--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1", "--workers", "0", "--device", "cpu"]


def rewrite(path: Path, change: Callable[[np.ndarray], np.ndarray]) -> None:
    im = sitk.ReadImage(str(path))
    out = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(im)))
    out.SetSpacing(im.GetSpacing())
    out.SetOrigin(im.GetOrigin())
    out.SetDirection(im.GetDirection())
    sitk.WriteImage(out, str(path))


def dataset(root: Path, name: str = "Dataset002_Awkward", **kw) -> Path:
    args = {"n_cases": 3, "shape": (16, 16, 16), "n_channels": 1, "kind": "binary", "seed": 3, "shape_jitter": 0}
    return make_synthetic_dataset(root / name, **{**args, **kw})


def huge_intensities(ds: Path) -> None:
    for p in (ds / "imagesTr").iterdir():
        rewrite(p, lambda a: (a * 1e30).astype(np.float32))


def wide_integer_types(ds: Path) -> None:
    for p in (ds / "imagesTr").iterdir():  # values above int32's range
        rewrite(p, lambda a: (a.astype(np.float64) * 2.5e7).astype(np.uint32))
    for p in (ds / "labelsTr").iterdir():
        rewrite(p, lambda a: a.astype(np.int64))


def smaller_than_patch(ds: Path) -> None:
    for name in ("imagesTr/case_000_0000", "labelsTr/case_000"):
        rewrite(ds / f"{name}.nii.gz", lambda a: a[:6, :5, :7].copy())


CASES = {
    "huge intensities (1e30)": ({}, huge_intensities),
    "uint32 images, int64 labels": ({}, wide_integer_types),
    "extreme anisotropy 10 x 0.5 x 0.5 mm": ({"shape": (8, 40, 40), "spacing": (10.0, 0.5, 0.5)}, None),
    "one case smaller than the patch": ({"shape": (24, 24, 24)}, smaller_than_patch),
    "unicode and spaces in paths": ({"name": "my data ü 数据/Dataset003_Ünï cödé"}, None),
}


def _run(cli, ds: Path, work: Path, out: Path, fold: str = "0") -> None:
    status, _, err = cli("plan", ds, "--workdir", work, "--preset", "cpu", "-j", "1")
    assert status == 0, err
    status, _, err = cli("train", ds, "3d_fullres", fold, "--workdir", work, *FAST)
    assert status == 0, err
    status, _, err = cli("predict", "-i", ds / "imagesTr", "-o", out, "--workdir", work, "--device", "cpu", "--no-tta")
    assert status == 0, err
    for image in sorted((ds / "imagesTr").glob("*_0000.nii.gz")):
        seg, ref = sitk.ReadImage(str(out / image.name.replace("_0000", ""))), sitk.ReadImage(str(image))
        assert seg.GetSize() == ref.GetSize() and np.allclose(seg.GetSpacing(), ref.GetSpacing())
        assert np.allclose(seg.GetOrigin(), ref.GetOrigin()) and np.allclose(seg.GetDirection(), ref.GetDirection())


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(CASES))
def test_awkward_dataset_runs_end_to_end(kind, cli, tmp_path):
    kwargs, change = CASES[kind]
    ds = dataset(tmp_path, **kwargs)
    if change is not None:
        change(ds)
    work = tmp_path / "work"
    _run(cli, ds, work, tmp_path / "out")
    fingerprint = json.loads((work / "fingerprint.json").read_text())
    stats = fingerprint.get("intensity") or fingerprint.get("intensity_properties")
    values = [v for ch in stats for v in ch.values() if isinstance(v, float)]
    assert values and all(math.isfinite(v) for v in values)  # no overflow in the statistics
    if "1e30" in kind:
        assert min(values) > 1e31  # kept in range, not clipped to float32's limits or to 0
    if "uint32" in kind:
        assert max(values) > 2**31  # read as unsigned 32-bit, not wrapped around


@pytest.mark.slow
def test_a_single_case_trains_fold_all_and_says_so_for_cv(cli, tmp_path, clear_error):
    ds = dataset(tmp_path, n_cases=1)
    work = tmp_path / "work"
    assert cli("plan", ds, "--workdir", work, "--preset", "cpu", "-j", "1")[0] == 0
    status, _, err = cli("train", ds, "3d_fullres", "0", "--workdir", work, *FAST)
    clear_error(status, err, "needs at least 5 cases", "has 1", "autoseg train DATASET CONFIG all")
    shutil.rmtree(work)
    _run(cli, ds, work, tmp_path / "out", fold="all")


@pytest.mark.slow
def test_three_cases_get_three_folds(cli, tmp_path):
    ds = dataset(tmp_path, n_cases=3)
    work = tmp_path / "work"
    assert cli("plan", ds, "--workdir", work, "--preset", "cpu", "-j", "1")[0] == 0
    assert cli("train", ds, "3d_fullres", "2", "--workdir", work, *FAST, "--no-validation")[0] == 0
    splits = json.loads((work / "splits.json").read_text())
    assert len(splits) == 3 and sorted(c for f in splits for c in f["val"]) == ["case_000", "case_001", "case_002"]
