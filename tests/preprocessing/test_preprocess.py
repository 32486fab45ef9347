"""Preprocessing: crop/restore, label-safe resampling, idempotent storage, and export back to the input."""

from __future__ import annotations

import os

import numpy as np
import pytest

from autoseg.api import plan
from autoseg.data.synthetic import make_synthetic_dataset
from autoseg.inference.export import LabelLayout, export_segmentation
from autoseg.io.dataset import load_dataset
from autoseg.io.image import Geometry, read_label, write_image, write_label
from autoseg.preprocessing.cropping import OUTSIDE, crop_to_nonzero, uncrop
from autoseg.preprocessing.preprocess import (
    case_paths,
    foreground_locations,
    preprocess_arrays,
    preprocess_dataset,
    read_case,
)
from autoseg.preprocessing.resample import resample_data, resample_seg


def _blobs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    seg = np.zeros(shape, np.int16)
    grid = np.indices(shape)
    for lab in (1, 2, 3):
        c = [rng.integers(s // 4, 3 * s // 4) for s in shape]
        r = min(shape) / 5
        seg[sum((g - ci) ** 2 for g, ci in zip(grid, c)) < r * r] = lab
    return seg


def test_crop_then_uncrop_restores_the_image_exactly():
    img = np.zeros((2, 20, 24, 22), np.float32)
    img[:, 3:15, 5:20, 2:9] = np.random.default_rng(0).normal(size=(2, 12, 15, 7)) + 5
    seg = np.zeros(img.shape[1:], np.int16)
    seg[6:9, 8:12, 4:6] = 2
    cropped, seg_c, bbox = crop_to_nonzero(img, seg)
    assert bbox == ((3, 15), (5, 20), (2, 9))
    assert np.array_equal(uncrop(cropped, bbox, img.shape[1:]), img)
    assert np.array_equal(uncrop(seg_c.clip(0), bbox, seg.shape), seg)


def test_crop_marks_background_outside_the_body_as_outside():
    img = np.zeros((1, 10, 10), np.float32)
    img[0, 2:8, 2:8] = 1
    img[0, 2, 2] = 0  # a corner inside the box but outside the mask
    _, seg_c, _ = crop_to_nonzero(img, np.zeros((10, 10), np.int16))
    assert seg_c[0, 0] == OUTSIDE and (seg_c == OUTSIDE).sum() == 1
    _, seg_inf, _ = crop_to_nonzero(img)  # inference: the same mask without a label
    assert np.array_equal(seg_inf, seg_c)


@pytest.mark.parametrize("separate", [None, 0])
def test_resampling_labels_there_and_back_keeps_them(separate):
    seg = _blobs((24, 28, 26))
    up = resample_seg(seg, (48, 56, 52), order=1, separate_axis=separate)
    assert set(np.unique(up)) == set(np.unique(seg))  # no in-between label values
    back = resample_seg(up, seg.shape, order=1, separate_axis=separate)
    assert np.mean(back == seg) > 0.995


def test_resample_data_is_float32_and_shape_exact():
    data = np.random.default_rng(0).normal(size=(2, 7, 9, 11)).astype(np.float32)
    out = resample_data(data, (13, 17, 5), order=3, separate_axis=0, order_z=0)
    assert out.shape == (2, 13, 17, 5) and out.dtype == np.float32


def test_foreground_locations_reach_every_small_component():
    seg = np.zeros((40, 40, 40), np.int16)
    seg[2:30, 2:30, 2:30] = 1  # a large lesion ...
    seg[35:37, 35:37, 35:37] = 1  # ... and an 8-voxel one
    locs = foreground_locations(seg, [1, 2], seed=0)
    assert set(np.unique(locs[:, 1])) == {0, 1}
    small = locs[locs[:, 1] == 1]
    assert len(small) == 8 and np.all(seg[tuple(small[:, 2:].T)] == 1)
    assert len(locs) <= 10_000 + 8 and 2 not in locs[:, 0]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    ds_dir = make_synthetic_dataset(root / "Dataset009_Aniso", n_cases=4, shape=(12, 40, 36), spacing=(3.5, 0.8, 0.8),
                                    n_channels=2, kind="brats", anisotropic=True, seed=3)
    wd = root / "work"
    plans = plan(ds_dir, workdir=wd, preset="cpu", progress=False)
    return load_dataset(ds_dir), plans, wd


def test_preprocessing_is_idempotent_and_redoes_changed_or_incomplete_cases(planned):
    ds, plans, wd = planned
    first = preprocess_dataset(ds, plans, "3d_fullres", wd, progress=False)
    assert len(first.processed) == 4 and not first.reused
    again = preprocess_dataset(ds, plans, "3d_fullres", wd, progress=False)
    assert not again.processed and len(again.reused) == 4
    a, b = ds.cases[0], ds.cases[1]
    os.utime(a.images[0], ns=(1, 1))  # the source changed
    paths = case_paths(first.folder, b.case_id)
    paths["data"].write_bytes(paths["data"].read_bytes()[:100])  # a half-written array
    third = preprocess_dataset(ds, plans, "3d_fullres", wd, progress=False)
    assert set(third.processed) == {a.case_id, b.case_id}
    data = np.load(paths["data"], mmap_mode="r")
    assert data.dtype == np.float32 and data.shape[0] == 2


def test_preprocessed_case_is_normalised_and_resampled_to_the_plan(planned):
    ds, plans, wd = planned
    cfg = plans.configuration("3d_fullres")
    images, seg, geom = read_case(ds.cases[0])
    out = preprocess_arrays(images, seg, geom, plans, cfg, case_id=ds.cases[0].case_id)
    assert out.properties.target_spacing_t == pytest.approx(cfg.spacing)
    inside = out.seg >= 0
    assert abs(float(out.data[0][inside].mean())) < 0.1 and 0.8 < float(out.data[0][inside].std()) < 1.2
    assert out.properties.separate_axis is not None  # 3.5 mm slices vs 0.8 mm in-plane


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha"])
def test_export_of_a_perfect_prediction_restores_the_label_and_geometry(tmp_path, planned, ending):
    """One-hot logits of the preprocessed label, exported, give back the original file: shape, geometry, labels."""
    _, plans, _ = planned
    cfg = plans.configuration("3d_fullres")
    seg = _blobs((12, 40, 36), seed=5)
    img = np.where(seg > 0, 3.0, 1.0).astype(np.float32)[None]
    img[:, :, :3] = 0  # something to crop
    seg[:, :, :3] = 0
    geom = Geometry(spacing=(0.8, 0.8, 3.5), origin=(-12.5, 30.25, 7.0),
                    direction=tuple(np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]], float).ravel()))
    write_image(tmp_path / f"c_0000{ending}", img, geom)
    write_label(tmp_path / f"c{ending}", seg, geom)
    two_channel = np.concatenate([img, img])
    out = preprocess_arrays(two_channel, seg, geom, plans, cfg)
    layout = LabelLayout(num_outputs=4)
    logits = np.stack([(out.seg.clip(0) == k).astype(np.float32) * 10 for k in range(4)])
    pred, _ = export_segmentation(logits, out.properties, plans, cfg, layout)
    assert pred.shape == seg.shape
    assert np.mean(pred == seg) > 0.99
    write_label(tmp_path / f"p{ending}", pred, out.properties.geometry)
    back = read_label(tmp_path / f"p{ending}")
    ref = read_label(tmp_path / f"c{ending}")
    assert back.geometry.differences(ref.geometry) == []


def test_an_absent_channel_is_zero_and_changes_nothing_else(planned):
    """A zero-filled channel passed as missing gives the full case's other channels, crop and mask; its own
    content is ignored whatever it is, and it comes out as exact zeros (its mean after normalisation)."""
    ds, plans, _ = planned
    cfg = plans.configuration("3d_fullres")
    images, seg, geom = read_case(ds.cases[0])
    full = preprocess_arrays(images, seg, geom, plans, cfg)
    zero_filled = images.copy()
    zero_filled[1] = 0
    out = preprocess_arrays(zero_filled, seg, geom, plans, cfg, missing=(1,))
    assert out.data.shape == full.data.shape and out.data.dtype == np.float32
    assert not out.data[1].any()
    assert np.array_equal(out.data[0], full.data[0]) and np.array_equal(out.seg, full.seg)
    assert out.properties.bbox_t == full.properties.bbox_t
    assert out.properties.shape_after_resampling_t == full.properties.shape_after_resampling_t
    garbage = images.copy()
    garbage[1] = np.random.default_rng(0).uniform(500, 1000, size=garbage[1].shape)  # nonzero everywhere
    again = preprocess_arrays(garbage, seg, geom, plans, cfg, missing=[1])
    assert np.array_equal(again.data, out.data) and again.properties.bbox_t == out.properties.bbox_t


def test_an_absent_channel_does_not_widen_the_crop(planned):
    ds, plans, _ = planned
    cfg = plans.configuration("3d_fullres")
    images, seg, geom = read_case(ds.cases[0])
    images = np.pad(images, [(0, 0), (0, 0), (0, 0), (0, 6)])  # empty margin: cropped away
    padded_seg = np.pad(seg, [(0, 0), (0, 0), (0, 6)])
    images[1, :, :, -1] = 7.0  # the absent channel has content in the margin
    out = preprocess_arrays(images, padded_seg, geom, plans, cfg, missing=(1,))
    ref = preprocess_arrays(images[:, :, :, :-6], seg, geom, plans, cfg)
    assert out.properties.bbox_t == ref.properties.bbox_t
    assert np.array_equal(out.data[0], ref.data[0]) and not out.data[1].any()


def test_every_channel_missing_is_an_all_zero_input(planned):
    ds, plans, _ = planned
    images, seg, geom = read_case(ds.cases[0])
    out = preprocess_arrays(images, seg, geom, plans, plans.configuration("3d_fullres"), missing=(0, 1))
    assert not out.data.any()  # what attribution scores as "no channel": the model sees nothing


@pytest.mark.parametrize("missing, match", [((2,), "indices 0..1"), ((-1,), "indices 0..1"), (("1",), "not a channel")])
def test_bad_missing_channels_are_clear_errors(planned, missing, match):
    from autoseg.errors import AutosegError

    ds, plans, _ = planned
    images, seg, geom = read_case(ds.cases[0])
    with pytest.raises(AutosegError, match=match):
        preprocess_arrays(images, seg, geom, plans, plans.configuration("3d_fullres"), missing=missing)
