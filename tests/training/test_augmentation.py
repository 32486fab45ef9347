"""Augmentation rules and the batchgenerators pipeline on tiny synthetic batches."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import math

import numpy as np
import pytest
import torch
from batchgenerators.transforms.abstract_transforms import Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform
from batchgenerators.transforms.utility_transforms import RemoveLabelTransform

from autoseg.errors import AutosegError, TrainingConfigError
from autoseg.training.augmentation import (
    AugmentationParams,
    augmentation_params,
    training_transforms,
    validation_transforms,
)
from autoseg.training.augmentation_presets import AUGMENTATIONS, AugmentationPreset, light, nnunet, nnunet_cpu, none
from autoseg.training.transforms import (
    FoldFirstAxis,
    GaussianBlur,
    GaussianNoise,
    SegToTarget,
    ToTorch,
    UnfoldFirstAxis,
)

BRATS_REGIONS = [(1, 2, 3), (2, 3), (3,)]


def _batch(params: AugmentationParams, *, b: int = 2, c: int = 2, labels: tuple[int, ...] = (0, 1, 2),
           seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = params.initial_patch_size
    data = rng.normal(size=(b, c, *shape)).astype(np.float32)
    # blocky labels so that interpolation has edges to work on, and a -1 border (outside the image)
    coarse = rng.choice(labels, size=(b, 1, *[max(1, s // 4) for s in shape]))
    seg = coarse.repeat(4, 2).repeat(4, 3)
    if len(shape) == 3:
        seg = seg.repeat(4, 4)
    seg = np.pad(seg, [(0, 0), (0, 0)] + [(0, max(0, s - n)) for s, n in zip(shape, seg.shape[2:])],
                 constant_values=-1)[(slice(None), slice(None), *[slice(0, s) for s in shape])]
    seg[(slice(None), slice(None), *[slice(0, 2)] * len(shape))] = -1
    return {"data": data, "seg": seg.astype(np.int16)}


def test_params_rules_3d_and_dummy_2d() -> None:
    aniso = augmentation_params((20, 160, 160))
    assert aniso.dummy_2d
    assert aniso.rotation_x == pytest.approx((-math.pi, math.pi))
    assert aniso.rotation_y == (0.0, 0.0) and aniso.rotation_z == (0.0, 0.0)
    assert aniso.initial_patch_size[0] == 20  # no spatial augmentation along the folded axis
    assert aniso.mirror_axes == (0, 1, 2)
    iso = augmentation_params((64, 64, 64))
    assert not iso.dummy_2d
    for rng in (iso.rotation_x, iso.rotation_y, iso.rotation_z):
        assert rng == pytest.approx((-math.pi / 6, math.pi / 6))
    assert not augmentation_params((30, 90, 90)).dummy_2d  # ratio exactly 3 is not > 3


def test_params_rules_2d() -> None:
    elongated = augmentation_params((256, 128))
    assert elongated.rotation_x == pytest.approx((-math.pi / 12, math.pi / 12))
    square = augmentation_params((128, 128))
    assert square.rotation_x == pytest.approx((-math.pi, math.pi))
    assert square.mirror_axes == (0, 1) and not square.dummy_2d
    # a square under any rotation needs its diagonal
    assert square.initial_patch_size == (182, 182)


@pytest.mark.parametrize("patch", [(64, 64, 64), (20, 160, 160), (48, 96, 80), (128, 128), (256, 96)])
def test_initial_patch_covers_patch_and_round_trips(patch: tuple[int, ...]) -> None:
    params = augmentation_params(patch)
    assert all(i >= p for i, p in zip(params.initial_patch_size, patch, strict=True))
    assert AugmentationParams.from_json(json.loads(json.dumps(params.to_json()))) == params
    bigger = augmentation_params(patch, cover_scale=1.4)
    assert all(b >= i for b, i in zip(bigger.initial_patch_size, params.initial_patch_size, strict=True))


def test_params_reject_bad_patch() -> None:
    with pytest.raises(AutosegError, match="patch_size"):
        augmentation_params((32,))
    with pytest.raises(AutosegError, match="cover_scale"):
        augmentation_params((32, 32), cover_scale=2.0)


def test_training_batch_shapes_dtypes_and_label_values() -> None:
    params = augmentation_params((16, 16, 16))
    pipeline = training_transforms(params, label_values=(0, 2, 5), regions=None, ignore_label=None,
                                   ds_scales=None)
    np.random.seed(3)
    seen: set[int] = set()
    for i in range(6):  # several batches so that rotations and scalings do happen
        out = pipeline(**_batch(params, b=4, labels=(0, 2, 5), seed=i))
        assert isinstance(out["data"], torch.Tensor) and out["data"].dtype == torch.float32
        assert out["data"].shape == (4, 2, 16, 16, 16)
        assert isinstance(out["target"], torch.Tensor) and out["target"].shape == (4, 1, 16, 16, 16)
        assert "seg" not in out
        seen |= set(np.unique(out["target"].numpy()).tolist())
    assert seen <= {0, 2, 5}  # no -1 left, no interpolated in-between values (1, 3, 4)
    assert {2, 5} <= seen


def test_training_is_deterministic_under_numpy_seed() -> None:
    params = augmentation_params((12, 12, 12))
    pipeline = training_transforms(params, label_values=(0, 1, 2), regions=None, ignore_label=None,
                                   ds_scales=[(1, 1, 1), (0.5, 0.5, 0.5)])
    results = []
    for _ in range(2):
        np.random.seed(123)
        outs = [pipeline(**_batch(params, b=3, seed=k)) for k in range(3)]
        results.append(outs)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a["data"], b["data"])
        assert all(torch.equal(x, y) for x, y in zip(a["target"], b["target"], strict=True))


def test_dummy_2d_pipeline_with_regions_and_deep_supervision() -> None:
    params = augmentation_params((4, 16, 16))
    assert params.dummy_2d
    scales = [(1, 1, 1), (1, 0.5, 0.5), (1, 0.25, 0.25)]
    pipeline = training_transforms(params, label_values=(0, 1, 2, 3), regions=BRATS_REGIONS, ignore_label=4,
                                   ds_scales=scales)
    np.random.seed(0)
    out = pipeline(**_batch(params, b=3, c=4, labels=(0, 1, 2, 3, 4)))
    assert out["data"].shape == (3, 4, 4, 16, 16)
    assert [tuple(t.shape) for t in out["target"]] == [(3, 4, 4, 16, 16), (3, 4, 4, 8, 8), (3, 4, 4, 4, 4)]
    assert all(t.dtype == torch.float32 for t in out["target"])
    target = out["target"][0]
    assert set(np.unique(target.numpy()).tolist()) <= {0.0, 1.0}
    # nested regions stay nested: ET inside TC inside WT; ignored voxels are in no region
    assert torch.all(target[:, 2] <= target[:, 1]) and torch.all(target[:, 1] <= target[:, 0])
    assert torch.all(target[:, 0] * target[:, 3] == 0)


def test_region_conversion_brats_and_ignore_channel() -> None:
    seg = np.array([[-1, 0, 1, 2, 3, 4]], dtype=np.int16).reshape(1, 1, 1, 6)
    data = np.zeros((1, 1, 1, 6), dtype=np.float32)
    out = validation_transforms(regions=BRATS_REGIONS, ignore_label=4)(data=data, seg=seg)
    target = out["target"].numpy()[0, :, 0]
    assert target.tolist() == [[0, 0, 1, 1, 1, 0],   # whole tumour 1, 2, 3
                               [0, 0, 0, 1, 1, 0],   # tumour core 2, 3
                               [0, 0, 0, 0, 1, 0],   # enhancing 3
                               [0, 0, 0, 0, 0, 1]]   # ignore mask (1 where ignored)
    labels = validation_transforms()(data=data.copy(), seg=seg.copy())["target"]
    assert labels.dtype == torch.int16 and labels.numpy().ravel().tolist() == [0, 0, 1, 2, 3, 4]


def test_deep_supervision_targets_are_nearest_downsampled() -> None:
    seg = np.arange(16, dtype=np.int16).reshape(1, 1, 4, 4)
    out = validation_transforms(ds_scales=[(1, 1), (0.5, 0.5), (0.25, 0.25)])(
        data=np.zeros((1, 1, 4, 4), np.float32), seg=seg)
    full, half, quarter = (t.numpy()[0, 0] for t in out["target"])
    assert full.shape == (4, 4) and half.shape == (2, 2) and quarter.shape == (1, 1)
    assert set(half.ravel().tolist()) <= set(range(16))  # values copied, never averaged
    assert half.tolist() == [[5, 7], [13, 15]]


def test_mask_channels_zero_outside_the_image() -> None:
    params = augmentation_params((8, 8, 8))
    pipeline = training_transforms(params, label_values=(0, 1), regions=None, ignore_label=None,
                                   ds_scales=None, mask_channels=(0,))
    batch = _batch(params, b=1, labels=(0, 1))
    batch["data"] += 5.0
    batch["seg"][:] = -1  # everything outside the imaged region
    np.random.seed(0)
    out = pipeline(**batch)
    assert torch.all(out["data"][:, 0] == 0)
    assert torch.any(out["data"][:, 1] != 0)
    assert torch.all(out["target"] == 0)


def test_inconsistent_regions_are_rejected() -> None:
    params = augmentation_params((8, 8, 8))
    with pytest.raises(AutosegError, match="label_values"):
        training_transforms(params, label_values=(0, 1), regions=[(1, 2)], ignore_label=None, ds_scales=None)
    with pytest.raises(AutosegError, match="3D"):
        training_transforms(params, label_values=None, regions=None, ignore_label=None, ds_scales=[(1, 1)])


def test_cascade_previous_stage_becomes_one_hot_channels() -> None:
    params = augmentation_params((12, 12, 12))
    batch = _batch(params, b=4, c=2, labels=(0, 1, 2))
    prev = np.zeros_like(batch["seg"])
    prev[:, :, 4:20, 4:20, 4:20] = 1
    prev[:, :, 10:14, 10:14, 10:14] = 2
    batch["seg"] = np.concatenate([batch["seg"], prev], 1)
    pipeline = training_transforms(params, label_values=(0, 1, 2), regions=None, ignore_label=None,
                                   ds_scales=None, cascade_labels=(1, 2))
    np.random.seed(5)
    out = pipeline(**batch)
    assert out["data"].shape == (4, 4, 12, 12, 12)  # 2 image + 2 one-hot channels
    assert out["target"].shape == (4, 1, 12, 12, 12)
    onehot = out["data"][:, 2:]
    assert set(np.unique(onehot.numpy()).tolist()) <= {0.0, 1.0}
    assert torch.all(onehot.sum(1) <= 1)  # labels stay mutually exclusive after perturbation
    val = validation_transforms(cascade_labels=(1, 2))(
        data=np.zeros((1, 1, 4, 4, 4), np.float32),
        seg=np.stack([np.zeros((1, 4, 4, 4)), np.full((1, 4, 4, 4), 2)], 1).astype(np.int16))
    assert val["data"].shape == (1, 3, 4, 4, 4) and torch.all(val["data"][:, 2] == 1)
    with pytest.raises(AutosegError, match="cascade_labels"):
        validation_transforms(cascade_labels=(1,))(data=np.zeros((1, 1, 4, 4), np.float32),
                                                   seg=np.zeros((1, 1, 4, 4), np.int16))


# ---- presets and mirror axes -----------------------------------------------------------------------------------
def _reference_pipeline(params: AugmentationParams, *, elastic: bool = False, order_data: int = 3,
                        order_seg: int = 1) -> Compose:
    """The training pipeline as it was before presets (label training, one target), step by step."""
    patch = params.patch_size[1:] if params.dummy_2d else params.patch_size
    spatial = SpatialTransform(
        patch, patch_center_dist_from_border=None, do_elastic_deform=elastic, alpha=(0.0, 900.0), sigma=(9.0, 13.0),
        do_rotation=True, angle_x=params.rotation_x, angle_y=params.rotation_y, angle_z=params.rotation_z,
        do_scale=True, scale=params.scale_range, border_mode_data="constant", border_cval_data=0,
        order_data=order_data, border_mode_seg="constant", border_cval_seg=-1, order_seg=order_seg,
        random_crop=False, p_el_per_sample=0.2, p_scale_per_sample=0.2, p_rot_per_sample=0.2,
        independent_scale_for_each_axis=False)
    steps = [FoldFirstAxis(), spatial, UnfoldFirstAxis()] if params.dummy_2d else [spatial]
    steps += [
        GaussianNoise((0.0, 0.1), p_per_sample=0.1),
        GaussianBlur((0.5, 1.0), p_per_sample=0.2, p_per_channel=0.5, skip_first_axis=params.dummy_2d),
        BrightnessMultiplicativeTransform((0.75, 1.25), per_channel=True, p_per_sample=0.15),
        ContrastAugmentationTransform((0.75, 1.25), preserve_range=True, per_channel=True, p_per_sample=0.15),
        SimulateLowResolutionTransform(zoom_range=(0.5, 1.0), per_channel=True, p_per_channel=0.5,
                                       order_downsample=0, order_upsample=1, p_per_sample=0.25,
                                       ignore_axes=(0,) if params.dummy_2d else None),
        GammaTransform((0.7, 1.5), invert_image=True, per_channel=True, retain_stats=True, p_per_sample=0.1),
        GammaTransform((0.7, 1.5), invert_image=False, per_channel=True, retain_stats=True, p_per_sample=0.3),
        MirrorTransform(params.mirror_axes),
        RemoveLabelTransform(-1, 0), SegToTarget(None, None), ToTorch(),
    ]
    return Compose(steps)


def _outputs(pipeline: Compose, params: AugmentationParams, *, n: int = 4, seed: int = 11) -> list[dict]:
    np.random.seed(seed)
    return [pipeline(**_batch(params, b=3, seed=k)) for k in range(n)]


@pytest.mark.parametrize("patch", [(12, 12, 12), (4, 16, 16), (16, 16)])
@pytest.mark.parametrize("options", [{}, {"elastic": True}, {"order_data": 1, "order_seg": 0}])
def test_nnunet_cpu_preset_is_bit_identical_to_the_pipeline_before_presets(patch, options) -> None:
    params = augmentation_params(patch)
    kw = {"label_values": (0, 1, 2), "regions": None, "ignore_label": None, "ds_scales": None}
    expected = _outputs(_reference_pipeline(params, **options), params)
    for pipeline in (training_transforms(params, **kw, **options),  # no preset: the keywords as before
                     training_transforms(params, **kw, preset=nnunet_cpu(**options)),
                     training_transforms(params, **kw, preset=nnunet_cpu(), **options)):  # keywords replace preset's
        for got, want in zip(_outputs(pipeline, params), expected, strict=True):
            assert torch.equal(got["data"], want["data"]) and torch.equal(got["target"], want["target"])


def test_preset_factories_have_typed_keyword_defaults_and_a_summary() -> None:
    for name, factory in AUGMENTATIONS.items():
        assert factory.__doc__ and factory.__doc__.strip().splitlines()[0], name
        for p in inspect.signature(factory, eval_str=True).parameters.values():
            assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
            assert p.annotation in (bool, int, float), (name, p)
        preset = factory()
        assert AugmentationPreset(**json.loads(json.dumps(preset.to_json()))) == preset


@pytest.mark.parametrize(("make", "words"), [
    (lambda: nnunet_cpu(order_data=2), ["'nnunet_cpu'", "order_data=2", "0 or 1 or 3"]),
    (lambda: nnunet_cpu(order_seg=3), ["'nnunet_cpu'", "order_seg=3", "0 or 1"]),
    (lambda: nnunet_cpu(elastic=1), ["'nnunet_cpu'", "elastic=1", "True or False"]),
    (lambda: nnunet(order_data=2), ["'nnunet'", "order_data=2", "0 or 1 or 3"]),
    (lambda: nnunet(elastic=1), ["'nnunet'", "elastic=1", "True or False"]),
    (lambda: light(order_data=True), ["'light'", "order_data=True", "0 or 1 or 3"]),
    (lambda: light(order_seg=2), ["'light'", "order_seg=2", "0 or 1"]),
    (lambda: AugmentationPreset(p_noise=1.5), ["p_noise=1.5", "[0, 1]"]),
    (lambda: AugmentationPreset(gamma_range=(1.5, 0.7)), ["gamma_range=(1.5, 0.7)", "low", "high"]),
    (lambda: AugmentationPreset(scale_range=(0.0, 1.2)), ["scale_range=(0.0, 1.2)", "0 < low"]),
    (lambda: training_transforms(augmentation_params((8, 8, 8)), label_values=None, regions=None,
                                 ignore_label=None, ds_scales=None, order_data=2), ["order_data=2", "0 or 1 or 3"]),
])
def test_preset_parameters_are_validated(make, words) -> None:
    with pytest.raises(TrainingConfigError) as err:
        make()
    assert all(w in str(err.value) for w in ["augmentation", *words]), str(err.value)


def _centre(x: np.ndarray, patch: tuple[int, ...]) -> np.ndarray:
    lo = [(s - p) // 2 for s, p in zip(x.shape[2:], patch, strict=True)]
    return x[(slice(None), slice(None), *[slice(a, a + p) for a, p in zip(lo, patch, strict=True)])]


@pytest.mark.parametrize("patch", [(8, 8, 8), (4, 12, 12), (12, 12)])
def test_none_preset_only_crops_and_never_mirrors(patch) -> None:
    params = augmentation_params(patch)
    pipeline = training_transforms(params, label_values=None, regions=None, ignore_label=None, ds_scales=None,
                                   preset=none())
    assert not any(isinstance(t, MirrorTransform) for t in pipeline.transforms)
    np.random.seed(0)
    for k in range(12):
        batch = _batch(params, b=2, seed=k)
        want_data, want_seg = _centre(batch["data"], patch), np.maximum(_centre(batch["seg"], patch), 0)
        out = pipeline(**batch)
        assert np.array_equal(out["data"].numpy(), want_data)
        assert np.array_equal(out["target"].numpy(), want_seg)


def test_light_preset_keeps_spatial_mirroring_and_mild_intensity_only() -> None:
    params = augmentation_params((8, 8, 8))
    pipeline = training_transforms(params, label_values=None, regions=None, ignore_label=None, ds_scales=None,
                                   preset=light())
    kinds = [type(t) for t in pipeline.transforms]
    assert {SpatialTransform, BrightnessMultiplicativeTransform, ContrastAugmentationTransform, MirrorTransform} \
        <= set(kinds)
    assert not {GaussianNoise, GaussianBlur, SimulateLowResolutionTransform, GammaTransform} & set(kinds)
    spatial = pipeline.transforms[kinds.index(SpatialTransform)]
    assert spatial.order_data == 1 and spatial.order_seg == 1 and not spatial.do_elastic_deform
    bright = pipeline.transforms[kinds.index(BrightnessMultiplicativeTransform)]
    assert bright.multiplier_range == (0.9, 1.1)
    # an explicit keyword replaces the preset's value
    again = training_transforms(params, label_values=None, regions=None, ignore_label=None, ds_scales=None,
                                preset=light(), order_data=3)
    assert next(t for t in again.transforms if isinstance(t, SpatialTransform)).order_data == 3


@pytest.mark.parametrize(("patch", "axes"), [((8, 8, 8), (0,)), ((8, 8, 8), (1, 2)), ((12, 12), (1,))])
def test_mirror_axes_subset_mirrors_only_those_axes(patch, axes) -> None:
    params = augmentation_params(patch, mirror_axes=axes)
    assert params.mirror_axes == axes
    assert AugmentationParams.from_json(json.loads(json.dumps(params.to_json()))).mirror_axes == axes
    pipeline = training_transforms(params, label_values=None, regions=None, ignore_label=None, ds_scales=None,
                                   preset=dataclasses.replace(none(), mirror=True))
    np.random.seed(1)
    seen: set[tuple[int, ...]] = set()
    for k in range(40):
        batch = _batch(params, b=1, seed=k)
        crop = _centre(batch["data"], patch)
        got = pipeline(**batch)["data"].numpy()
        flips = [f for n in range(len(patch) + 1) for f in itertools.combinations(range(len(patch)), n)
                 if np.array_equal(got, np.flip(crop, [2 + a for a in f]) if f else crop)]
        assert len(flips) == 1 and set(flips[0]) <= set(axes), flips
        seen.add(flips[0])
    assert len(seen) == 2 ** len(axes)  # p 0.5 per axis: every combination of the allowed axes occurs
    assert not any(isinstance(t, MirrorTransform) for t in training_transforms(
        augmentation_params(patch, mirror_axes=()), label_values=None, regions=None, ignore_label=None,
        ds_scales=None).transforms)


@pytest.mark.parametrize(("patch", "axes"), [((8, 8, 8), (0, 0)), ((8, 8, 8), (3,)), ((8, 8), (2,)),
                                              ((8, 8, 8), (-1,)), ((8, 8, 8), (0.0,)), ((8, 8, 8), (True,)),
                                              ((8, 8, 8), "01"), ((8, 8, 8), 0)])
def test_invalid_mirror_axes_are_refused(patch, axes) -> None:
    with pytest.raises(TrainingConfigError, match=r"mirror_axes=.*distinct integers in 0\.\."):
        augmentation_params(patch, mirror_axes=axes)
