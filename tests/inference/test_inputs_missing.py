"""Predicting with channels (sequences) that were not acquired: which files are needed, the errors a user sees,
and the full zero-filled input a case reads back as."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from autoseg.inference.inputs import InputCase, PredictionInputError, check_cases, collect_cases, resolve_missing
from autoseg.io.image import Geometry, read_image, write_image
from autoseg.preprocessing.preprocess import preprocess_arrays, read_case

NAMES = ("T1", "T2", "FLAIR")
GEOM = Geometry(spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
SHAPE = (4, 6, 5)


def _write(folder: Path, name: str, value: float) -> Path:
    path = folder / f"{name}.nii.gz"
    arr = np.full(SHAPE, value, np.float32)
    arr[0, 0, 0] = value + 0.5  # not constant, so a mix-up of channels shows
    write_image(path, arr[None], GEOM)
    return path


@pytest.fixture
def folder(tmp_path):
    """Case ``a`` has all three channels, case ``b`` lacks FLAIR (_0002)."""
    d = tmp_path / "imagesTs"
    d.mkdir()
    for c in range(3):
        _write(d, f"a_{c:04d}", 10.0 + c)
    for c in range(2):
        _write(d, f"b_{c:04d}", 20.0 + c)
    return d


def test_a_lacking_channel_without_missing_says_how_to_skip_it(folder):
    with pytest.raises(PredictionInputError) as err:
        collect_cases([folder], NAMES)
    msg = str(err.value)
    assert "b_0002.nii.gz (FLAIR)" in msg and "if this sequence was not acquired, pass --missing FLAIR" in msg


@pytest.mark.parametrize("missing", [["FLAIR"], ["flair"], [2], ["2"], "Flair"])
def test_missing_channel_files_are_not_needed_and_ignored_if_present(folder, missing):
    cases = {c.case_id: c for c in collect_cases([folder], NAMES, missing=missing)}
    assert set(cases) == {"a", "b"}
    for cid, case in cases.items():
        assert case.missing == (2,) and case.present == (0, 1) and case.n_channels == 3
        assert [p.name for p in case.images] == [f"{cid}_0000.nii.gz", f"{cid}_0001.nii.gz"]


def test_a_middle_channel_missing_reads_back_zero_filled_in_channel_order(folder):
    for p in {*folder.glob("*_0001.nii.gz"), *folder.glob("b_*")}:
        p.unlink()
    with pytest.raises(PredictionInputError, match="pass --missing T2 FLAIR"):  # the hint keeps what was given
        collect_cases([folder], NAMES, missing=["FLAIR"])
    (case,) = collect_cases([folder], NAMES, missing=["T2"])
    assert case.present == (0, 2) and [p.name for p in case.images] == ["a_0000.nii.gz", "a_0002.nii.gz"]
    images, geometry = case.read()
    assert images.shape == (3, *SHAPE) and images.dtype == np.float32
    assert np.array_equal(images[0], read_image(folder / "a_0000.nii.gz").array[0])
    assert np.array_equal(images[2], read_image(folder / "a_0002.nii.gz").array[0])
    assert not images[1].any()
    assert geometry.differences(GEOM) == []


def test_nothing_missing_reads_like_the_full_case(folder):
    case = next(c for c in collect_cases([folder / f"a_{c:04d}.nii.gz" for c in range(3)], NAMES))
    assert case.missing == () and len(case.images) == 3
    images, _ = case.read()
    assert np.array_equal(images, read_case(case.as_case_files())[0])


def test_unknown_names_get_did_you_mean_and_the_channel_list(folder):
    with pytest.raises(PredictionInputError, match=r"'FLARE'.*Did you mean 'FLAIR'\?.*_0000 T1, _0001 T2, _0002 FLAIR"):
        collect_cases([folder], NAMES, missing=["FLARE"])
    with pytest.raises(PredictionInputError, match="out of range; this model has 3 channel"):
        resolve_missing([3], NAMES)
    with pytest.raises(PredictionInputError, match="every input channel"):
        collect_cases([folder], NAMES, missing=["T1", "t2", 2])
    assert resolve_missing(["flair", 0, "T1"], NAMES) == (0, 2)


def test_check_cases_reads_only_the_present_files(folder):
    _write(folder, "c_0000", 1.0)
    bad = folder / "c_0001.nii.gz"
    write_image(bad, np.ones((1, 4, 6, 6), np.float32), GEOM)  # another grid: still an error
    cases = collect_cases([folder], NAMES, missing=["FLAIR"])
    with pytest.raises(PredictionInputError, match="case c: c_0001.nii.gz has shape"):
        check_cases(cases)
    bad.unlink()
    _write(folder, "c_0001", 2.0)
    infos = check_cases(collect_cases([folder], NAMES, missing=["FLAIR"]))
    assert [i.shape for i in infos] == [SHAPE] * 3


def test_explicit_unsuffixed_files_of_the_present_channels_are_one_case(tmp_path):
    t1, t2 = _write(tmp_path, "patient_t1", 1.0), _write(tmp_path, "patient_t2", 2.0)
    (case,) = collect_cases([t1, t2], NAMES, missing=["FLAIR"])
    assert case.case_id == "patient_t1" and case.images == (t1, t2) and case.missing == (2,)
    flair = _write(tmp_path, "patient_flair", 3.0)
    (case,) = collect_cases([t1, t2, flair], NAMES, missing=["T2"])  # all given: the missing one is ignored
    assert case.images == (t1, flair) and case.present == (0, 2)
    (only,) = collect_cases([t2], NAMES[:2], missing=["T1"])  # one channel left: a plain file is that channel
    assert only.images == (t2,) and only.present == (1,)
    images, _ = only.read()
    assert not images[0].any() and images[1].max() == 2.5


def test_a_case_without_a_sequence_preprocesses_like_the_full_case_with_it_marked_missing(tiny_brats, tmp_path):
    ds, _, plans = tiny_brats
    cfg = plans.configuration("3d_fullres")
    src = ds.cases[0]
    shutil.copy(src.images[0], tmp_path / src.images[0].name)  # only the first channel was acquired
    (case,) = collect_cases([tmp_path], plans.channel_names, missing=[plans.channel_names[1]])
    images, geometry = case.read()
    got = preprocess_arrays(images, None, geometry, plans, cfg, missing=case.missing)
    full, _, full_geometry = read_case(src)
    ref = preprocess_arrays(full, None, full_geometry, plans, cfg, missing=(1,))
    assert np.array_equal(got.data, ref.data) and not got.data[1].any()
    assert got.properties.bbox_t == ref.properties.bbox_t


def test_input_case_defaults_keep_the_old_shape():
    case = InputCase("x", (Path("x_0000.nii.gz"),), ".nii.gz")
    assert case.missing == () and case.present == (0,) and case.n_channels == 1
