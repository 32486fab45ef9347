"""Broken inputs to ``autoseg predict``: each exits 2 before predicting anything, with a message naming the file,
the problem and the fix, no traceback, and the predictions already in the output folder untouched."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.io.image import read_image, write_image


def img(folder: Path, channel: int = 0, case: int = 0, ending: str = ".nii.gz") -> Path:
    return folder / f"case_{case:03d}_{channel:04d}{ending}"


def as_2d(folder: Path) -> None:
    for c in (0, 1):
        sitk.WriteImage(sitk.ReadImage(str(img(folder, c)))[:, :, 8], str(img(folder, c)))


def as_4d(folder: Path) -> None:
    im = sitk.ReadImage(str(img(folder)))
    sitk.WriteImage(sitk.JoinSeries([im, im]), str(img(folder)))


def nan_in_nrrd(folder: Path) -> None:
    for c in (0, 1):
        image = read_image(img(folder, c))
        arr = image.array[0].astype(np.float32)
        arr[2, 3, 4] = np.nan
        write_image(img(folder, c, ending=".nrrd"), arr, image.geometry)
        img(folder, c).unlink()
    for p in folder.glob("case_001_*"):
        p.unlink()


def other_grid(folder: Path) -> None:
    sitk.WriteImage(sitk.ReadImage(str(img(folder, 1)))[:, :, :10], str(img(folder, 1)))


# kind -> (defect on a copy of the input folder, text that must appear: the file, the problem, the fix)
KINDS: dict[str, tuple[Callable[[Path], object], tuple[str, ...]]] = {
    "missing channel file": (lambda f: img(f, 1).unlink(), ("case_000_0001.nii.gz", "missing channel", "--missing")),
    "extra channel file": (lambda f: shutil.copy(img(f, 1), img(f, 2)),
                           ("case_000_0002.nii.gz", "takes 2 channel(s)", "remove the extra file")),
    "2D image for a 3D model": (as_2d, ("case_000_0000.nii.gz", "2D image", "give 3D files")),
    "4D image": (as_4d, ("case_000_0000.nii.gz", "4D image", "give 3D files")),
    "channels on different grids": (other_grid, ("case_000_0001.nii.gz", "same grid", "resample")),
    "not an image": (lambda f: img(f).write_text("report.pdf\n"), ("case_000_0000.nii.gz", "cannot be read", "re-copy")),
    "zero-size file": (lambda f: img(f).write_bytes(b""), ("case_000_0000.nii.gz", "empty", "re-copy")),
    "NaN voxels": (nan_in_nrrd, ("case_000_0000.nrrd", "NaN", "nan_to_num")),
    "empty input folder": (lambda f: [p.unlink() for p in f.iterdir()], ("no image files", "CASE_0000.nii.gz")),
    "files without channel suffix": (lambda f: [p.rename(f / p.name.replace("_0000", "")) for p in f.glob("*_0000*")],
                                     ("case_000.nii.gz", "no channel suffix", "name the files")),
}


@pytest.fixture
def inputs(copy_of, clean_dataset) -> Path:
    return copy_of(clean_dataset / "imagesTr", "inputs")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bad_input_is_refused_before_any_prediction(kind, cli, inputs, copy_of, clean_work, snapshot, clear_error):
    defect, needles = KINDS[kind]
    defect(inputs)
    out = copy_of(clean_work.parent / "predicted", "out")
    before = snapshot(out)
    status, _, err = cli("predict", "-i", inputs, "-o", out, "--workdir", clean_work, "--device", "cpu", "--overwrite")
    clear_error(status, err, *needles)
    assert snapshot(out) == before  # earlier predictions kept, nothing half-written added


def test_a_file_in_the_way_of_the_output_folder(cli, inputs, tmp_path, clean_work, clear_error):
    blocker = tmp_path / "results"
    blocker.write_text("keep me")
    status, _, err = cli("predict", "-i", inputs, "-o", blocker, "--workdir", clean_work, "--device", "cpu")
    clear_error(status, err, "results", "in the way of the output folder", "give a folder with -o")
    assert blocker.read_text() == "keep me"


def test_output_folder_equal_to_input_folder(cli, inputs, clean_work, snapshot, clear_error):
    before = snapshot(inputs)
    status, _, err = cli("predict", "-i", inputs, "-o", inputs, "--workdir", clean_work, "--device", "cpu")
    clear_error(status, err, "the output folder is the input folder", "another folder")
    assert snapshot(inputs) == before


def test_unknown_missing_channel_suggests_the_name(cli, inputs, clean_work, clear_error):
    status, _, err = cli("predict", "-i", inputs, "-o", inputs.parent / "o", "--workdir", clean_work,
                         "--device", "cpu", "--missing", "MR2")
    clear_error(status, err, "--missing 'MR2'", "MR0")
