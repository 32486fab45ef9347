"""The recipe record, its command-line syntax and the part tables: what a user types and what gets refused."""

from __future__ import annotations

import pytest

from autoseg.errors import PlanningError, PluginError
from autoseg.planner.recipe import PartChoice, Recipe, default_recipe, parse_recipe
from autoseg.training.parts import part_tables, resolve_recipe


def test_one_syntax_for_every_part_and_the_mirror_axes():
    over = parse_recipe(["network=attention_unet", "loss=dice_focal:gamma=2", "optimizer=adamw:lr=3e-4",
                         "schedule=cosine:warmup=5", "augmentation=light", "mirror_axes=2"])
    recipe = resolve_recipe(default_recipe(regions=True).with_overrides(over))
    assert recipe.network.name == "attention_unet" and recipe.loss.params["gamma"] == 2.0
    assert recipe.optimizer.params["lr"] == pytest.approx(3e-4) and recipe.schedule.params["warmup"] == 5
    assert recipe.augmentation.name == "light" and recipe.mirror_axes == (2,)
    # every parameter is filled in with its default and typed
    assert set(recipe.loss.params) == {"gamma"} and isinstance(recipe.schedule.params["warmup"], int)
    assert Recipe.from_json(recipe.to_json()) == recipe
    # what describe() prints is the command line that gives the same recipe back
    assert resolve_recipe(default_recipe(regions=True).with_overrides(parse_recipe(recipe.describe().split()))) == recipe


def test_the_default_is_todays_training():
    assert default_recipe(regions=False).describe() == \
        "network=unet loss=dice_ce optimizer=sgd schedule=poly augmentation=nnunet"
    assert default_recipe(block="residual", regions=True).network.name == "resenc_unet"
    assert default_recipe(regions=True).loss.name == "dice_bce"


def test_a_recorded_nnunet_of_recipe_version_1_keeps_the_cpu_workers():
    old = {"version": 1, "network": "unet", "loss": "dice_ce", "augmentation": {"name": "nnunet", "params": {}}}
    assert Recipe.from_json(old).augmentation.name == "nnunet_cpu"  # what ``nnunet`` meant then
    assert Recipe.from_json({**old, "version": 2}).augmentation.name == "nnunet"
    assert Recipe.from_json(Recipe.from_json(old).to_json()) == Recipe.from_json(old)


def test_a_parameter_alone_updates_the_current_part():
    base = resolve_recipe(default_recipe().with_overrides(parse_recipe("loss=dice_topk:k=20")))
    again = resolve_recipe(base.with_overrides(parse_recipe("loss=:k=5")))
    assert again.loss.name == "dice_topk" and again.loss.params["k"] == 5.0


@pytest.mark.parametrize("items, words", [
    (["netwrok=unet"], ["did you mean 'network'"]),
    (["network"], ["KIND=NAME"]),
    (["loss=dice_focal:gamma"], ["KEY=VALUE"]),
    (["mirror_axes=0,0"], ["distinct"]),
    (["mirror_axes=x"], ["axis numbers"]),
])
def test_malformed_recipes_get_one_line_with_the_fix(items, words):
    with pytest.raises(PlanningError) as err:
        parse_recipe(items)
    assert all(w in str(err.value) for w in words)


@pytest.mark.parametrize("items, words", [
    (["network=atention_unet"], ["no network 'atention_unet'", "did you mean 'attention_unet'", "unet"]),
    (["loss=dice_focall"], ["did you mean 'dice_focal'", "tversky"]),
    (["loss=dice_focal:gama=2"], ["no parameter 'gama'", "gamma"]),
    (["loss=dice_focal:gamma=-1"], ["gamma"]),
    (["optimizer=adam"], ["did you mean 'adamw'"]),
    (["schedule=cosine:warmup=x"], ["warmup"]),
])
def test_unknown_parts_and_parameters_are_refused_with_the_valid_ones(items, words):
    with pytest.raises((PluginError, PlanningError, ValueError)) as err:
        recipe = resolve_recipe(default_recipe().with_overrides(parse_recipe(items)))
        from autoseg.training.parts import build_part

        build_part("loss", recipe.loss)(regions=False, batch_dice=True, ignore_label=None)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_a_part_from_a_missing_package_names_that_package():
    recipe = default_recipe().with_overrides({"network": PartChoice("tiny_net", {}, "entry point tinyseg.parts:TINY")})
    with pytest.raises(PluginError) as err:
        resolve_recipe(recipe)
    assert "tinyseg.parts:TINY" in str(err.value) and "install" in str(err.value)


def test_every_kind_has_a_table_with_the_built_ins():
    tables = part_tables()
    assert set(tables["network"]) >= {"unet", "resenc_unet", "attention_unet", "swin_unetr"}
    assert set(tables["loss"]) >= {"dice_ce", "dice_bce", "dice_topk", "dice_focal", "tversky"}
    assert set(tables["optimizer"]) >= {"sgd", "adamw"} and set(tables["schedule"]) >= {"poly", "cosine", "constant"}
    assert set(tables["augmentation"]) >= {"nnunet", "light", "none"}
    for table in tables.values():
        for info in table.values():
            assert info.summary, f"{info.name} has no one-line summary"
