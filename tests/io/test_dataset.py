"""dataset.json parsing and case discovery in the nnU-Net v2 raw layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoseg.errors import DatasetError
from autoseg.io.dataset import DatasetSpec, load_dataset, read_dataset_json

BASE = {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "tumour": 1},
        "numTraining": 2, "file_ending": ".nii.gz"}


def _spec(**changes) -> DatasetSpec:
    d = {**BASE, **changes}
    return DatasetSpec.from_json({k: v for k, v in d.items() if v is not None}, source="ds/dataset.json")


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def _layout(root: Path, d: dict | None = None, cases=("a", "b"), n_channels=2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(d or BASE))
    for cid in cases:
        for c in range(n_channels):
            _touch(root / "imagesTr" / f"{cid}_{c:04d}.nii.gz")
        _touch(root / "labelsTr" / f"{cid}.nii.gz")
    return root


def test_minimal_spec_parses():
    spec = _spec()
    assert spec.channel_names == ("T1", "T2") and spec.n_channels == 2
    assert spec.labels == {"background": 0, "tumour": 1} and spec.foreground_labels == (1,)
    assert spec.num_training == 2 and spec.file_ending == ".nii.gz" and not spec.has_regions


def test_region_labels_become_tuples_in_declared_order():
    spec = _spec(labels={"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3],
                         "enhancing_tumor": [3]}, regions_class_order=[1, 2, 3])
    assert spec.has_regions and spec.regions_class_order == (1, 2, 3)
    assert list(spec.labels) == ["background", "whole_tumor", "tumor_core", "enhancing_tumor"]
    assert spec.labels["whole_tumor"] == (1, 2, 3) and spec.labels["enhancing_tumor"] == 3
    assert spec.label_values == (0, 1, 2, 3)


def test_ignore_label_is_found_and_is_not_foreground():
    spec = _spec(labels={"background": 0, "tumour": 1, "ignore": 2})
    assert spec.ignore_label == 2 and spec.foreground_labels == (1,) and spec.label_values == (0, 1, 2)


def test_legacy_modality_key_warns_and_works():
    d = {k: v for k, v in BASE.items() if k != "channel_names"} | {"modality": {"0": "CT"}}
    with pytest.warns(UserWarning, match="modality.*channel_names"):
        spec = DatasetSpec.from_json(d)
    assert spec.channel_names == ("CT",)


def test_num_training_as_digit_string_is_accepted():
    assert _spec(numTraining="12").num_training == 12


@pytest.mark.parametrize(("changes", "words"), [
    ({"labels": None}, ["labels", '"background": 0']),
    ({"file_ending": None, "numTraining": None}, ["numTraining", "file_ending"]),
    ({"numTraining": "twelve"}, ["numTraining", "'twelve'", "integer"]),
    ({"numTraining": -1}, ["numTraining", "non-negative"]),
    ({"numTraining": True}, ["numTraining"]),
    ({"file_ending": "nii.gz"}, ["file_ending", "starting with '.'"]),
    ({"channel_names": ["T1", "T2"]}, ["channel_names", '{"0": "T1"']),
    ({"channel_names": {}}, ["channel_names", "non-empty"]),
    ({"channel_names": {"T1": "T1"}}, ["channel_names", "channel indices", '"0"']),
    ({"channel_names": {"0": "T1", "2": "T2"}}, ["channel_names", "without gaps", "CASE_0001"]),
    ({"channel_names": {"0": "T1", "00": "T2"}}, ["channel_names", "repeats"]),
    ({"labels": {"tumour": 1}}, ["background", "label 0"]),
    ({"labels": {"background": 0, "tumour": "one"}}, ["'tumour'", "integer"]),
    ({"labels": {"background": 0, "wt": [1, "2"]}}, ["region label 'wt'", "list of integers"]),
    ({"labels": {"background": 0, "wt": []}}, ["region label 'wt'"]),
    ({"regions_class_order": "1,2,3"}, ["regions_class_order", "list of integers"]),
])
def test_malformed_spec_messages_name_file_key_and_fix(changes, words):
    with pytest.raises(DatasetError) as err:
        _spec(**changes)
    message = str(err.value)
    assert message.startswith("ds/dataset.json")
    for word in words:
        assert word in message


def test_dataset_json_missing_or_broken(tmp_path):
    with pytest.raises(DatasetError, match="dataset.json: not found.*convert-msd"):
        read_dataset_json(tmp_path / "dataset.json")
    (tmp_path / "dataset.json").write_text('{"labels": {"background": 0,}}')
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_dataset_json(tmp_path / "dataset.json")
    (tmp_path / "dataset.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match="JSON object"):
        read_dataset_json(tmp_path / "dataset.json")


def test_cases_are_discovered_from_images_tr(tmp_path):
    root = _layout(tmp_path / "Dataset001_X", cases=("case_10", "case_2", "liver_001"))
    ds = load_dataset(root)
    assert [c.case_id for c in ds.cases] == ["case_10", "case_2", "liver_001"]
    first = ds.cases[0]
    assert [p.name for p in first.images] == ["case_10_0000.nii.gz", "case_10_0001.nii.gz"]
    assert first.label == root / "labelsTr" / "case_10.nii.gz"
    assert ds.stray_files == () and ds.name == "Dataset001_X"


def test_stray_files_and_labels_without_images_are_listed(tmp_path):
    root = _layout(tmp_path / "ds")
    strays = [_touch(root / "imagesTr" / "a.nii.gz"),  # no channel suffix
              _touch(root / "imagesTr" / "b_0000.nii"),  # wrong ending
              _touch(root / "imagesTr" / "readme.txt"),
              _touch(root / "labelsTr" / "ghost.nii.gz"),  # label without images
              _touch(root / "labelsTr" / "a.nrrd")]
    _touch(root / "imagesTr" / "._a_0000.nii.gz")  # macOS resource fork: ignored, not a case
    _touch(root / "imagesTr" / ".DS_Store")
    ds = load_dataset(root)
    assert [c.case_id for c in ds.cases] == ["a", "b"]
    assert sorted(ds.stray_files) == sorted(strays)


def test_case_with_missing_channel_still_lists_the_expected_file(tmp_path):
    root = _layout(tmp_path / "ds")
    (root / "imagesTr" / "b_0001.nii.gz").unlink()
    case_b = load_dataset(root).cases[1]
    assert case_b.images[1].name == "b_0001.nii.gz" and not case_b.images[1].exists()


def test_missing_folders_are_explained(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder not found"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps(BASE))
    with pytest.raises(DatasetError, match=r"imagesTr: folder not found.*CASE_0000\.nii\.gz"):
        load_dataset(tmp_path / "ds")


def test_explicit_dataset_listing(tmp_path):
    root = tmp_path / "ds"
    _touch(root / "scans" / "p1_t1.nii.gz")
    _touch(root / "scans" / "p1_t2.nii.gz")
    _touch(root / "masks" / "p1.nii.gz")
    listing = {"p1": {"images": ["scans/p1_t1.nii.gz", "./scans/p1_t2.nii.gz"], "label": "masks/p1.nii.gz"}}
    (root / "dataset.json").write_text(json.dumps({**BASE, "numTraining": 1, "dataset": listing}))
    ds = load_dataset(root)
    assert [c.case_id for c in ds.cases] == ["p1"]
    assert [p.name for p in ds.cases[0].images] == ["p1_t1.nii.gz", "p1_t2.nii.gz"]
    assert all(p.is_file() for p in ds.cases[0].images) and ds.cases[0].label.is_file()


@pytest.mark.parametrize("bad", ["../outside/p1.nii.gz", "scans/../../outside/p1.nii.gz", "/etc/passwd"])
def test_explicit_listing_refuses_paths_outside_the_folder(tmp_path, bad):
    root = tmp_path / "ds"
    listing = {"p1": {"images": [bad], "label": None}}
    _touch(root / "dataset.json").write_text(json.dumps({**BASE, "dataset": listing}))
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        load_dataset(root)


def test_explicit_listing_follows_symlinked_folders(tmp_path):
    elsewhere = tmp_path / "big_disk"
    _touch(elsewhere / "p1_0000.nii.gz")
    root = tmp_path / "ds"
    root.mkdir()
    (root / "imagesTr").symlink_to(elsewhere, target_is_directory=True)
    listing = {"p1": {"images": ["imagesTr/p1_0000.nii.gz"], "label": None}}
    (root / "dataset.json").write_text(json.dumps({**BASE, "channel_names": {"0": "CT"}, "dataset": listing}))
    assert load_dataset(root).cases[0].images[0].is_file()


@pytest.mark.parametrize("listing", [["p1"], {"p1": {"label": "x.nii.gz"}}, {"p1": {"images": [3]}}])
def test_malformed_explicit_listing_is_explained(tmp_path, listing):
    root = tmp_path / "ds"
    _touch(root / "dataset.json").write_text(json.dumps({**BASE, "dataset": listing}))
    with pytest.raises(DatasetError, match="'dataset'"):
        load_dataset(root)


def test_test_cases_come_from_images_ts(tmp_path):
    root = _layout(tmp_path / "ds")
    assert load_dataset(root).test_cases() == ()
    for c in range(2):
        _touch(root / "imagesTs" / f"new_{c:04d}.nii.gz")
    tests = load_dataset(root).test_cases()
    assert [t.case_id for t in tests] == ["new"] and tests[0].label is None
    assert [p.name for p in tests[0].images] == ["new_0000.nii.gz", "new_0001.nii.gz"]
