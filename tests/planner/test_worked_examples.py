"""The default planner reproduces nnU-Net v2's plans on the reference's worked examples (§3.9)."""

from __future__ import annotations

import pytest
from planner_fixtures import acdc_like, brats_like, ct_like, hippocampus_like, rgb_2d

from autoseg.planner.planner import plan_experiment


def test_ct_like_gets_fullres_lowres_cascade_and_2d():
    plans = plan_experiment(ct_like())
    assert list(plans.configurations) == ["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"]
    full = plans.configuration("3d_fullres")
    assert full.spacing == pytest.approx((1.5, 0.78, 0.78))
    assert full.median_shape == (200, 512, 512)
    assert (full.patch_size, full.batch_size, full.topology.n_stages) == ((64, 192, 192), 2, 6)
    assert full.topology.strides[1:] == ((2, 2, 2),) * 4 + ((1, 2, 2),)
    low = plans.configuration("3d_lowres")
    assert low.spacing == pytest.approx((2.71, 1.41, 1.41), rel=0.01)
    assert low.median_shape == (111, 283, 283)
    assert (low.patch_size, low.batch_size) == ((64, 192, 192), 2)
    assert low.next_stage == "3d_cascade_fullres" and not low.batch_dice
    casc = plans.configuration("3d_cascade_fullres")
    assert casc.previous_stage == "3d_lowres" and casc.data_identifier == "3d_fullres" and casc.batch_dice
    two = plans.configuration("2d")
    assert (two.patch_size, two.batch_size, two.topology.n_stages) == ((512, 512), 12, 8)
    assert [n.scheme for n in full.normalization] == ["ct"] and not full.normalization[0].use_mask


def test_acdc_like_uses_the_anisotropy_rule_and_skips_lowres():
    plans = plan_experiment(acdc_like())
    full = plans.configuration("3d_fullres")
    assert full.spacing[0] == pytest.approx(6.35, rel=1e-3)
    assert (full.patch_size, full.batch_size) == ((14, 256, 256), 4)
    assert full.topology.kernel_sizes[:3] == ((1, 3, 3), (1, 3, 3), (3, 3, 3))
    assert set(full.topology.kernel_sizes[2:]) == {(3, 3, 3)}
    assert "3d_lowres" not in plans.configurations and not full.batch_dice
    assert (plans.configuration("2d").patch_size, plans.configuration("2d").batch_size) == ((256, 256), 49)
    assert any("anisotropic" in line and "10th percentile" in line for line in plans.explain())


def test_brats_like_masks_normalisation_and_uses_128_cubed():
    plans = plan_experiment(brats_like())
    full = plans.configuration("3d_fullres")
    assert (full.patch_size, full.batch_size) == ((128, 128, 128), 2)
    assert [n.use_mask for n in full.normalization] == [True] * 4
    assert [n.scheme for n in full.normalization] == ["zscore"] * 4
    assert (plans.configuration("2d").patch_size, plans.configuration("2d").batch_size) == ((192, 160), 105)
    assert list(plans.configurations) == ["2d", "3d_fullres"]


def test_hippocampus_like_batch_is_capped_at_5_percent_of_the_dataset():
    plans = plan_experiment(hippocampus_like())
    full = plans.configuration("3d_fullres")
    assert (full.patch_size, full.batch_size) == ((40, 56, 40), 9)
    assert any("5% dataset cap 9" in d for d in full.decisions)
    assert (plans.configuration("2d").patch_size, plans.configuration("2d").batch_size) == ((56, 40), 366)


def test_rgb_2d_pads_patch_and_has_no_3d_configurations():
    plans = plan_experiment(rgb_2d())
    assert list(plans.configurations) == ["2d"]
    assert (plans.configuration("2d").patch_size, plans.configuration("2d").batch_size) == ((448, 640), 11)
    assert any("data are 2D" in d for d in plans.decisions)


@pytest.mark.parametrize(("make", "expected"), [
    (ct_like, {"3d_fullres": ((112, 256, 256), 2), "2d": ((512, 512), 35)}),
    (acdc_like, {"3d_fullres": ((14, 256, 256), 10), "2d": ((256, 256), 141)}),
    (brats_like, {"3d_fullres": ((160, 192, 160), 3), "2d": ((192, 160), 301)}),
])
def test_resenc_l_at_24_gb_matches_nnunet(make, expected):
    plans = plan_experiment(make(), preset="resenc_l", gpu_memory_gb=24)
    assert {k: (v.patch_size, v.batch_size) for k, v in plans.configurations.items()} == expected
    assert plans.configuration("3d_fullres").topology.block == "residual"


def test_resenc_m_has_no_dataset_cap():
    plans = plan_experiment(hippocampus_like(), preset="resenc_m")
    assert plans.configuration("3d_fullres").batch_size == 58
    assert plans.configuration("2d").batch_size == 1618
