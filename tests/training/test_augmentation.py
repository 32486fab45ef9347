"""Augmentation rules and the batchgenerators pipeline on tiny synthetic batches."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from autoseg.errors import AutosegError
from autoseg.training.augmentation import (
    AugmentationParams,
    augmentation_params,
    training_transforms,
    validation_transforms,
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
