"""Plan overrides (``autoseg plan --set CONFIG.KEY=VALUE``): applied, re-derived with the planner's rules, validated
in one line each, recorded in plans.json and explained."""

from __future__ import annotations

import dataclasses
import json

import pytest
from planner_fixtures import brats_like, ct_like, make_fingerprint, rgb_2d

from autoseg.errors import PlanningError
from autoseg.fingerprint.model import load_fingerprint
from autoseg.planner.overrides import apply_overrides, override_warnings, parse_overrides
from autoseg.planner.planner import plan_experiment
from autoseg.planner.plans import Plans
from autoseg.planner.topology import pooling_layout


@pytest.fixture(scope="module")
def brats():
    fp = brats_like()
    return fp, plan_experiment(fp)


@pytest.fixture(scope="module")
def ct():
    fp = ct_like()
    return fp, plan_experiment(fp)


def _divisible(config):
    divisor = [2 ** sum(s[axis] == 2 for s in config.topology.strides) for axis in range(config.ndim)]
    layout = pooling_layout(config.spacing, config.patch_size)
    return (all(p % d == 0 for p, d in zip(config.patch_size, divisor, strict=True))
            and layout.patch_size == config.patch_size and layout.strides == config.topology.strides
            and layout.kernel_sizes == config.topology.kernel_sizes)


def _roundtrip(plans):
    return Plans.from_json(json.loads(json.dumps(plans.to_json())))


def test_patch_and_batch_overrides_are_applied_recorded_and_explained(brats):
    fp, plans = brats
    out = apply_overrides(plans, fp, ["3d_fullres.patch_size=96,160,160", "3d_fullres.batch_size=4"])
    full = out.configuration("3d_fullres")
    assert full.patch_size == (96, 160, 160) and full.batch_size == 4
    assert _divisible(full) and full.topology.strides[-1] == (1, 2, 2)  # 96 pools 4 times, 160 five times
    assert full.estimated_feature_map_elements > plans.configuration("3d_fullres").estimated_feature_map_elements
    assert full.overrides == {"patch_size": [96, 160, 160], "batch_size": 4}
    saved = out.to_json()["configurations"]["3d_fullres"]
    assert saved["overrides"] == {"patch_size": [96, 160, 160], "batch_size": 4} and saved["batch_size"] == 4
    assert _roundtrip(out) == out
    text = "\n".join(out.explain())
    assert "override: set by hand after planning: patch_size=96,160,160, batch_size=4" in text
    assert "override: patch 96x160x160 instead of 128x128x128: 6 stages" in text
    assert "override: batch size 4 instead of 2" in text
    assert out.configuration("2d") == plans.configuration("2d")  # only the named configuration changes


def test_memory_overshoot_is_a_warning_line(brats):
    fp, plans = brats
    out = apply_overrides(plans, fp, ["3d_fullres.patch_size=96,160,160", "3d_fullres.batch_size=4"])
    full = out.configuration("3d_fullres")
    ratio = full.estimated_feature_map_elements * 4 / 2 / full.memory_budget
    line = f"patch 96x160x160 at batch 4 is {ratio:.1f}x the memory budget of 8 GB"
    assert ratio > 1.5 and any(line in d and d.startswith("override: warning: ") for d in full.decisions)
    assert override_warnings(out) == [f"3d_fullres: {d[len('override: warning: '):]}" for d in full.decisions
                                      if d.startswith("override: warning: ")]
    fits = apply_overrides(plans, fp, ["3d_fullres.batch_size=2"])
    assert override_warnings(fits) == [] and "% of the memory budget of 8 GB" in fits.configuration(
        "3d_fullres").decisions[-1]


def test_a_patch_alone_rederives_the_batch_by_the_planners_rule(brats):
    fp, plans = brats
    out = apply_overrides(plans, fp, ["3d_fullres.patch_size=64,64,64"])
    full = out.configuration("3d_fullres")
    assert _divisible(full) and full.topology.n_stages == 5
    expected = max(min(round(full.memory_budget / full.estimated_feature_map_elements * 2),
                       round(138 * 169 * 138 * 484 * 0.05 / 64 ** 3)), 2)
    assert full.batch_size == expected > 2
    assert any("by the planner's rule (memory allows" in d for d in full.decisions)


def test_spacing_override_rederives_median_patch_and_topology_as_planning_does(brats):
    fp, plans = brats
    out = apply_overrides(plans, fp, ["3d_fullres.spacing=2,2,2"])
    full = out.configuration("3d_fullres")
    assert full.spacing == (2.0, 2.0, 2.0) and full.median_shape == (69.0, 84.0, 69.0)  # 84.5 rounds half to even
    # the same rules on a dataset acquired at that spacing give the same patch, network and batch
    native = plan_experiment(make_fingerprint([(2.0, 2.0, 2.0)] * 484, [(69, 84, 69)] * 484, n_labels=4,
                                              channels=("T1", "T1ce", "T2", "FLAIR"))).configuration("3d_fullres")
    assert (full.patch_size, full.topology, full.batch_size, full.estimated_feature_map_elements) == (
        native.patch_size, native.topology, native.batch_size, native.estimated_feature_map_elements)
    assert _divisible(full) and full.overrides == {"spacing": [2.0, 2.0, 2.0]}
    assert "3d_lowres" not in out.configurations
    assert any("spacing 2x2x2 instead of 1x1x1" in d for d in full.decisions)


def test_spacing_and_patch_together_use_the_pooling_of_the_new_spacing(brats):
    fp, plans = brats
    out = apply_overrides(plans, fp, {"3d_fullres": {"spacing": (3, 1, 1), "patch_size": (48, 160, 160)}})
    full = out.configuration("3d_fullres")
    assert full.patch_size == (48, 160, 160) and _divisible(full)
    assert full.topology.kernel_sizes[0] == (1, 3, 3) and full.topology.strides[1] == (1, 2, 2)


def test_anisotropic_spacing_gets_the_separate_z_rule(ct):
    fp, plans = ct
    out = apply_overrides(plans, fp, ["3d_fullres.spacing=5,0.78,0.78"])
    full = out.configuration("3d_fullres")
    assert full.resampling == plans.configuration("3d_fullres").resampling  # the planned rule decides per case
    assert full.resampling.separate_z_threshold == 3
    assert any("is anisotropic (max/min 6.41 > 3)" in d and "along axis 0 separately" in d for d in full.decisions)
    assert full.topology.kernel_sizes[0] == (1, 3, 3) and _divisible(full)


def test_fullres_spacing_override_replans_the_cascade_in_step(ct):
    fp, plans = ct
    out = apply_overrides(plans, fp, ["3d_fullres.spacing=1,1,1"])
    full, low, casc = (out.configuration(n) for n in ("3d_fullres", "3d_lowres", "3d_cascade_fullres"))
    assert full.spacing == casc.spacing == (1.0, 1.0, 1.0) and casc.data_identifier == "3d_fullres"
    assert casc.patch_size == full.patch_size and casc.median_shape == full.median_shape
    assert all(lo > fu for lo, fu in zip(low.spacing, full.spacing, strict=True))
    assert low.next_stage == "3d_cascade_fullres" and casc.previous_stage == "3d_lowres"
    assert all(_divisible(c) for c in (full, low, casc))
    assert list(out.configurations) == ["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"]
    assert out.configuration("2d") == plans.configuration("2d")
    assert any(d.startswith("override 3d_fullres.spacing=1,1,1: the 3D configurations were planned again")
               for d in out.decisions)
    assert low.decisions[0] == "override: planned again with 3d_fullres at 3d_fullres.spacing=1,1,1"
    assert all(c.recipe == plans.configuration("3d_fullres").recipe for c in (full, low, casc))


def test_overriding_the_planned_spacing_reproduces_the_plan(ct):
    fp, plans = ct
    spacing = ",".join(str(v) for v in plans.configuration("3d_fullres").spacing)
    out = apply_overrides(plans, fp, [f"3d_fullres.spacing={spacing}"])

    def core(c):
        return dataclasses.replace(c, decisions=(), overrides={})

    assert {n: core(c) for n, c in out.configurations.items()} == {n: core(c) for n, c in plans.configurations.items()}


def test_cascade_stages_can_take_their_own_patch_and_batch(ct):
    fp, plans = ct
    out = apply_overrides(plans, fp, ["3d_lowres.batch_size=3", "3d_cascade_fullres.patch_size=64,160,160"])
    assert out.configuration("3d_lowres").batch_size == 3
    assert out.configuration("3d_cascade_fullres").patch_size == (64, 160, 160)
    assert out.configuration("3d_fullres") == plans.configuration("3d_fullres")


def test_training_length_overrides(brats):
    fp, plans = brats
    out = apply_overrides(plans, fp, ["2d.num_epochs=300", "2d.iterations_per_epoch=100", "2d.batch_size=24"])
    two = out.configuration("2d")
    assert (two.num_epochs, two.iterations_per_epoch, two.batch_size) == (300, 100, 24)
    assert two.overrides == {"num_epochs": 300, "iterations_per_epoch": 100, "batch_size": 24}
    assert "override: num_epochs 300 instead of 1000" in two.decisions


def test_the_mapping_forms_equal_the_text_form(brats):
    fp, plans = brats
    texts = apply_overrides(plans, fp, ["3d_fullres.patch_size=96,160,160", "3d_fullres.batch_size=4"])
    flat = apply_overrides(plans, fp, {"3d_fullres.patch_size": [96, 160, 160], "3d_fullres.batch_size": 4})
    nested = apply_overrides(plans, fp, {"3d_fullres": {"patch_size": "96x160x160", "batch_size": "4"}})
    assert texts == flat
    assert nested.configuration("3d_fullres").patch_size == (96, 160, 160)


def test_no_overrides_leave_the_plans_unchanged_and_old_plans_load(brats):
    fp, plans = brats
    assert apply_overrides(plans, fp, None) is plans and apply_overrides(plans, fp, []) is plans
    saved = plans.to_json()
    assert all("overrides" not in c for c in saved["configurations"].values())
    assert Plans.from_json(saved) == plans  # plans.json written before overrides existed
    assert all(c.overrides == {} for c in Plans.from_json(saved).configurations.values())


@pytest.mark.parametrize(("override", "expected"), [
    ("3d_fulres.batch_size=4", "override 3d_fulres.batch_size=4: unknown configuration '3d_fulres' (did you mean "
                               "'3d_fullres'?)"),
    ("3d_lowres.batch_size=4", "override 3d_lowres.batch_size=4: the plans of 'BraTSLike' have no '3d_lowres' "
                               "configuration"),
    ("3d_fullres.patchsize=96,160,160", "override 3d_fullres.patchsize=96,160,160: unknown key 'patchsize' (did "
                                        "you mean 'patch_size'?)"),
    ("3d_fullres.patch_size=160,160", "override 3d_fullres.patch_size=160,160: 3d_fullres has 3 axes, so "
                                      "patch_size needs 3 values, not 2; e.g. 3d_fullres.patch_size=128,128,128."),
    ("2d.spacing=1,1,1", "override 2d.spacing=1,1,1: 2d has 2 axes, so spacing needs 2 values, not 3"),
    ("3d_fullres.patch_size=100,160,160", "override 3d_fullres.patch_size=100,160,160: axis 0 size 100 is not "
                                          "divisible by 16 (the network pools that axis 4 times); nearest valid "
                                          "sizes 96 or 112."),
    ("3d_fullres.patch_size=96.5,160,160", "override 3d_fullres.patch_size=96.5,160,160: patch_size must be whole "
                                           "numbers >= 1"),
    ("3d_fullres.batch_size=0", "override 3d_fullres.batch_size=0: batch_size must be a whole number >= 1, not '0'."),
    ("3d_fullres.spacing=-1,1,1", "override 3d_fullres.spacing=-1,1,1: spacing must be positive numbers, one per "
                                  "axis (e.g. 1,0.8,0.8), not '-1,1,1'."),
    ("3d_fullres.num_epochs=ten", "override 3d_fullres.num_epochs=ten: num_epochs must be a whole number >= 1"),
    ("3d_fullres=4", "override '3d_fullres=4' is not CONFIGURATION.KEY=VALUE"),
])
def test_each_invalid_override_gives_one_line(brats, override, expected):
    fp, plans = brats
    with pytest.raises(PlanningError) as err:
        apply_overrides(plans, fp, [override])
    message = str(err.value)
    assert "\n" not in message and message.startswith(expected)


def test_invalid_overrides_are_each_listed_before_any_planning():
    with pytest.raises(PlanningError) as err:
        parse_overrides(["3d_fullres.batch_size=0", "3d_fullres.spacing=0,1,1", "2d.batch_size=2", "2d.batch_size=3"])
    lines = str(err.value).splitlines()
    assert len(lines) == 3 and lines[0].startswith("override 3d_fullres.batch_size=0:")
    assert lines[1].startswith("override 3d_fullres.spacing=0,1,1:")
    assert lines[2] == "override 2d.batch_size=3: 2d.batch_size is already set by 2d.batch_size=2; give it once."


def test_cascade_spacing_and_missing_configurations_are_refused(ct):
    fp, plans = ct
    with pytest.raises(PlanningError, match=r"^override 3d_cascade_fullres.spacing=1,1,1: 3d_cascade_fullres uses "
                                            r"3d_fullres's spacing and preprocessed data; set 3d_fullres.spacing"):
        apply_overrides(plans, fp, ["3d_cascade_fullres.spacing=1,1,1"])
    flat = rgb_2d()
    with pytest.raises(PlanningError, match="have no '3d_fullres' configuration.*; planned: 2d\\."):
        apply_overrides(plan_experiment(flat), flat, ["3d_fullres.batch_size=2"])


def test_network_input_constraint_is_checked(brats):
    fp, _ = brats
    from autoseg.planner.recipe import default_recipe, parse_recipe

    recipe = default_recipe(block="plain", regions=False).with_overrides(parse_recipe(["network=swin_unetr"]))
    plans = plan_experiment(fp, recipe=recipe)
    with pytest.raises(PlanningError, match="input constraint.*nearest valid sizes"):
        apply_overrides(plans, fp, ["3d_fullres.patch_size=80,160,160"])
    ok = apply_overrides(plans, fp, ["3d_fullres.patch_size=64,160,160"]).configuration("3d_fullres")
    assert ok.patch_size == (64, 160, 160) and _divisible(ok)


def test_cli_set_writes_the_overrides_and_warns(tmp_path, capsys):
    from autoseg.cli import main
    from autoseg.data.synthetic import make_synthetic_dataset

    ds = make_synthetic_dataset(tmp_path / "Dataset012_Set", n_cases=3, shape=(16, 16, 16), seed=2)
    plain, work = tmp_path / "plain", tmp_path / "work"
    assert main(["-q", "plan", str(ds), "--workdir", str(plain), "--preset", "cpu", "--preprocess", "none"]) == 0
    fp = load_fingerprint(plain / "fingerprint.json")
    saved = Plans.load(plain / "plans.json")  # no --set: what planning makes, with the resolved recipe
    assert saved == plan_experiment(fp, preset="cpu", recipe=saved.recipe("3d_fullres"))
    capsys.readouterr()
    assert main(["-q", "plan", str(ds), "--workdir", str(work), "--preset", "cpu", "--preprocess", "none",
                 "--explain", "--set", "3d_fullres.batch_size=400", "--set", "2d.num_epochs=5"]) == 0
    out, err = capsys.readouterr()
    saved = json.loads((work / "plans.json").read_text())["configurations"]
    assert saved["3d_fullres"]["overrides"] == {"batch_size": 400} and saved["2d"]["overrides"] == {"num_epochs": 5}
    assert "override: batch size 400 instead of" in out
    assert "autoseg plan: warning: 3d_fullres: patch" in err and "x the memory budget of 8 GB" in err
    assert main(["-q", "plan", str(ds), "--workdir", str(tmp_path / "bad"), "--set", "3d_fullres.batch_size=0"]) == 2
    assert "override 3d_fullres.batch_size=0: batch_size must be" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "fingerprint.json").exists()  # refused before any work
