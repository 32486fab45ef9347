"""Modality dropout: channels blanked at the promised rate, never all, cascade inputs untouched, reproducible,
off by default, checked settings, and recorded in the trained model."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from autoseg.api import train
from autoseg.errors import TrainingConfigError
from autoseg.networks.checkpoint import FINAL, load_checkpoint
from autoseg.training.augmentation import augmentation_params, training_transforms, validation_transforms
from autoseg.training.modality_dropout import ModalityDropout, check_modality_dropout
from autoseg.training.settings import TrainSettings


def _blanked(data: np.ndarray) -> np.ndarray:
    """bool (B, C): channels that are all zero."""
    return ~(data.reshape(*data.shape[:2], -1) != 0).any(-1)


def _ones(b: int, c: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(1.0, 2.0, size=(b, c, 3, 3, 3)).astype(np.float32)


@pytest.mark.parametrize("channels", [2, 4])
def test_each_channel_is_blanked_at_the_documented_rate_and_never_all(channels):
    p, n = 0.5, 4000
    np.random.seed(0)
    out = ModalityDropout(p, n_image_channels=channels)(data=_ones(n, channels))["data"]
    blanked = _blanked(out)
    assert not blanked.all(1).any()  # every sample keeps a channel
    expected = p - p ** channels / channels  # the keep-one rule takes a little off p
    rate = blanked.mean(0)
    assert np.all(np.abs(rate - expected) < 4 * math.sqrt(expected * (1 - expected) / n)), rate
    # blanked means exactly 0, and the other channels keep their values
    kept = ~blanked
    assert np.array_equal(out[kept], _ones(n, channels)[kept])


def test_cascade_channels_after_the_image_channels_are_never_touched():
    data = _ones(500, 4)  # 2 image channels + 2 cascade one-hot channels
    np.random.seed(1)
    batch = ModalityDropout(0.9, n_image_channels=2)(data=data.copy())
    assert np.array_equal(batch["data"][:, 2:], data[:, 2:])
    assert _blanked(batch["data"][:, :2]).any() and not _blanked(batch["data"][:, :2]).all(1).any()
    assert batch["dropped_channels"].shape == (500, 2)
    assert np.array_equal(batch["dropped_channels"], _blanked(batch["data"][:, :2]))


def test_zero_probability_is_the_identity_and_draws_nothing():
    data = _ones(8, 3)
    np.random.seed(2)
    out = ModalityDropout(0.0, n_image_channels=3)(data=data.copy())["data"]
    assert np.array_equal(out, data)
    assert np.random.uniform() == np.random.RandomState(2).uniform()  # the RNG stream is untouched


def test_same_seed_same_channels_other_seed_other_channels():
    t = ModalityDropout(0.5, n_image_channels=4)
    masks = []
    for seed in (7, 7, 8):
        np.random.seed(seed)
        masks.append(t(data=_ones(64, 4))["dropped_channels"])
    assert np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[0], masks[2])


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan"), "often"])
def test_invalid_probability_is_a_clear_error(p):
    with pytest.raises(TrainingConfigError, match=r"modality_dropout=.*\[0, 1\)|not a number"):
        TrainSettings(modality_dropout=p)
    with pytest.raises(TrainingConfigError, match="modality_dropout"):
        ModalityDropout(p, n_image_channels=2)


def test_single_channel_cannot_drop_anything():
    with pytest.raises(TrainingConfigError, match="at least 2 input channels"):
        check_modality_dropout(0.3, 1)
    assert check_modality_dropout(0.0, 1) == 0.0  # off is fine with one channel
    with pytest.raises(TrainingConfigError, match="n_image_channels"):
        training_transforms(augmentation_params((8, 8, 8)), label_values=(0, 1), regions=None, ignore_label=None,
                            ds_scales=None, modality_dropout=0.3)


def _pipeline_batch(seed: int = 0) -> dict[str, np.ndarray]:
    params = augmentation_params((8, 8, 8))
    rng = np.random.default_rng(seed)
    data = rng.uniform(1.0, 2.0, size=(64, 2, *params.initial_patch_size)).astype(np.float32)
    seg = np.zeros((64, 1, *params.initial_patch_size), np.int16)
    return {"data": data, "seg": seg}


def test_dropout_is_only_in_the_training_pipeline():
    params = augmentation_params((8, 8, 8))
    kw = {"label_values": (0, 1), "regions": None, "ignore_label": None, "ds_scales": None}
    with_dropout = training_transforms(params, modality_dropout=0.5, n_image_channels=2, **kw)
    assert sum(isinstance(t, ModalityDropout) for t in with_dropout.transforms) == 1
    assert not any(isinstance(t, ModalityDropout) for t in training_transforms(params, **kw).transforms)
    assert not any(isinstance(t, ModalityDropout) for t in validation_transforms(**kw).transforms)
    np.random.seed(5)
    out = with_dropout(**_pipeline_batch())["data"].numpy()
    blanked = _blanked(out)
    assert blanked.any() and not blanked.all(1).any()


def test_zero_dropout_pipeline_is_bit_identical_to_the_default():
    params = augmentation_params((8, 8, 8))
    kw = {"label_values": (0, 1), "regions": None, "ignore_label": None, "ds_scales": None}
    outs = []
    for extra in ({}, {"modality_dropout": 0.0, "n_image_channels": 2}):
        np.random.seed(11)
        outs.append(training_transforms(params, **kw, **extra)(**_pipeline_batch())["data"].numpy())
    assert np.array_equal(outs[0], outs[1])


def test_trained_model_records_its_dropout_and_single_channel_is_refused(tiny_brats, tmp_path):
    ds, wd, plans = tiny_brats
    work = tmp_path / "work"
    shutil.copytree(wd, work, ignore=shutil.ignore_patterns("models"))
    fast = {"iters_per_epoch": 2, "val_iters": 1, "workers": 0, "device": "cpu", "progress": False}
    (res,) = train(ds.root, "3d_fullres", 0, workdir=work, epochs=1, validate=False, modality_dropout=0.25, **fast)
    assert load_checkpoint(res.folder / FINAL)["settings"]["modality_dropout"] == 0.25

    from dataclasses import replace

    from autoseg.training.run import train_fold

    one_channel = replace(plans, channel_names=plans.channel_names[:1])
    with pytest.raises(TrainingConfigError, match="at least 2 input channels"):
        train_fold(ds, one_channel, "3d_fullres", 1, tmp_path / "single",
                   settings=TrainSettings(modality_dropout=0.25, **fast))
    assert not (tmp_path / "single").exists()  # refused before anything was written
