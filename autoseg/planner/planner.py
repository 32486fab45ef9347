"""Entry point: a dataset fingerprint (+ memory target and preset) -> :class:`Plans`.

Follows nnU-Net v2's ``ExperimentPlanner.plan_experiment``: fullres target spacing and transpose, the
``3d_fullres`` configuration for 3D data, ``3d_lowres`` + ``3d_cascade_fullres`` when the fullres patch
covers less than 25 % of the median image, and ``2d`` always.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import replace as _replace
from typing import Any

import numpy as np

from autoseg.errors import PlanningError
from autoseg.fingerprint.model import DatasetFingerprint
from autoseg.networks.parts import get_network_part
from autoseg.planner.normalization import MASK_FOR_NORM_THRESHOLD, ChannelNormalization, plan_normalization
from autoseg.planner.patch import PatchPlan, fit_patch
from autoseg.planner.plans import ConfigurationPlan, Plans
from autoseg.planner.presets import PlannerPreset, get_preset
from autoseg.planner.recipe import PART_KINDS, Recipe, default_recipe, has_regions
from autoseg.planner.resampling import ResamplingPlan
from autoseg.planner.spacing import (
    TargetSpacing,
    Transpose,
    fullres_target_spacing,
    median_resampled_shape,
    transpose_for,
)

LOWRES_THRESHOLD = 0.25
LOWRES_SPACING_STEP = 1.03
LOWRES_MIN_SIZE_RATIO = 2.0
_MAX_LOWRES_STEPS = 2000

#: A 3d_lowres search result: (spacing, median shape, patch fit, median voxels, steps).
_Lowres = tuple[np.ndarray, tuple[float, ...], PatchPlan, float, int]


def _fmt(v: Sequence[float], digits: int = 4) -> str:
    return "x".join(f"{float(x):.{digits}g}" for x in v)


def _configuration(name: str, data_identifier: str, spacing: Sequence[float], median: Sequence[float],
                   fit: PatchPlan, preset: PlannerPreset, norm: tuple[ChannelNormalization, ...],
                   batch_dice: bool, extra: Sequence[str] = ()) -> ConfigurationPlan:
    decisions = [f"spacing {_fmt(spacing)}, median shape {_fmt(median)}", *extra, *fit.decisions(preset)]
    decisions.append(f"batch_dice={batch_dice}")
    return ConfigurationPlan(
        name=name, data_identifier=data_identifier, spacing=tuple(float(s) for s in spacing),
        median_shape=tuple(float(m) for m in median), patch_size=fit.patch_size, batch_size=fit.batch_size,
        topology=fit.topology, normalization=norm, resampling=ResamplingPlan(), batch_dice=batch_dice,
        estimated_feature_map_elements=fit.estimate, memory_budget=fit.budget, decisions=tuple(decisions),
        num_epochs=preset.num_epochs, iterations_per_epoch=preset.iterations_per_epoch,
        val_iterations=preset.val_iterations)


def _check_fingerprint(fp: DatasetFingerprint) -> None:
    if not fp.cases:
        raise PlanningError(f"fingerprint of {fp.dataset_name!r} has no cases; add labelled cases to imagesTr/"
                            "labelsTr and recompute it.")
    if fp.num_training < 1:
        raise PlanningError(f"fingerprint of {fp.dataset_name!r}: num_training={fp.num_training}; it must be >= 1 "
                            "(check numTraining in dataset.json).")
    if not fp.channel_names:
        raise PlanningError(f"fingerprint of {fp.dataset_name!r} has no channel names; fix channel_names in "
                            "dataset.json.")
    dims = {len(c.spacing) for c in fp.cases} | {len(c.shape_after_crop) for c in fp.cases}
    if dims != {3}:
        raise PlanningError(f"fingerprint of {fp.dataset_name!r}: spacings/shapes must have 3 axes (2D data as "
                            f"1 x H x W), found {sorted(dims)}; recompute the fingerprint with this autoseg.")


def _find_lowres(spacing: np.ndarray, median: np.ndarray, fullres: PatchPlan, *, num_training: int,
                 **fit_kw: Any) -> _Lowres | None:
    """Coarsen the spacing by 1.03 per step (only axes finer than half the coarsest, else all) until the
    patch covers 25 % of the median image. Returns (spacing, median, fit, median voxels, steps) or None."""
    median_vox = float(np.prod(median, dtype=np.float64))
    patch_vox = float(math.prod(fullres.patch_size))
    low = spacing.astype(np.float64).copy()
    found = None
    steps = 0
    while patch_vox / median_vox < LOWRES_THRESHOLD:
        steps += 1
        if steps > _MAX_LOWRES_STEPS:
            raise PlanningError(f"3d_lowres search did not converge after {_MAX_LOWRES_STEPS} steps (spacing "
                                f"{_fmt(low)}); report this dataset's fingerprint as a bug.")
        fine = low.max() / low > 2
        if np.any(fine):
            low[fine] *= LOWRES_SPACING_STEP
        else:
            low *= LOWRES_SPACING_STEP
        scaled = spacing / low * median
        median_vox = float(np.prod(scaled, dtype=np.float64))
        low_median = tuple(float(round(v)) for v in scaled)
        fit = fit_patch(low, low_median, dataset_voxels=median_vox * num_training, **fit_kw)
        found = (low.copy(), low_median, fit, median_vox, steps)
        patch_vox = float(math.prod(fit.patch_size))
    return found


def plan_experiment(fingerprint: DatasetFingerprint, *, gpu_memory_gb: float = 8.0, preset: str = "default",
                    seed: int = 12345, recipe: Recipe | None = None) -> Plans:
    """Derive every configuration of a dataset from its fingerprint.

    Args:
        fingerprint: the dataset fingerprint (spacings and shapes in ``z, y, x`` order).
        gpu_memory_gb: memory the configurations are sized for; scales the preset's reference budget.
        preset: ``default`` (nnU-Net v2), ``resenc_m``, ``resenc_l`` or ``cpu``.
        seed: recorded in the plans; all later randomness flows from it.
        recipe: the training recipe, its parts checked (default: :func:`~autoseg.planner.recipe.default_recipe` of
            the preset and the labels); its network's cost model sizes the patches and batches.

    Returns:
        The plans (``2d`` always; ``3d_fullres`` for 3D data; ``3d_lowres`` and ``3d_cascade_fullres`` when
        the fullres patch covers less than a quarter of the median image).

    Raises:
        PlanningError: unknown preset (with a suggestion), invalid memory target, or an unusable fingerprint.

    Example:
        >>> plans = plan_experiment(fp, preset="cpu")          # doctest: +SKIP
        >>> print(plans.summary_table())                       # doctest: +SKIP
    """
    pr = get_preset(preset)
    if not (isinstance(gpu_memory_gb, int | float) and gpu_memory_gb > 0):
        raise PlanningError(f"gpu_memory_gb={gpu_memory_gb!r} must be a number > 0 (e.g. 8 for an 8 GB GPU).")
    _check_fingerprint(fingerprint)
    spacings, shapes = fingerprint.spacings, fingerprint.shapes_after_crop
    target = fullres_target_spacing(spacings, shapes)
    tr = transpose_for(target.spacing)
    fwd = list(tr.forward)
    spacing_t = np.asarray(target.spacing, dtype=np.float64)[fwd]
    median_t = np.asarray(median_resampled_shape(spacings, shapes, target.spacing), dtype=np.float64)[fwd]
    n_vox = float(np.prod(median_t, dtype=np.float64) * fingerprint.num_training)
    num_classes = len(fingerprint.labels)
    norm = plan_normalization(fingerprint.channel_names, fingerprint.intensity,
                              fingerprint.median_relative_size_after_cropping)
    regions = has_regions(fingerprint.labels)
    recipe = recipe or default_recipe(block=pr.block, regions=regions)
    network = get_network_part(recipe.network.name, recipe.network.params, origin=recipe.network.origin)
    kw = {"preset": pr, "gpu_memory_gb": float(gpu_memory_gb), "num_classes": num_classes, "network": network,
          "network_name": recipe.network.name}

    decisions = _dataset_decisions(pr, target, tr, median_t, norm, fingerprint.median_relative_size_after_cropping)
    default = default_recipe(block=pr.block, regions=regions)
    if recipe.mirror_axes != default.mirror_axes or any(recipe.part(k).name != default.part(k).name
                                                        for k in PART_KINDS):
        decisions.append(f"recipe {recipe.describe()}")
    configs, decisions_3d = plan_3d(spacing_t, median_t, norm, kw, n_vox=n_vox,
                                     num_training=fingerprint.num_training)
    decisions += decisions_3d
    fit2d = fit_patch(spacing_t[1:], median_t[1:], dataset_voxels=n_vox, **kw)
    configs["2d"] = _configuration("2d", "2d", spacing_t[1:], median_t[1:], fit2d, pr, norm, batch_dice=True,
                                   extra=["in-plane spacing of 3d_fullres; each slice keeps its out-of-plane spacing"])
    order = ["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"]
    configs = {k: dataclasses.replace(configs[k], recipe=recipe) for k in order if k in configs}
    return Plans(
        dataset_name=fingerprint.dataset_name, preset=pr.name, gpu_memory_gb=float(gpu_memory_gb), seed=int(seed),
        channel_names=tuple(fingerprint.channel_names), labels=dict(fingerprint.labels),
        num_training=fingerprint.num_training, transpose_forward=tr.forward, transpose_backward=tr.backward,
        original_median_spacing=tuple(float(v) for v in np.median(spacings, 0)[fwd]),
        original_median_shape=tuple(float(v) for v in np.median(shapes, 0)[fwd]),
        configurations=configs, decisions=tuple(decisions), dataset_signature=fingerprint.dataset_signature)


def _dataset_decisions(pr: PlannerPreset, target: TargetSpacing, tr: Transpose, median_t: np.ndarray,
                       norm: tuple[ChannelNormalization, ...], crop: float) -> list[str]:
    """The dataset-wide decisions, in ``Plans.explain()`` order: preset, target spacing, axis order, median
    shape, each channel's normalisation and the resampling orders."""
    decisions = [f"preset {pr.name!r}: {pr.description}",
                 f"target spacing {_fmt(target.spacing)} (z,y,x): {target.reason}",
                 f"axis order {tr.forward} (coarsest target spacing first; the 2d configuration uses the last two)",
                 f"median shape at the target spacing {_fmt(median_t)} (transposed)"]
    for n in norm:
        why = (f"inside the nonzero mask (cropping keeps {crop:.0%} < {MASK_FOR_NORM_THRESHOLD:.0%} of a median case)"
               if n.use_mask else "over the whole image")
        decisions.append(f"channel {n.channel!r}: {n.scheme} normalisation"
                         + (f", {why}" if n.scheme == "zscore" else ""))
    decisions.append("resampling: images order 3, segmentations order 1, probabilities order 1; an axis whose "
                     "spacing is > 3x the finest is resampled separately with order 0")
    return decisions


def plan_3d(spacing_t: np.ndarray, median_t: np.ndarray, norm: tuple[ChannelNormalization, ...],
             kw: dict[str, Any], *, n_vox: float, num_training: int
             ) -> tuple[dict[str, ConfigurationPlan], list[str]]:
    """The 3D configurations (``3d_fullres``, plus ``3d_lowres`` and ``3d_cascade_fullres`` when a lowres
    stage is found and kept) and the decisions explaining them; none for 2D data (median size 1 on axis 0).
    ``kw`` holds the :func:`fit_patch` keywords ``preset``, ``gpu_memory_gb`` and ``num_classes``."""
    if median_t[0] == 1:
        return {}, ["no 3D configurations: the data are 2D (median size 1 along the first axis)"]
    pr = kw["preset"]
    full = fit_patch(spacing_t, median_t, dataset_voxels=n_vox, **kw)
    low, decisions = _choose_lowres(spacing_t, median_t, full, kw, num_training=num_training)
    configs = {"3d_fullres": _configuration("3d_fullres", "3d_fullres", spacing_t, median_t, full, pr, norm,
                                            batch_dice=low is not None)}
    if low is not None:
        configs.update(_cascade_configurations(configs["3d_fullres"], low, pr, norm))
    return configs, decisions


def _choose_lowres(spacing_t: np.ndarray, median_t: np.ndarray, full: PatchPlan, kw: dict[str, Any], *,
                   num_training: int) -> tuple[_Lowres | None, list[str]]:
    """Search a 3d_lowres stage when the fullres patch covers less than 25 % of the median image, and drop
    it when its median image is not at least 2x smaller. Returns (:func:`_find_lowres`'s result or None, the
    decision explaining the outcome)."""
    coverage = math.prod(full.patch_size) / float(np.prod(median_t))
    if coverage < LOWRES_THRESHOLD:
        low = _find_lowres(spacing_t, median_t, full, num_training=num_training, **kw)
        if low is not None and float(np.prod(median_t)) / low[3] < LOWRES_MIN_SIZE_RATIO:
            return None, [f"3d_lowres dropped: its median {_fmt(low[1])} is less than "
                          f"{LOWRES_MIN_SIZE_RATIO:g}x smaller than fullres {_fmt(median_t)}"]
        if low is not None:
            return low, [f"3d_lowres + 3d_cascade_fullres: the fullres patch covers {coverage:.1%} < "
                         f"{LOWRES_THRESHOLD:.0%} of the median image; lowres spacing found after "
                         f"{low[4]} steps of x{LOWRES_SPACING_STEP}"]
        return None, []
    return None, [f"no 3d_lowres: the fullres patch covers {coverage:.0%} >= {LOWRES_THRESHOLD:.0%} "
                  "of the median image"]


def _cascade_configurations(fullres: ConfigurationPlan, low: _Lowres, pr: PlannerPreset,
                            norm: tuple[ChannelNormalization, ...]) -> dict[str, ConfigurationPlan]:
    """``3d_lowres`` (first stage) and ``3d_cascade_fullres`` (``3d_fullres`` fed with the lowres predictions)."""
    low_sp, low_median, low_fit, _, _ = low
    lowres = _configuration("3d_lowres", "3d_lowres", low_sp, low_median, low_fit, pr, norm,
                            batch_dice=False, extra=["first stage of the cascade"])
    casc = _replace(fullres, name="3d_cascade_fullres", previous_stage="3d_lowres")
    return {"3d_lowres": _replace(lowres, next_stage="3d_cascade_fullres"),
            "3d_cascade_fullres": _replace(casc, decisions=(
                "as 3d_fullres, with 3d_lowres's predictions as extra input", *casc.decisions))}
