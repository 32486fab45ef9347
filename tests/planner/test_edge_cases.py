"""Unusual datasets, presets, memory targets and errors."""

from __future__ import annotations

import math

import pytest
from planner_fixtures import brats_like, make_fingerprint

from autoseg.errors import FileFormatError, PlanningError
from autoseg.planner.planner import plan_experiment
from autoseg.planner.plans import Plans, load_plans


def test_tiny_images_plan_without_pooling_the_short_axis():
    fp = make_fingerprint([(1.0, 1.0, 1.0)] * 10, [(5, 30, 30)] * 10)
    plans = plan_experiment(fp)
    full = plans.configuration("3d_fullres")
    assert full.patch_size[0] == 5  # a 5-voxel axis is never pooled, so never padded
    assert all(s[0] == 1 for s in full.topology.strides)
    assert full.patch_size[1] >= 30 and full.batch_size >= 2


def test_images_too_small_to_pool_still_get_a_single_stage_network():
    plans = plan_experiment(make_fingerprint([(1.0, 1.0, 1.0)] * 4, [(6, 6, 6)] * 4))
    full = plans.configuration("3d_fullres")
    assert full.patch_size == (6, 6, 6) and full.topology.n_stages == 1
    assert full.topology.n_conv_per_stage_decoder == ()


def test_huge_images_shrink_the_patch_and_add_a_cascade():
    fp = make_fingerprint([(0.5, 0.5, 0.5)] * 20, [(1000, 1000, 1000)] * 20)
    plans = plan_experiment(fp)
    full = plans.configuration("3d_fullres")
    assert full.estimated_feature_map_elements <= full.memory_budget
    assert max(full.patch_size) <= 192 and full.batch_size == 2
    low = plans.configuration("3d_lowres")
    assert math.prod(low.patch_size) / math.prod(low.median_shape) >= 0.25
    assert plans.configuration("3d_cascade_fullres").previous_stage == "3d_lowres"


def test_strongly_anisotropic_data_pool_in_plane_first():
    fp = make_fingerprint([(10.0, 0.5, 0.5)] * 30, [(30, 512, 512)] * 30)
    plans = plan_experiment(fp)
    full = plans.configuration("3d_fullres")
    assert full.spacing == pytest.approx((10.0, 0.5, 0.5))  # all cases alike: 10th percentile = median
    assert full.topology.strides[1] == (1, 2, 2) and full.topology.kernel_sizes[0] == (1, 3, 3)
    assert full.patch_size[0] <= 32 and full.patch_size[1] > full.patch_size[0]


def test_axis_with_the_largest_spacing_is_moved_first():
    fp = make_fingerprint([(0.8, 0.8, 4.0)] * 10, [(300, 300, 40)] * 10)
    plans = plan_experiment(fp)
    assert plans.transpose_forward == (2, 0, 1) and plans.transpose_backward == (1, 2, 0)
    assert plans.configuration("3d_fullres").spacing[0] == pytest.approx(4.0)


def test_2d_only_dataset_with_autoseg_dummy_spacing():
    fp = make_fingerprint([(999.0 * 0.5, 0.5, 0.5)] * 50, [(1, 256, 256)] * 50, is_2d=True)
    plans = plan_experiment(fp)
    assert list(plans.configurations) == ["2d"]
    assert plans.configuration("2d").patch_size == (256, 256)


def test_cpu_preset_is_much_smaller_than_default():
    default = plan_experiment(brats_like()).configuration("3d_fullres")
    cpu_plans = plan_experiment(brats_like(), preset="cpu")
    cpu = cpu_plans.configuration("3d_fullres")
    assert all(64 <= p <= 80 for p in cpu.patch_size) and cpu.batch_size == 2
    assert cpu.topology.features_per_stage[0] == 16 and max(cpu.topology.features_per_stage) <= 256
    assert cpu.estimated_feature_map_elements * 10 < default.estimated_feature_map_elements
    assert cpu.estimated_feature_map_elements <= cpu.memory_budget  # room for batch 2 (ref batch 2)
    assert cpu.memory_budget * 10 < default.memory_budget
    assert "trades away" in cpu_plans.decisions[0]


def test_memory_target_scales_budget_and_batch():
    small = plan_experiment(brats_like(), gpu_memory_gb=4).configuration("3d_fullres")
    big = plan_experiment(brats_like(), gpu_memory_gb=16).configuration("3d_fullres")
    assert small.memory_budget * 4 == big.memory_budget
    assert math.prod(small.patch_size) < 128 ** 3 <= math.prod(big.patch_size)


def test_unknown_preset_suggests_the_closest_name():
    with pytest.raises(PlanningError, match="did you mean 'resenc_l'"):
        plan_experiment(brats_like(), preset="resenc_L")
    with pytest.raises(PlanningError, match="gpu_memory_gb"):
        plan_experiment(brats_like(), gpu_memory_gb=0)


def test_plans_round_trip_through_json_and_explain(tmp_path):
    plans = plan_experiment(brats_like(), seed=7)
    path = tmp_path / "plans.json"
    plans.save(path)
    again = load_plans(path)
    assert again == plans and again.seed == 7
    table = again.summary_table()
    assert "3d_fullres" in table and "128x128x128" in table
    text = "\n".join(again.explain())
    assert "batch size 2" in text and "inside the nonzero mask" in text
    with pytest.raises(PlanningError, match="did you mean '3d_fullres'"):
        again.configuration("3d_fullress")


def test_bad_plans_files_are_clear_errors(tmp_path):
    path = tmp_path / "plans.json"
    path.write_text('{"version": 99}')
    with pytest.raises(FileFormatError, match="version 99"):
        Plans.load(path)
    with pytest.raises(FileFormatError, match="cannot be read"):
        Plans.load(tmp_path / "missing.json")
