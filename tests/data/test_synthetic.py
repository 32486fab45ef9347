"""The synthetic dataset generator: deterministic, loadable, and shaped like the tasks it imitates."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from autoseg.data.synthetic import make_synthetic_dataset
from autoseg.errors import AutosegError
from autoseg.io.dataset import load_dataset
from autoseg.io.image import read_header, read_image, read_label

SMALL = (20, 20, 20)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", n_cases=2, shape=SMALL, n_test=1, seed=5)
    b = make_synthetic_dataset(tmp_path / "b", n_cases=2, shape=SMALL, n_test=1, seed=5)
    c = make_synthetic_dataset(tmp_path / "c", n_cases=2, shape=SMALL, n_test=1, seed=6)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb
    assert fa.keys() == fc.keys()
    assert fa["imagesTr/case_000_0000.nii.gz"] != fc["imagesTr/case_000_0000.nii.gz"]


def test_more_cases_keep_the_first_ones(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", n_cases=1, shape=SMALL)
    b = make_synthetic_dataset(tmp_path / "b", n_cases=3, shape=SMALL)
    assert (a / "labelsTr" / "case_000.nii.gz").read_bytes() == (b / "labelsTr" / "case_000.nii.gz").read_bytes()


def test_brats_layout_loads_with_four_channels_and_plain_labels(tmp_path):
    root = make_synthetic_dataset(tmp_path / "Dataset001_S", n_cases=3, shape=(24, 24, 24), n_test=2)
    ds = load_dataset(root)
    assert [c.case_id for c in ds.cases] == ["case_000", "case_001", "case_002"] and ds.stray_files == ()
    assert ds.spec.channel_names == ("FLAIR", "T1", "T1ce", "T2") and ds.spec.num_training == 3
    assert ds.spec.labels == {"background": 0, "edema": 1, "non_enhancing_core": 2, "enhancing": 3}
    assert len(ds.test_cases()) == 2 and (root / "labelsTs" / "test_001.nii.gz").is_file()
    for case in ds.cases:
        seg = read_label(case.label)
        assert seg.array.dtype == np.uint8 and set(np.unique(seg.array)) == {0, 1, 2, 3}
        for path in case.images:
            img = read_image(path)
            assert img.array.shape[1:] == seg.array.shape and img.geometry == seg.geometry
            assert img.array[0][0, 0, 0] == 0 and img.array.max() > 0  # zero background, bright brain


def test_regions_are_declared_like_brats_and_nested(tmp_path):
    root = make_synthetic_dataset(tmp_path / "ds", n_cases=3, shape=(24, 24, 24), regions=True, seed=2)
    spec = load_dataset(root).spec
    assert spec.has_regions and spec.regions_class_order == (1, 2, 3)
    assert spec.labels == {"background": 0, "whole_tumor": (1, 2, 3), "tumor_core": (2, 3), "enhancing_tumor": 3}
    for case in load_dataset(root).cases:
        seg = read_label(case.label).array
        whole, core, enhancing = seg > 0, seg >= 2, seg == 3
        assert enhancing.any() and core.sum() > enhancing.sum() and whole.sum() > core.sum()


def test_labels_need_several_channels(tmp_path):
    """Each tumour label has its own contrast, and no single channel orders all of them."""
    root = make_synthetic_dataset(tmp_path / "ds", n_cases=1, shape=(32, 32, 32))
    case = load_dataset(root).cases[0]
    seg = read_label(case.label).array
    brain = read_image(case.images[0]).array[0] > 0
    means = np.array([[read_image(p).array[0][(seg == k) & brain].mean() for k in range(4)] for p in case.images])
    flair, t1, t1ce, t2 = means / means[:, :1]  # relative to normal brain
    assert flair[1] > 1.4 and t2[1] > 1.4  # edema bright on FLAIR and T2
    assert t1ce[3] > 1.6 and t1ce[2] < 0.7  # enhancing bright, core dark on T1ce
    assert t1[2] < 0.7
    orders = {tuple(np.argsort(row[1:])) for row in means}
    assert len(orders) > 1


def test_cases_differ_in_size_intensity_and_position(tmp_path):
    root = make_synthetic_dataset(tmp_path / "ds", n_cases=4, shape=(30, 30, 30))
    cases = load_dataset(root).cases
    shapes = {read_header(c.label).shape for c in cases}
    assert len(shapes) > 1 and all(27 <= s <= 33 for shape in shapes for s in shape)
    brightness = {round(float(read_image(c.images[0]).array.max())) for c in cases}
    assert len(brightness) == 4
    fixed = make_synthetic_dataset(tmp_path / "fixed", n_cases=3, shape=(30, 30, 30), shape_jitter=0.0)
    assert {read_header(c.label).shape for c in load_dataset(fixed).cases} == {(30, 30, 30)}


def test_binary_kind_has_one_channel_and_lesions(tmp_path):
    root = make_synthetic_dataset(tmp_path / "ds", n_cases=3, shape=(24, 24, 24), kind="binary", seed=4)
    ds = load_dataset(root)
    assert ds.spec.n_channels == 1 and ds.spec.labels == {"background": 0, "lesion": 1}
    for case in ds.cases:
        seg = read_label(case.label).array
        img = read_image(case.images[0]).array[0]
        assert set(np.unique(seg)) == {0, 1}
        assert img[seg == 1].mean() > 1.3 * img[(seg == 0) & (img > 0)].mean()


def test_2d_variant_writes_uint8_png(tmp_path):
    root = make_synthetic_dataset(tmp_path / "ds", n_cases=2, shape=(40, 40), ndim=2, n_test=1)
    ds = load_dataset(root)
    assert ds.spec.file_ending == ".png" and (root / "imagesTr" / "case_000_0003.png").is_file()
    img = read_image(ds.cases[0].images[0], dtype=None)
    seg = read_label(ds.cases[0].label)
    assert img.array.dtype == np.uint8 and img.array.ndim == 3 and img.geometry.ndim == 2
    assert seg.array.dtype == np.uint8 and seg.array.shape == img.array.shape[1:] and seg.array.max() == 3
    assert [c.case_id for c in ds.test_cases()] == ["test_000"]


def test_anisotropic_spacing_is_written_to_the_headers(tmp_path):
    root = make_synthetic_dataset(tmp_path / "ds", n_cases=2, shape=(48, 40, 40), anisotropic=True,
                                  shape_jitter=0.0)
    for case in load_dataset(root).cases:
        header = read_header(case.images[0])
        assert np.allclose(header.geometry.array_spacing, (3.0, 0.8, 0.8))
        assert header.shape == (16, 40, 40)
        assert np.allclose(read_header(case.label).geometry.array_spacing, (3.0, 0.8, 0.8))


def test_custom_spacing_and_nrrd_ending(tmp_path):
    root = make_synthetic_dataset(tmp_path / "ds", n_cases=1, shape=SMALL, spacing=(2.0, 0.5, 0.5),
                                  file_ending=".nrrd", kind="binary")
    spec = json.loads((root / "dataset.json").read_text())
    assert spec["file_ending"] == ".nrrd"
    assert read_header(root / "imagesTr" / "case_000_0000.nrrd").geometry.array_spacing == (2.0, 0.5, 0.5)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"kind": "liver"}, "kind='liver'"),
    ({"ndim": 4}, "ndim=4"),
    ({"n_cases": 0}, "n_cases=0"),
    ({"shape": (4, 4, 4)}, "at least 8"),
    ({"kind": "binary", "regions": True}, "regions=True"),
])
def test_bad_arguments_are_explained(tmp_path, kwargs, words):
    with pytest.raises(AutosegError, match=words.replace("(", r"\(")):
        make_synthetic_dataset(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()


def test_default_dataset_is_fast(tmp_path):
    start = time.perf_counter()
    make_synthetic_dataset(tmp_path / "ds")  # 8 cases of ~48^3 x 4 channels
    assert time.perf_counter() - start < 5.0
