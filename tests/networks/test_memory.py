"""The analytic memory estimate reproduces nnU-Net v2's measured feature-map counts exactly."""

from __future__ import annotations

import pytest

from autoseg.errors import PlanningError
from autoseg.networks.memory import count_parameters, estimate_training_bytes, feature_map_elements
from autoseg.networks.topology import UNetTopology


def plain(ndim: int, features: tuple[int, ...], first_strides: tuple[tuple[int, ...], ...] = ()) -> UNetTopology:
    n = len(features)
    strides = ((1,) * ndim, *first_strides, *[(2,) * ndim] * (n - 1 - len(first_strides)))
    return UNetTopology(strides=strides, kernel_sizes=((3,) * ndim,) * n, features_per_stage=features,
                        n_blocks_per_stage=(2,) * n, n_conv_per_stage_decoder=(2,) * (n - 1)).check()


FEAT_3D = (32, 64, 128, 256, 320, 320)


def test_plain_3d_128_cubed_matches_nnunet():
    assert feature_map_elements(plain(3, FEAT_3D), (128, 128, 128), num_classes=3) == 452_796_416


def test_plain_3d_ct_patch_matches_nnunet():
    # dynamic_network_architectures' compute_conv_feature_map_size returns 509,442,048 for this network
    # (3 classes, run with its v0.4.4); the reference's 509,395,968 is 46,080 = 320 x 4x6x6 lower, one
    # bottleneck-sized map, and must come from a slightly different setup.
    topo = plain(3, FEAT_3D)
    topo = UNetTopology(strides=topo.strides[:5] + ((1, 2, 2),), kernel_sizes=topo.kernel_sizes,
                        features_per_stage=FEAT_3D, n_blocks_per_stage=(2,) * 6, n_conv_per_stage_decoder=(2,) * 5)
    assert feature_map_elements(topo, (64, 192, 192), num_classes=3) == 509_442_048


def test_plain_2d_512_matches_nnunet():
    topo = plain(2, (32, 64, 128, 256, 512, 512, 512))
    assert feature_map_elements(topo, (512, 512), num_classes=3) == 82_771_968


def test_residual_encoder_matches_nnunet():
    base = plain(3, FEAT_3D)
    topo = UNetTopology(strides=base.strides, kernel_sizes=base.kernel_sizes, features_per_stage=FEAT_3D,
                        n_blocks_per_stage=(1, 3, 4, 6, 6, 6), n_conv_per_stage_decoder=(1,) * 5,
                        block="residual").check()
    assert feature_map_elements(topo, (128, 128, 128), num_classes=3) == 557_420_544


def test_parameter_counts_match_the_built_networks():
    # counted on dynamic_network_architectures' PlainConvUNet / ResidualEncoderUNet (1 input channel, 3 classes)
    base = plain(3, FEAT_3D)
    assert count_parameters(base, in_channels=1, num_classes=3) == 31_196_399
    res = UNetTopology(strides=base.strides, kernel_sizes=base.kernel_sizes, features_per_stage=FEAT_3D,
                       n_blocks_per_stage=(1, 3, 4, 6, 6, 6), n_conv_per_stage_decoder=(1,) * 5, block="residual")
    assert count_parameters(res, in_channels=1, num_classes=3) == 102_350_575


def test_training_bytes_grow_with_batch_and_include_parameters():
    topo = plain(3, FEAT_3D)
    one = estimate_training_bytes(topo, (128,) * 3, batch_size=1, in_channels=1, num_classes=3)
    two = estimate_training_bytes(topo, (128,) * 3, batch_size=2, in_channels=1, num_classes=3)
    per_sample = two - one
    assert per_sample == 452_796_416 * 6
    assert one - per_sample == 31_196_399 * 16
    assert 4e9 < two < 8e9  # a default 3D plan at batch 2 fits an 8 GB GPU
    with pytest.raises(PlanningError, match="batch_size"):
        estimate_training_bytes(topo, (128,) * 3, batch_size=0, in_channels=1, num_classes=3)


def test_wrong_patch_dimensionality_is_a_clear_error():
    with pytest.raises(PlanningError, match="3D"):
        feature_map_elements(plain(3, FEAT_3D), (128, 128), num_classes=2)


@pytest.mark.parametrize(("change", "match"), [
    ({"kernel_sizes": ((3, 3, 3),) * 5}, "kernel_sizes has 5 entries"),
    ({"n_conv_per_stage_decoder": (2,) * 6}, "n_stages - 1"),
    ({"block": "dense"}, "block='dense' is unknown"),
    ({"kernel_sizes": ((3, 3, 3),) * 5 + ((2, 3, 3),)}, "even size"),
    ({"strides": ((2, 2, 2),) * 6}, "must be all ones"),
    ({"features_per_stage": (32, 64, 128, 256, 320, 0)}, "positive integer"),
])
def test_topology_check_names_the_field_and_the_fix(change, match):
    import dataclasses

    bad = dataclasses.replace(plain(3, FEAT_3D), **change)
    with pytest.raises(PlanningError, match=match):
        bad.check()


def test_topology_json_round_trip_and_divisibility():
    topo = plain(3, FEAT_3D, first_strides=((1, 2, 2),))
    assert UNetTopology.from_json(topo.to_json()) == topo
    assert topo.divisible_by == (16, 32, 32)
    with pytest.raises(PlanningError, match="regenerate"):
        UNetTopology.from_json({"strides": [[1, 1, 1]]})
