"""Plugins through the pipeline: plan -> preprocess (fit) -> train (C+1 inputs) -> predict (+ zones) -> bundle."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from autoseg.api import plan, predict, preprocess, train
from autoseg.ensemble.bundle import export_bundle
from autoseg.errors import BundleError
from autoseg.inference.predictor import Predictor
from autoseg.io.image import read_label
from autoseg.networks.checkpoint import FINAL, load_checkpoint
from autoseg.planner.plans import Plans
from autoseg.plugins import PluginError, peritumoral_zones, with_plugins
from autoseg.plugins.channels import (
    FIT,
    PLUGINS_DIR,
    STATE,
    channel_folder,
    load_state,
    prepare_channels,
    training_channels,
)
from autoseg.plugins.kle import KLEResidual
from autoseg.preprocessing.preprocess import read_case

CHOICES = ["kle_residual:grid=8:n_components=4", "peritumoral_zones:widths_mm=3,3"]
FAST = {"epochs": 1, "iters_per_epoch": 2, "val_iters": 1, "workers": 0, "device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def trained_kle(tmp_path_factory, planned_factory):
    """``(dataset, workdir, plans)``: the tiny BraTS-like set planned with both plugins, fold 0 trained."""
    ds, wd, plans = planned_factory(tmp_path_factory.mktemp("plugins"), n_test=1)
    plans = with_plugins(plans, CHOICES)
    plans.save(wd / "plans.json")
    train(ds.root, "3d_fullres", 0, workdir=wd, **FAST)
    return ds, wd, plans


def test_plan_records_plugins_and_refuses_bad_ones_before_any_work(tmp_path, trained_kle):
    ds, _, _ = trained_kle
    plans = plan(ds.root, workdir=tmp_path / "w", preset="cpu", progress=False, plugins=CHOICES)
    saved = Plans.load(tmp_path / "w" / "plans.json")
    assert [p["name"] for p in saved.plugins] == ["kle_residual", "peritumoral_zones"] == \
        [p["name"] for p in plans.plugins]
    assert saved.plugins[1]["params"] == {"widths_mm": [3.0, 3.0], "labels": None, "within_body": False}
    with pytest.raises(PluginError, match="no plugin 'kle'"):
        plan(ds.root, workdir=tmp_path / "bad", preset="cpu", progress=False, plugins=["kle"])
    assert not (tmp_path / "bad").exists()


def test_training_fits_the_basis_and_the_network_takes_one_more_channel(trained_kle):
    ds, wd, plans = trained_kle
    config = plans.configuration("3d_fullres")
    folder = channel_folder(wd, config, "kle_residual")
    assert {p.name for p in folder.iterdir()} == {STATE, FIT, *(f"{c.case_id}.npy" for c in ds.cases)}
    data = np.load(wd / "preprocessed" / "3d_fullres" / f"{ds.cases[0].case_id}.npy")
    extra = np.load(folder / f"{ds.cases[0].case_id}.npy")
    assert extra.shape == (1, *data.shape[1:]) and extra.dtype == np.float32 and extra.max() > 0
    ckpt = load_checkpoint(wd / "models" / "3d_fullres" / "fold_0" / FINAL)
    assert ckpt["in_channels"] == len(plans.channel_names) + 1
    state, meta = load_state(wd / "models" / "3d_fullres" / PLUGINS_DIR / "kle_residual.npz")
    assert meta["params"] == {"grid": 8, "n_components": 4} and state["components"].shape[0] == 4
    assert (wd / "models" / "3d_fullres" / "fold_0" / "val" / "summary.json").is_file()


def test_predictor_appends_the_channel_computed_after_blanking(trained_kle):
    ds, wd, _ = trained_kle
    predictor = Predictor.from_workdir(wd, "3d_fullres", device="cpu")
    images, _, geometry = read_case(ds.cases[0])
    pre = predictor.preprocess(images, geometry, missing=(1,))
    assert pre.data.shape[0] == 3 and not pre.data[1].any()
    state, _ = load_state(wd / "models" / "3d_fullres" / PLUGINS_DIR / "kle_residual.npz")
    np.testing.assert_allclose(pre.data[2:], KLEResidual(grid=8).compute(state, pre.data[:2], 3), atol=1e-6)
    assert predictor.predict(images, geometry).shape == images.shape[1:]


def test_predict_writes_zones_next_to_each_segmentation(trained_kle, tmp_path):
    ds, wd, _ = trained_kle
    out = tmp_path / "pred"
    summary = predict(ds.root / "imagesTs", out, workdir=wd, device="cpu", progress=False, drift=False)
    (cid,) = summary.written
    seg = read_label(out / f"{cid}.nii.gz")
    zones = read_label(out / "zones" / f"{cid}.nii.gz")
    assert zones.geometry == seg.geometry
    expected = peritumoral_zones(seg.array, seg.geometry.array_spacing, widths_mm=(3, 3))
    assert np.array_equal(zones.array, expected)


def test_bundle_carries_and_hashes_the_state(trained_kle, tmp_path):
    ds, wd, _ = trained_kle
    bundle = export_bundle(wd, tmp_path / "bundle", dataset=ds.root, hash_dataset=False, progress=False)
    rel = f"models/3d_fullres/{PLUGINS_DIR}/kle_residual.npz"
    assert rel in json.loads((bundle / "manifest.json").read_text())["files"]
    a = predict(ds.root / "imagesTs", tmp_path / "a", workdir=bundle, device="cpu", progress=False, drift=False)
    b = predict(ds.root / "imagesTs", tmp_path / "b", workdir=wd, device="cpu", progress=False, drift=False)
    for cid in a.written:
        assert np.array_equal(read_label(a.outputs[cid]).array, read_label(b.outputs[cid]).array)
        assert (tmp_path / "a" / "zones" / f"{cid}.nii.gz").is_file()
    with open(bundle / rel, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="kle_residual.npz: modified after export"):
        predict(ds.root / "imagesTs", tmp_path / "c", workdir=bundle, device="cpu", progress=False)


def test_a_model_folder_without_its_state_is_refused(trained_kle, tmp_path):
    _, wd, _ = trained_kle
    copy = tmp_path / "work"
    shutil.copytree(wd / "models" / "3d_fullres", copy / "models" / "3d_fullres")
    (copy / "models" / "3d_fullres" / PLUGINS_DIR / "kle_residual.npz").unlink()
    with pytest.raises(PluginError, match="kle_residual.npz: missing.*train the configuration again"):
        Predictor.from_workdir(copy, "3d_fullres", device="cpu")


def test_preprocessing_reuses_a_current_fit_and_refits_when_the_choice_changes(trained_kle):
    ds, wd, plans = trained_kle
    folder = channel_folder(wd, plans.configuration("3d_fullres"), "kle_residual")
    before = (folder / STATE).stat().st_mtime_ns
    preprocess(ds, ["3d_fullres"], workdir=wd, progress=False)
    assert (folder / STATE).stat().st_mtime_ns == before
    try:
        prepare_channels(ds, with_plugins(plans, ["kle_residual:grid=6:n_components=2"]), "3d_fullres", wd,
                         progress=False)
        assert load_state(folder / STATE)[1]["params"] == {"grid": 6, "n_components": 2}
        with pytest.raises(PluginError, match="missing or older than the preprocessed data"):
            training_channels(ds, plans, "3d_fullres", wd, install=False)
    finally:
        prepare_channels(ds, plans, "3d_fullres", wd, progress=False)
