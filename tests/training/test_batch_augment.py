"""The batched torch augmentation (nnunet, the default) against the batchgenerators pipeline and its own rules."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from scipy.ndimage import map_coordinates

from autoseg.errors import TrainingConfigError
from autoseg.training.augmentation import augmentation_params, validation_transforms
from autoseg.training.augmentation_presets import AUGMENTATIONS, nnunet, nnunet_cpu, none
from autoseg.training.batch_augment import BatchAugmenter, _Draws, batch_generator_seed
from autoseg.training.transforms import GaussianBlur

BRATS_REGIONS = [(1, 2, 3), (2, 3), (3,)]
ONLY = dict(p_rotation=0.0, p_scaling=0.0, p_noise=0.0, p_blur=0.0, p_brightness=0.0, p_contrast=0.0,
            p_low_res=0.0, p_inverted_gamma=0.0, p_gamma=0.0, mirror=False, on_device=True)


def _preset(**kw):
    return dataclasses.replace(none(), **{**ONLY, "order_data": 1, **kw})


def _batch(shape, *, b=2, c=2, labels=(0, 1, 2, 3), seed=0, k=0):
    rng = np.random.default_rng(seed)
    coarse = rng.choice(labels, size=(b, 1, *[max(1, s // 3) for s in shape]))
    seg = coarse
    for ax in range(len(shape)):
        seg = seg.repeat(3, 2 + ax)
    seg = np.pad(seg, [(0, 0), (0, 0)] + [(0, s - n) for s, n in zip(shape, seg.shape[2:])], constant_values=-1)
    seg[(slice(None), slice(None), *[slice(0, 2)] * len(shape))] = -1
    data = (rng.normal(size=(b, c, *shape)) + seg).astype(np.float32)
    return {"data": torch.from_numpy(data), "seg": torch.from_numpy(seg.astype(np.int8)), "seed": 3, "batch_index": k}


def _augmenter(patch, preset, **kw):
    params = augmentation_params(patch)
    kw = {"regions": None, "ignore_label": None, "ds_scales": None, **kw}
    return params, BatchAugmenter(params, preset, **kw)


def _crop(x, patch):
    return x[(slice(None), slice(None), *(slice((i - q) // 2, (i - q) // 2 + q) for i, q in zip(x.shape[2:], patch)))]


def test_intensity_steps_match_batchgenerators_exactly():
    """With p 1 and a one-point range, brightness, contrast, gamma, inverted gamma, blur and low resolution equal
    today's pipeline's."""
    patch = (12, 12, 12)
    cases = [(dict(p_brightness=1.0, brightness_range=(1.2, 1.2)),
              BrightnessMultiplicativeTransform((1.2, 1.2), per_channel=True, p_per_sample=1.0)),
             (dict(p_contrast=1.0, contrast_range=(1.3, 1.3)),
              ContrastAugmentationTransform((1.3, 1.3), preserve_range=True, per_channel=True, p_per_sample=1.0)),
             (dict(p_gamma=1.0, gamma_range=(1.4, 1.4)),
              GammaTransform((1.4, 1.4), per_channel=True, retain_stats=True, p_per_sample=1.0)),
             (dict(p_inverted_gamma=1.0, gamma_range=(1.25, 1.25)),
              GammaTransform((1.25, 1.25), invert_image=True, per_channel=True, retain_stats=True, p_per_sample=1.0)),
             (dict(p_blur=1.0, p_blur_per_channel=1.0, blur_sigma=(0.7, 0.7)),
              GaussianBlur((0.7, 0.7), p_per_sample=1.0, p_per_channel=1.0, skip_first_axis=False)),
             (dict(p_low_res=1.0, p_low_res_per_channel=1.0, low_res_zoom=(0.5, 0.5)),
              SimulateLowResolutionTransform(zoom_range=(0.5, 0.5), per_channel=True, p_per_channel=1.0,
                                             order_downsample=0, order_upsample=1, p_per_sample=1.0))]
    for kw, old in cases:
        params, aug = _augmenter(patch, _preset(**kw))
        batch = _batch(params.initial_patch_size)
        cropped = _crop(batch["data"], patch).numpy().copy()
        np.random.seed(0)
        want = old(data=cropped.copy(), seg=None)["data"]
        got = aug(batch)["data"].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=str(kw))
        assert not np.allclose(got, cropped), kw


def test_noise_has_the_drawn_strength():
    params, aug = _augmenter((16, 16, 16), _preset(p_noise=1.0, noise_std=(0.2, 0.2)))
    batch = _batch(params.initial_patch_size)
    added = aug(batch)["data"] - _crop(batch["data"], (16, 16, 16))
    assert abs(float(added.std()) - 0.2) < 0.01 and abs(float(added.mean())) < 0.01


def test_targets_regions_and_deep_supervision_match_the_cpu_pipeline_exactly():
    patch = (12, 12, 12)
    scales = [(1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)]
    for regions, ignore in ((None, None), (BRATS_REGIONS, None), ([(1, 2), (2,)], 3)):
        params, aug = _augmenter(patch, _preset(), regions=regions, ignore_label=ignore, ds_scales=scales)
        batch = _batch(params.initial_patch_size)
        seg = _crop(batch["seg"], patch)
        want = validation_transforms(regions=regions, ignore_label=ignore, ds_scales=scales)(
            data=np.zeros((2, 1, *patch), np.float32), seg=seg.numpy().astype(np.int16))["target"]
        got = aug(batch)["target"]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g, w)


def test_mirroring_flips_image_and_labels_together_exactly_on_the_mirror_axes():
    patch = (10, 12, 14)
    params, aug = _augmenter(patch, _preset(mirror=True))
    params = dataclasses.replace(params, mirror_axes=(0, 2))
    aug.params = params
    seen = set()
    for k in range(12):
        batch = _batch(params.initial_patch_size, k=k)
        data, seg = _crop(batch["data"], patch), _crop(batch["seg"], patch)
        out = aug(batch)
        for b in range(2):
            matches = [axes for axes in ((), (0,), (2,), (0, 2))
                       if torch.equal(out["data"][b], data[b].flip([1 + a for a in axes]) if axes else data[b])]
            assert len(matches) == 1, "not an exact flip along the mirror axes"
            axes = matches[0]
            want = seg[b].flip([1 + a for a in axes]) if axes else seg[b]
            assert torch.equal(out["target"][b], want.clamp(min=0).to(torch.int16))
            seen.add(axes)
    assert len(seen) == 4


@pytest.mark.parametrize("patch", [(10, 12, 14), (20, 18)])
def test_rotation_and_scaling_match_a_linear_interpolation_reference(patch):
    params, aug = _augmenter(patch, _preset(p_rotation=1.0, p_scaling=1.0))
    batch = _batch(params.initial_patch_size)
    data = batch["data"].numpy().copy()
    out = aug(batch)["data"].numpy()
    mats, _ = aug._matrices(2, len(patch), _Draws(batch_generator_seed(3, 0)))
    offsets = np.stack(np.meshgrid(*[np.arange(q) - (q - 1) / 2 for q in patch], indexing="ij")).reshape(len(patch), -1)
    centre = np.array([(i - q) // 2 + (q - 1) / 2 for i, q in zip(params.initial_patch_size, patch)])
    for b in range(2):
        coords = mats[b].numpy() @ offsets + centre[:, None]
        for c in range(2):
            want = map_coordinates(data[b, c], coords, order=1, mode="constant", cval=0.0).reshape(patch)
            np.testing.assert_allclose(out[b, c], want, atol=2e-3)
    assert not np.allclose(out, _crop(batch["data"], patch).numpy())


@pytest.mark.parametrize("patch", [(10, 12, 14), (4, 24, 24), (20, 18)])
@pytest.mark.parametrize("order_seg", [0, 1])
def test_no_new_label_values_ever(patch, order_seg):
    preset = dataclasses.replace(nnunet(order_seg=order_seg), p_rotation=0.7, p_scaling=0.7)
    params, aug = _augmenter(patch, preset, mask_channels=[0])
    assert aug.params.dummy_2d == (patch == (4, 24, 24))
    for k in range(4):
        batch = _batch(params.initial_patch_size, labels=(0, 2, 5), k=k)
        out = aug(batch)
        assert set(torch.unique(out["target"]).tolist()) <= {0, 2, 5}
        assert out["data"].shape == (2, 2, *patch) and bool(torch.isfinite(out["data"]).all())


def test_application_probabilities_follow_the_preset():
    """Rotation/scaling, brightness and mirroring are applied at the preset's rates (seeded, so exact reruns)."""
    params, aug = _augmenter((8, 8, 8), dataclasses.replace(nnunet(), p_brightness=0.5))
    n = 4000
    draws = _Draws(7)
    _, ident = aug._matrices(n, 3, draws)
    assert abs(float(ident.double().mean()) - 0.8 * 0.8) < 0.03
    flips = draws.chance((n, 3), 0.5)
    assert abs(float(flips.double().mean()) - 0.5) < 0.02
    params, aug = _augmenter((6, 6, 6), _preset(p_brightness=0.15, brightness_range=(2.0, 2.0)))
    applied = 0
    for k in range(150):
        batch = _batch(params.initial_patch_size, b=4, c=1, k=k)
        before = _crop(batch["data"], (6, 6, 6)).clone()
        out = aug(batch)["data"]
        applied += sum(bool(torch.allclose(out[b], 2 * before[b])) for b in range(4))
    assert abs(applied / 600 - 0.15) < 0.05


def test_a_batch_is_a_function_of_seed_and_index():
    params, aug = _augmenter((10, 12, 14), nnunet(), regions=BRATS_REGIONS)
    a, b, c = (aug(_batch(params.initial_patch_size, k=k)) for k in (5, 5, 6))
    assert torch.equal(a["data"], b["data"]) and torch.equal(a["target"], b["target"])
    assert not torch.equal(a["data"], c["data"])


def test_it_is_the_default_and_what_it_cannot_do_runs_on_the_cpu_workers():
    assert AUGMENTATIONS["nnunet"] is AUGMENTATIONS["nnunet_torch"]  # the former name stays accepted
    assert nnunet().on_device and not nnunet_cpu().on_device
    assert nnunet(order_data=3) == nnunet_cpu()  # cubic or elastic: nnunet_cpu's pipeline
    assert nnunet(elastic=True) == nnunet_cpu(elastic=True, order_data=1)
    with pytest.raises(TrainingConfigError, match="nnunet_cpu"):
        dataclasses.replace(nnunet(), elastic=True)
