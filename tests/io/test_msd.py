"""Medical Segmentation Decathlon -> nnU-Net v2 conversion on a tiny MSD folder made here."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from autoseg.errors import AutosegError, DatasetError
from autoseg.io.dataset import load_dataset
from autoseg.io.image import read_image, read_label
from autoseg.io.msd import convert_msd

# A flip + axis swap with float32-exact values: MSD files carry such affines.
AFFINE = np.array([[-1.5, 0, 0, 10.25], [0, 0, 2.0, -3.5], [0, 1.25, 0, 7.0], [0, 0, 0, 1]])
MODALITY = {"0": "FLAIR", "1": "T1w", "2": "t1gd"}


def _save(path: Path, arr: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(arr, AFFINE), str(path))


@pytest.fixture
def msd(tmp_path) -> Path:
    src = tmp_path / "Task01_BrainTumour"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (src / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    training = []
    for cid in ("BRATS_001", "BRATS_002"):
        _save(src / "imagesTr" / f"{cid}.nii.gz", rng.normal(size=(6, 7, 5, 3)).astype(np.float32))
        _save(src / "labelsTr" / f"{cid}.nii.gz", rng.integers(0, 4, size=(6, 7, 5)).astype(np.uint8))
        (src / "imagesTr" / f"._{cid}.nii.gz").write_bytes(b"\x00\x05\x16\x07 resource fork")
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
    _save(src / "imagesTs" / "BRATS_900.nii.gz", rng.normal(size=(6, 7, 5, 3)).astype(np.float32))
    (src / "imagesTs" / "._BRATS_900.nii.gz").write_bytes(b"junk")
    meta = {"name": "BRATS", "description": "tiny", "licence": "CC-BY-SA 4.0", "tensorImageSize": "4D",
            "modality": MODALITY,
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            "numTraining": 2, "numTest": 1, "training": training,
            "test": ["./imagesTs/BRATS_900.nii.gz", "./imagesTs/._BRATS_900.nii.gz"]}
    (src / "dataset.json").write_text(json.dumps(meta))
    return src


def test_conversion_gives_a_loadable_nnunet_dataset(msd, tmp_path):
    out = convert_msd(msd, tmp_path / "raw", dataset_id=1, progress=False)
    assert out == tmp_path / "raw" / "Dataset001_BrainTumour"
    ds = load_dataset(out)
    assert [c.case_id for c in ds.cases] == ["BRATS_001", "BRATS_002"] and ds.stray_files == ()
    assert ds.spec.channel_names == ("FLAIR", "T1w", "t1gd") and ds.spec.num_training == 2
    assert ds.spec.labels == {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}
    assert ds.spec.file_ending == ".nii.gz"
    assert [c.case_id for c in ds.test_cases()] == ["BRATS_900"]
    written = json.loads((out / "dataset.json").read_text())
    assert written["licence"] == "CC-BY-SA 4.0" and "modality" not in written and "training" not in written
    assert not any(p.name.startswith("._") for p in out.rglob("*"))


def test_channels_are_split_with_exact_values_and_geometry(msd, tmp_path):
    out = convert_msd(msd, tmp_path / "Dataset001_X", progress=False)
    four_d = nib.load(str(msd / "imagesTr" / "BRATS_002.nii.gz"))
    src_geometry = read_image(msd / "imagesTr" / "BRATS_002.nii.gz").geometry
    for c in range(3):
        part = out / "imagesTr" / f"BRATS_002_{c:04d}.nii.gz"
        img = nib.load(str(part))
        assert img.shape == (6, 7, 5)
        assert np.array_equal(np.asarray(img.dataobj), np.asarray(four_d.dataobj)[..., c])
        assert np.array_equal(img.affine, AFFINE)
        assert read_image(part).geometry == src_geometry
    assert read_image(out / "imagesTs" / "BRATS_900_0002.nii.gz").array.shape == (1, 5, 7, 6)


def test_labels_are_copied_unchanged(msd, tmp_path):
    out = convert_msd(msd, tmp_path / "ds", progress=False)
    for cid in ("BRATS_001", "BRATS_002"):
        assert (out / "labelsTr" / f"{cid}.nii.gz").read_bytes() == (msd / "labelsTr" / f"{cid}.nii.gz").read_bytes()
    assert read_label(out / "labelsTr" / "BRATS_001.nii.gz").array.dtype == np.uint8


def test_missing_folder_or_dataset_json(tmp_path):
    with pytest.raises(DatasetError, match="MSD task folder not found"):
        convert_msd(tmp_path / "Task99_Nope", tmp_path / "out", progress=False)
    (tmp_path / "Task98_Empty").mkdir()
    with pytest.raises(DatasetError, match=r"Task98_Empty/dataset.json: not found"):
        convert_msd(tmp_path / "Task98_Empty", tmp_path / "out", progress=False)


def test_nnunet_dataset_is_not_mistaken_for_msd(tmp_path):
    src = tmp_path / "Dataset001_Already"
    src.mkdir()
    (src / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0},
                                                  "numTraining": 0, "file_ending": ".nii.gz"}))
    with pytest.raises(DatasetError, match="'modality'.*needs no conversion"):
        convert_msd(src, tmp_path / "out", progress=False)


def test_listed_image_that_is_absent_is_named(msd, tmp_path):
    (msd / "imagesTr" / "BRATS_002.nii.gz").unlink()
    with pytest.raises(AutosegError) as err:
        convert_msd(msd, tmp_path / "out", progress=False)
    assert "BRATS_002.nii.gz" in str(err.value) and "not found" in str(err.value)
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_wrong_channel_count_is_explained(msd, tmp_path):
    meta = json.loads((msd / "dataset.json").read_text())
    meta["modality"] = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    (msd / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="holds 3 channel.*names 4"):
        convert_msd(msd, tmp_path / "out", progress=False)


def test_non_empty_destination_needs_overwrite(msd, tmp_path):
    out = tmp_path / "ds"
    convert_msd(msd, out, progress=False)
    (out / "imagesTr" / "stale_0000.nii.gz").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty.*overwrite"):
        convert_msd(msd, out, progress=False)
    convert_msd(msd, out, overwrite=True, progress=False)
    assert not (out / "imagesTr" / "stale_0000.nii.gz").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert load_dataset(out).stray_files == ()


def test_bad_dataset_id_is_refused(msd, tmp_path):
    with pytest.raises(DatasetError, match="1 to 999"):
        convert_msd(msd, tmp_path, dataset_id=1000, progress=False)
