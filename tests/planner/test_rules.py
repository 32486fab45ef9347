"""The pure rule functions, one numbers-in/record-out check each."""

from __future__ import annotations

import pytest

from autoseg.errors import PlanningError
from autoseg.planner.normalization import plan_normalization, scheme_for_channel
from autoseg.planner.patch import initial_patch_size
from autoseg.planner.resampling import separate_z_axis
from autoseg.planner.spacing import fullres_target_spacing, resampled_shape, transpose_for
from autoseg.planner.topology import pad_to_multiple, pooling_layout


def test_acdc_spacing_rule_gives_6_35():
    spacings = [(5.0, 1.5625, 1.5625)] * 10 + [(6.5, 1.5625, 1.5625)] * 10 + [(10.0, 1.5625, 1.5625)] * 80
    t = fullres_target_spacing(spacings, [(9, 237, 256)] * 100)
    assert t.anisotropic and t.spacing[0] == pytest.approx(6.35) and t.median_spacing[0] == 10.0


def test_anisotropic_target_never_drops_below_in_plane_spacing():
    t = fullres_target_spacing([(0.5, 2.0, 2.0)] * 5 + [(8.0, 2.0, 2.0)] * 6, [(10, 200, 200)] * 11)
    assert t.spacing[0] == pytest.approx(2.0 + 1e-5)


def test_bad_spacings_are_rejected():
    with pytest.raises(PlanningError, match="> 0"):
        fullres_target_spacing([(0.0, 1.0, 1.0)], [(10, 10, 10)])


def test_transpose_and_resampled_shape():
    tr = transpose_for((1.0, 5.0, 1.0))
    assert tr.forward == (1, 0, 2) and tr.backward == (1, 0, 2)
    assert resampled_shape((10, 100, 100), (5.0, 1.0, 1.0), (2.5, 2.0, 2.0)) == (20, 50, 50)


def test_pooling_layout_returns_a_record_with_padded_patch():
    lay = pooling_layout((1.0, 1.0), (400, 600))
    assert lay.patch_size == (448, 640) and lay.pools_per_axis == (6, 6) and lay.n_stages == 7
    assert pad_to_multiple((237.5, 256), (32, 32)) == (256, 256)


def test_initial_patch_follows_inverse_spacing_and_median():
    assert initial_patch_size((1.0, 1.0, 1.0), (300, 300, 300)) == (256, 256, 256)
    assert initial_patch_size((2.0, 1.0, 1.0), (50, 500, 500))[0] == 50


def test_separate_z_rule():
    assert separate_z_axis((5.0, 1.0, 1.0), (1.0, 1.0, 1.0)) == 0  # current spacing anisotropic
    assert separate_z_axis((1.0, 1.0, 1.0), (1.0, 4.0, 1.0)) == 1  # else the target's
    assert separate_z_axis((4.0, 4.0, 1.0), (1.0, 1.0, 1.0)) is None  # two coarsest axes tie
    assert separate_z_axis((1.0, 1.0, 1.0), (1.5, 1.0, 1.0)) is None
    assert separate_z_axis((5.0, 1.0, 1.0), (1.0, 1.0, 1.0), force=False) is None


def test_normalisation_by_channel_name():
    assert [scheme_for_channel(n) for n in ("CT", "ct", "noNorm", "T2", "RGB_to_0_1")] == [
        "ct", "ct", "none", "zscore", "rgb_to_0_1"]
    from planner_fixtures import STATS

    norms = plan_normalization(("CT", "FLAIR"), (STATS, STATS), 0.5)
    assert [n.use_mask for n in norms] == [False, True]  # only z-score channels use the mask
    assert norms[0].clip_low == -900.0 and norms[0].clip_high == 1500.0
    assert not any(n.use_mask for n in plan_normalization(("FLAIR",), (STATS,), 0.8))
