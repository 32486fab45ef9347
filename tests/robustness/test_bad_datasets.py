"""Broken training datasets through ``autoseg plan``: each kind exits 2 with a message naming the file, the
problem and the fix (or plans with a warning where the data is usable), shows no traceback, and leaves the
dataset and the earlier results in the work folder exactly as they were."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.io.image import read_image, write_image

IMAGES, LABELS = "imagesTr", "labelsTr"


def img(ds: Path, channel: int = 0, case: int = 0, ending: str = ".nii.gz") -> Path:
    return ds / IMAGES / f"case_{case:03d}_{channel:04d}{ending}"


def lab(ds: Path, case: int = 0, ending: str = ".nii.gz") -> Path:
    return ds / LABELS / f"case_{case:03d}{ending}"


def rewrite(path: Path, change: Callable[[np.ndarray], np.ndarray], spacing: tuple[float, ...] | None = None) -> None:
    """Read, change the voxels (numpy z, y, x), write back with the same geometry (or another spacing)."""
    im = sitk.ReadImage(str(path))
    out = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(im)))
    out.SetSpacing(spacing or im.GetSpacing())
    out.SetOrigin(im.GetOrigin())
    out.SetDirection(im.GetDirection())
    sitk.WriteImage(out, str(path))


def edit_json(ds: Path, **fields) -> None:
    d = json.loads((ds / "dataset.json").read_text())
    for k, v in fields.items():
        d.pop(k) if v is None else d.__setitem__(k, v)
    (ds / "dataset.json").write_text(json.dumps(d))


def nan_nifti(ds: Path) -> None:
    """NaN stored in a float NIfTI file (nibabel writes it; SimpleITK would read it back as 0)."""
    n = nib.load(str(img(ds)))
    a = np.asanyarray(n.dataobj).astype(np.float32)
    a[a > np.median(a)] = np.nan
    nib.save(nib.Nifti1Image(a, n.affine, n.header), str(img(ds)))


def to_nrrd_with_nan(ds: Path) -> None:
    for p in sorted((ds / IMAGES).iterdir()) + sorted((ds / LABELS).iterdir()):
        image = read_image(p)
        arr = image.array[0]
        if p == img(ds):
            arr = arr.astype(np.float32)
            arr[0, 0, :3] = np.nan
            arr[1, 1, 1] = np.inf
        write_image(Path(str(p).replace(".nii.gz", ".nrrd")), arr, image.geometry)
        p.unlink()
    edit_json(ds, file_ending=".nrrd")


def all_files_to(ds: Path, ending: str) -> None:
    for p in sorted((ds / IMAGES).iterdir()) + sorted((ds / LABELS).iterdir()):
        sitk.WriteImage(sitk.ReadImage(str(p)), str(p).replace(".nii.gz", ending))
        p.unlink()


def four_d(ds: Path) -> None:
    im = sitk.ReadImage(str(img(ds)))
    sitk.WriteImage(sitk.JoinSeries([im, im]), str(img(ds)))


def one_case_2d(ds: Path) -> None:
    for p in (img(ds, 0, 2), img(ds, 1, 2), lab(ds, 2)):
        im = sitk.ReadImage(str(p))
        sitk.WriteImage(im[:, :, 8], str(p))


# kind -> (defect, "error" or "warning", text that must appear: the file, the problem, the fix)
KINDS: dict[str, tuple[Callable[[Path], None], str, tuple[str, ...]]] = {
    "missing channel file": (lambda ds: img(ds, 1).unlink(), "error",
                             ("case_000_0001.nii.gz", "is missing", "add case_000_0001.nii.gz")),
    "extra channel file": (lambda ds: shutil.copy(img(ds, 1), img(ds, 2)), "warning",
                           ("case_000_0002.nii.gz", "channel 0002 is not declared", "add the channel to channel_names")),
    "label shape differs from image": (lambda ds: rewrite(lab(ds), lambda a: a[:-2].copy()), "error",
                                       ("case_000_0000.nii.gz", "differs from the label's shape", "resample or crop")),
    "label spacing differs from image": (lambda ds: rewrite(lab(ds), lambda a: a, spacing=(1.0, 1.0, 3.0)), "error",
                                         ("case_000_0000.nii.gz", "spacing", "resample the file onto the label's grid")),
    "0/255 mask": (lambda ds: rewrite(lab(ds), lambda a: (a > 0).astype(np.uint8) * 255), "error",
                   ("case_000.nii.gz", "255", "map 255 to 1")),
    "undeclared label value": (lambda ds: rewrite(lab(ds), lambda a: np.where(a > 0, 3, 0).astype(np.uint8)), "error",
                               ("case_000.nii.gz", "not declared in dataset.json: 3", "declare the values")),
    "non-consecutive labels": (lambda ds: edit_json(ds, labels={"background": 0, "lesion": 1, "rare": 3}), "warning",
                               ("dataset.json", "not consecutive", "relabel")),
    "negative label values": (lambda ds: rewrite(lab(ds), lambda a: np.where(a > 0, -1, 0).astype(np.int16)), "error",
                              ("case_000.nii.gz", "negative label values -1", "relabel the negative values")),
    "anti-aliased float labels": (lambda ds: rewrite(lab(ds), lambda a: (a * 0.5).astype(np.float32)), "error",
                                  ("case_000.nii.gz", "non-integer label values", "round the mask")),
    "NaN stored in NIfTI": (nan_nifti, "warning", ("case_000_0000.nii.gz", "NaN", "they are read as 0", "nan_to_num")),
    "NaN and inf in NRRD": (to_nrrd_with_nan, "error", ("case_000_0000.nrrd", "3 NaN and 1 inf", "nan_to_num")),
    "4D file where 3D is expected": (four_d, "error", ("case_000_0000.nii.gz", "4D", "convert-msd")),
    "one case 2D among 3D cases": (one_case_2d, "error", ("case_002", "2D", "3D")),
    "zero-size file": (lambda ds: img(ds).write_bytes(b""), "error", ("case_000_0000.nii.gz", "empty", "re-copy")),
    "truncated file": (lambda ds: img(ds).write_bytes(img(ds).read_bytes()[:2000]), "error",
                       ("case_000_0000.nii.gz", "truncated", "re-copy")),
    "not an image": (lambda ds: img(ds).write_text("patient notes\n"), "error",
                     ("case_000_0000.nii.gz", "cannot be read", "re-export")),
    "wrong file ending": (lambda ds: all_files_to(ds, ".nrrd"), "error",
                          ("case_000_0000.nrrd", "no training cases found", "file_ending '.nii.gz'", "rename it to a '.nii.gz' file")),
    "dataset.json missing a field": (lambda ds: edit_json(ds, labels=None), "error",
                                     ("dataset.json", "missing required key(s) labels", '"labels" (e.g.')),
    "dataset.json field of the wrong type": (lambda ds: edit_json(ds, channel_names=["MR", "CT"]), "error",
                                             ("dataset.json", "'channel_names' must be", '{"0": "T1"')),
    "dataset.json not valid JSON": (lambda ds: (ds / "dataset.json").write_text('{"labels": '), "error",
                                    ("dataset.json", "not valid JSON", "Fix the syntax")),
    "dataset.json absent": (lambda ds: (ds / "dataset.json").unlink(), "error",
                            ("dataset.json", "not found", "convert-msd")),
    "numTraining wrong": (lambda ds: edit_json(ds, numTraining=7), "error",
                          ("dataset.json", "numTraining is 7 but 3 cases", '"numTraining": 3')),
    "duplicate case id (.nii beside .nii.gz)": (lambda ds: shutil.copy(img(ds), img(ds, ending=".nii")), "error",
                                                ("case_000_0000.nii", "may be read from the wrong file", "remove")),
    "duplicate case under another id": (
        lambda ds: [shutil.copy(img(ds, c), img(ds, c, 3)) for c in (0, 1)] + [shutil.copy(lab(ds), lab(ds, 3)),
                                                                               edit_json(ds, numTraining=4)],
        "warning", ("case_003", "identical to case case_000", "remove one copy")),
    "missing label file": (lambda ds: lab(ds).unlink(), "error", ("case_000.nii.gz", "is missing", "add the label")),
    "class absent from every case": (lambda ds: edit_json(ds, labels={"background": 0, "lesion": 1, "vessel": 2}),
                                     "warning", ("vessel", "absent from every case", "remove it from 'labels'")),
    "all-background dataset": (lambda ds: [rewrite(lab(ds, i), np.zeros_like) for i in range(3)], "error",
                               ("labelsTr", "nothing to learn", "check the label export")),
}


def test_at_least_25_kinds():
    assert len(KINDS) >= 25


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bad_dataset_gives_a_clear_message_and_damages_nothing(kind, cli, copy_of, snapshot, clear_error, mentions,
                                                               clean_dataset, clean_work):
    defect, severity, needles = KINDS[kind]
    ds, work = copy_of(clean_dataset), copy_of(clean_work)
    defect(ds)
    before_ds, before_work = snapshot(ds), snapshot(work)
    status, out, err = cli("plan", ds, "--workdir", work, "--preset", "cpu", "-j", "1")
    assert snapshot(ds) == before_ds  # the dataset is never touched
    if severity == "error":
        clear_error(status, err, *needles)
        assert snapshot(work) == before_work  # the earlier fingerprint, plans and models are intact
    else:
        assert status == 0 and "Traceback" not in err, err
        mentions(err, "warning", *needles)
        assert (work / "plans.json").is_file() and (work / "models").is_dir()


def test_missing_dataset_folder(cli, clear_error, tmp_path):
    status, _, err = cli("plan", tmp_path / "Dataset009_Nowhere", "--workdir", tmp_path / "w")
    clear_error(status, err, "Dataset009_Nowhere", "not found", "Pass the folder that holds dataset.json")
    assert not (tmp_path / "w").exists()
