"""Recipes through the pipeline: planning sizes patches with the recipe's network, training builds every part from
the recipe and records it, and prediction rebuilds the network from the checkpoint's recipe alone."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from autoseg.api import predict, train
from autoseg.errors import PluginError
from autoseg.fingerprint.model import DatasetFingerprint
from autoseg.inference.predictor import Predictor
from autoseg.io.model_folder import FINAL
from autoseg.networks.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from autoseg.planner.planner import plan_experiment
from autoseg.planner.recipe import default_recipe, parse_recipe
from autoseg.training.parts import resolve_recipe

#: fold 0 of the tiny region dataset (tests/conftest.make_planned), 2 epochs x 3 iterations, deterministic, trained by
#: the code before recipes existed: the default recipe with the CPU workers' augmentation (``nnunet_cpu``, then the
#: default) must reproduce these losses
BEFORE_RECIPES = {
    "3d_fullres": [[0.5429359475771586, 0.5009922534227371], [0.4901437958081563, 0.4815715551376343]],
    "2d": [[0.5470020174980164, 0.5953242927789688], [0.5805715918540955, 0.5741676092147827]],
}


def _losses(folder):
    return [[r["train_loss"], r["val_loss"]] for r in map(json.loads, (folder / "log.jsonl").read_text().splitlines())]


def _short(**kw):
    return {"epochs": 2, "iters_per_epoch": 3, "val_iters": 2, "device": "cpu", "workers": 0, "deterministic": True,
            "validate": False, "progress": False, **kw}


def test_the_default_recipe_with_cpu_augmentation_trains_exactly_as_before_recipes(planned_factory, tmp_path):
    ds, wd, plans = planned_factory(tmp_path)
    for config, expected in BEFORE_RECIPES.items():
        (res,) = train(ds, config, 0, workdir=wd, **_short(recipe=("augmentation=nnunet_cpu",)))
        got = [v for row in _losses(res.folder) for v in row]
        assert got == pytest.approx([v for row in expected for v in row], rel=1e-5), config
        meta = CheckpointMeta.from_json(load_checkpoint(res.folder / FINAL))
        assert meta.recipe["network"]["name"] == "unet" and meta.recipe["loss"]["name"] == "dice_bce"
        assert meta.recipe["augmentation"]["name"] == "nnunet_cpu"


def test_a_recipe_chosen_for_training_is_built_recorded_and_predicted_from(planned_factory, tmp_path):
    ds, wd, plans = planned_factory(tmp_path, n_test=1)
    recipe = ("network=attention_unet", "loss=dice_focal:gamma=2", "optimizer=adamw:lr=1e-3",
              "schedule=cosine:warmup=1", "augmentation=light", "mirror_axes=2")
    (res,) = train(ds, "3d_fullres", 0, workdir=wd, recipe=recipe, **_short())
    ckpt = load_checkpoint(res.folder / FINAL)
    meta = CheckpointMeta.from_json(ckpt)
    assert meta.recipe["network"]["name"] == "attention_unet" and meta.recipe["optimizer"]["name"] == "adamw"
    assert meta.mirror_axes == (2,)  # training mirrored left/right only; test-time mirroring follows
    assert any("attention" in k or "gate" in k for k in ckpt["network"])
    predictor = Predictor.from_workdir(wd, "3d_fullres", folds=[0], device="cpu", amp=False)
    assert predictor.mirror_axes == (2,)
    out = predict(ds.root / "imagesTs", tmp_path / "pred", workdir=wd, configuration="3d_fullres", folds=[0],
                  device="cpu", progress=False)
    assert len(out.written) == 1


def test_a_network_that_is_not_installed_is_refused_in_one_line(planned_factory, tmp_path):
    ds, wd, plans = planned_factory(tmp_path)
    (res,) = train(ds, "2d", 0, workdir=wd, **_short(epochs=1))
    state = load_checkpoint(res.folder / FINAL)
    state["recipe"]["network"] = {"name": "tiny_net", "params": {}, "origin": "entry point tinyseg.parts:TINY_NET"}
    save_checkpoint(res.folder / FINAL, state)
    with pytest.raises(PluginError) as err:
        Predictor.from_workdir(wd, "2d", device="cpu")
    message = str(err.value)
    assert "tiny_net" in message and "tinyseg.parts:TINY_NET" in message and "\n" not in message


def _fingerprint(tiny_brats):
    ds, wd, plans = tiny_brats
    return DatasetFingerprint.load(wd / "fingerprint.json")


def test_planning_sizes_patches_with_the_recipes_network(tiny_brats):
    fp = _fingerprint(tiny_brats)
    plain = plan_experiment(fp, preset="default")
    same = plan_experiment(fp, preset="default", recipe=resolve_recipe(default_recipe(regions=True)))
    strip = [dataclasses.replace(c, recipe=None) for c in plain.configurations.values()]
    assert strip == [dataclasses.replace(c, recipe=None) for c in same.configurations.values()]
    assert plain.decisions == same.decisions and not any(d.startswith("recipe") for d in plain.decisions)
    gated = plan_experiment(fp, preset="default", recipe=resolve_recipe(
        default_recipe(regions=True).with_overrides(parse_recipe("network=attention_unet"))))
    a, b = plain.configuration("3d_fullres"), gated.configuration("3d_fullres")
    # the gates cost activations: the same patch has a larger estimate (the planner sees it)
    assert b.estimated_feature_map_elements > a.estimated_feature_map_elements or b.patch_size != a.patch_size
    assert any("recipe network=attention_unet" in d for d in gated.decisions)


def test_a_transformer_gets_a_patch_it_can_take_and_the_plan_says_why(tiny_brats):
    pytest.importorskip("monai")
    fp = _fingerprint(tiny_brats)
    swin = plan_experiment(fp, preset="cpu", recipe=resolve_recipe(
        default_recipe(regions=True).with_overrides(parse_recipe("network=swin_unetr"))))
    for config in swin.configurations.values():
        assert all(p % 32 == 0 for p in config.patch_size), config.patch_size
    assert any("swin_unetr takes patch" in d for c in swin.configurations.values() for d in c.decisions)


def test_recipe_parts_reach_the_network_builder(tiny_brats):
    ds, wd, plans = tiny_brats
    from autoseg.networks.parts import get_network_part

    topo = plans.configuration("3d_fullres").topology
    net = get_network_part("resenc_unet").build(topo, in_channels=2, num_classes=3)
    assert any("skip" in name for name, _ in net.named_parameters()) or net.topology.block == "residual"
    assert isinstance(net(torch.zeros(1, 2, 16, 16, 16)), list)
