"""The contract every augmentation part keeps."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from autoseg.registry import PluginInfo
from autoseg.training.augmentation import AugmentationParams, augmentation_params, training_transforms
from autoseg.training.augmentation_presets import AugmentationPreset
from autoseg.training.batch_augment import BatchAugmenter
from autoseg.training.contracts.common import SEED, _created, _ndims, _require

# ---- augmentations ----------------------------------------------------------------------------------------
#: patches augmentations are checked on: 2D, 3D and a dummy-2D 3D one (augmented slice by slice)
AUGMENTATION_PATCHES = {2: ((24, 24),), 3: ((16, 16, 16), (4, 16, 16))}
AUGMENTATION_LABELS = (0, 1, 3)  # no 2: an interpolated in-between label would show
AUGMENTATION_BATCH, AUGMENTATION_SEEDS = 4, (0, 1, 2)


def _synthetic_batch(shape: Sequence[int], seed: int = SEED) -> dict[str, np.ndarray]:
    """A loader's batch: 2-channel images following a blob label map of :data:`AUGMENTATION_LABELS`, seg -1 on a
    border slab (outside the imaged region)."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    seg = np.zeros((AUGMENTATION_BATCH, 1, *shape), dtype=np.int16)
    for b in range(AUGMENTATION_BATCH):
        centre = rng.uniform(-0.3, 0.3, len(shape))
        radius = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
        seg[b, 0][radius < 0.7] = AUGMENTATION_LABELS[1]
        seg[b, 0][radius < 0.35] = AUGMENTATION_LABELS[2]
        seg[b, 0, -2:] = -1
    data = np.concatenate([seg * 1.0, -seg * 0.5], 1) + rng.normal(0, 0.1, (AUGMENTATION_BATCH, 2, *shape))
    return {"data": data.astype(np.float32), "seg": seg}


def _augmented(pipeline: Any, batch: Mapping[str, np.ndarray], seed: int) -> dict[str, Any]:
    """The pipeline's output for a copy of ``batch`` at numpy seed ``seed``; Python's and torch's generators are
    moved to other states first, so a step drawing from them shows as non-deterministic."""
    random.seed(seed + 101)
    torch.manual_seed(seed + 202)
    np.random.seed(seed)
    return pipeline(**{k: v.copy() for k, v in batch.items()})


def _check_augmented(where: str, out: Mapping[str, Any], batch: Mapping[str, np.ndarray], patch: tuple[int, ...]
                     ) -> None:
    data, target = out.get("data"), out.get("target")
    _require(isinstance(data, torch.Tensor) and isinstance(target, torch.Tensor), where,
             f"the pipeline must give torch tensors data and target; got {type(data).__name__}, "
             f"{type(target).__name__}")
    want_data, want_target = (AUGMENTATION_BATCH, batch["data"].shape[1], *patch), (AUGMENTATION_BATCH, 1, *patch)
    _require(tuple(data.shape) == want_data and tuple(target.shape) == want_target, where,
             f"data {tuple(data.shape)} and target {tuple(target.shape)}; expected {want_data} and {want_target} "
             "(the network patch)")
    _require(bool(torch.isfinite(data).all()), where, "the augmented data holds non-finite values")
    allowed = {max(0, int(v)) for v in np.unique(batch["seg"])}
    new = sorted(set(torch.unique(target).tolist()) - allowed)
    _require(not new, where, f"the target holds label values {new} the input did not have ({sorted(allowed)})")


def _pipeline(aug: AugmentationParams, preset: AugmentationPreset) -> Callable[..., dict[str, Any]]:
    """``pipeline(**batch)``: the worker pipeline, or for an on-device preset the batch augmenter on the CPU with its
    seed drawn from ``numpy.random`` (so the same numpy seed gives the same batch there too)."""
    if not preset.on_device:
        return training_transforms(aug, label_values=AUGMENTATION_LABELS, regions=None, ignore_label=None,
                                   ds_scales=None, preset=preset)
    augmenter = BatchAugmenter(aug, preset, regions=None, ignore_label=None, ds_scales=None)

    def on_device(**batch: np.ndarray) -> dict[str, Any]:
        return augmenter({"data": torch.from_numpy(batch["data"]), "seg": torch.from_numpy(batch["seg"]),
                          "seed": int(np.random.randint(2**31)), "batch_index": 0})
    return on_device


def _augmentation_preset(name_or_factory: Any, params: Mapping[str, Any] | None) -> tuple[str, AugmentationPreset]:
    label, made = _created("augmentation", name_or_factory, params)
    preset = made if isinstance(made, AugmentationPreset) else made() if callable(made) else made
    _require(isinstance(preset, AugmentationPreset), f"augmentation {label!r}",
             f"the factory gave a {type(preset).__name__}, not an AugmentationPreset")
    return label, preset


def check_augmentation(name_or_factory: str | PluginInfo | Callable[[], AugmentationPreset] | AugmentationPreset, *,
                       params: Mapping[str, Any] | None = None, ndims: Iterable[int] = (2, 3)) -> None:
    """Check an augmentation part: the pipeline of ``training_transforms(augmentation_params(patch), ...,
    preset=...)`` (for an ``on_device`` preset the :class:`~autoseg.training.batch_augment.BatchAugmenter`) (label training, no ignore label, no deep supervision) on a synthetic batch of 4 samples with
    labels 0, 1, 3 and a -1 border, for the patches of :data:`AUGMENTATION_PATCHES` (2D, 3D, dummy 2D), at three
    numpy seeds: data and target have the patch's shape and are torch tensors, the data is finite, the target holds
    no label value the input did not have, and the same numpy seed gives the same batch (with Python's and torch's
    generators in other states).

    Args:
        name_or_factory: a registered augmentation's name, a :class:`PluginInfo` of kind ``augmentation``, a factory
            ``f() -> AugmentationPreset`` or a preset.
        params: the part's parameters (with a name or PluginInfo).
        ndims: the dimensionalities to check.

    Raises:
        AssertionError: the part breaks the contract (the message names it, the patch and what failed).
    """
    label, preset = _augmentation_preset(name_or_factory, params)
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        for patch in (p for nd in _ndims(ndims) for p in AUGMENTATION_PATCHES[nd]):
            where = f"augmentation {label!r} (patch {patch})"
            aug = augmentation_params(patch)
            pipeline = _pipeline(aug, preset)
            batch = _synthetic_batch(aug.initial_patch_size)
            outs = [_augmented(pipeline, batch, seed) for seed in AUGMENTATION_SEEDS]
            for out in outs:
                _check_augmented(where, out, batch, patch)
            again = _augmented(pipeline, batch, AUGMENTATION_SEEDS[0])
            _require(all(torch.equal(outs[0][k], again[k]) for k in ("data", "target")), where,
                     f"numpy seed {AUGMENTATION_SEEDS[0]} gives a different batch the second time (randomness not "
                     "from numpy.random?)")
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
