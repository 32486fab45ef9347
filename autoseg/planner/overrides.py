"""Plan overrides: set a configuration's spacing, patch, batch or training length by hand after planning, and derive
again, with the planner's own rules, everything that depends on them.

Syntax: ``CONFIGURATION.KEY=VALUE`` (``autoseg plan --set``, repeatable), or a mapping ``{"3d_fullres.batch_size": 4}``
or ``{"3d_fullres": {"batch_size": 4}}``; several values are separated by commas (or ``x``).

    >>> [o.text for o in parse_overrides(["3d_fullres.patch_size=96,160,160", "2d.batch_size=24"])]
    ['3d_fullres.patch_size=96,160,160', '2d.batch_size=24']

Keys and what each one re-derives:

- ``spacing`` (positive numbers, one per axis of the configuration, in the plans' axis order): the median shape at
  that spacing (from the fingerprint), then the patch, topology, estimate and batch fitted again as planning does
  (unless ``patch_size``/``batch_size`` are given too). An anisotropic spacing gets the planned separate-z resampling
  rule and the pooling layout's 1-kernels on the coarse axis. For ``3d_fullres`` the whole 3D block is planned again
  at that spacing, so ``3d_lowres``/``3d_cascade_fullres`` stay consistent with it (they may appear or disappear);
  ``3d_cascade_fullres.spacing`` is refused (that stage shares 3d_fullres's data).
- ``patch_size`` (whole numbers, one per axis): the pooling layout, topology (with the recipe's network) and memory
  estimate for it; it must be divisible by the pooling of each axis and meet the network's input constraint. The
  batch size follows by the planner's rule unless ``batch_size`` is given.
- ``batch_size`` (a whole number >= 1).
- ``num_epochs``, ``iterations_per_epoch``, ``val_iterations`` (whole numbers >= 1).

An estimate over the memory budget is allowed and stated as a warning among the configuration's decisions
(:func:`override_warnings`); every invalid override raises a :class:`~autoseg.errors.PlanningError` of one line naming
the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from autoseg.errors import PlanningError
from autoseg.fingerprint.model import DatasetFingerprint
from autoseg.networks.parts import NetworkPart, get_network_part
from autoseg.planner.override_syntax import (
    _TRAINING_LENGTH,
    CONFIGURATIONS,
    DECISION_PREFIX,
    WARNING,
    Override,
    OverrideInput,
    _did_you_mean,
    parse_overrides,
)
from autoseg.planner.patch import fit_patch, memory_budget, topology_for
from autoseg.planner.planner import plan_3d
from autoseg.planner.plans import ConfigurationPlan, Plans
from autoseg.planner.presets import PlannerPreset, get_preset
from autoseg.planner.recipe import default_recipe
from autoseg.planner.resampling import separate_z_axis
from autoseg.planner.spacing import ANISOTROPY_THRESHOLD, median_resampled_shape
from autoseg.planner.topology import pooling_layout


#: the configurations the planner can make, in their planned order
@dataclass(frozen=True)
class _Context:
    """What re-deriving needs besides the configuration: the plans, the fingerprint and the planner constants."""

    plans: Plans
    fingerprint: DatasetFingerprint
    preset: PlannerPreset

    @property
    def num_classes(self) -> int:
        return len(self.fingerprint.labels)

    def network(self, config: ConfigurationPlan) -> tuple[NetworkPart, str]:
        """The configuration's network part (its cost model and input constraint) and name."""
        recipe = config.recipe or default_recipe(block=config.topology.block, regions=self.plans.has_regions)
        net = recipe.network
        return get_network_part(net.name, net.params, origin=net.origin), net.name

    def fit_kw(self, config: ConfigurationPlan) -> dict[str, Any]:
        """The :func:`fit_patch` keywords the planner used."""
        network, name = self.network(config)
        return {"preset": self.preset, "gpu_memory_gb": self.plans.gpu_memory_gb, "num_classes": self.num_classes,
                "network": network, "network_name": name}

    def budget(self, ndim: int) -> float:
        return memory_budget(self.preset, ndim, self.plans.gpu_memory_gb)

    def ref_batch(self, ndim: int) -> int:
        return self.preset.ref_batch_3d if ndim == 3 else self.preset.ref_batch_2d

    def median_shape(self, spacing: Sequence[float]) -> tuple[float, ...]:
        """Median case shape at a (transposed) spacing of 3 axes, or of the last 2 for ``2d``."""
        full = tuple(spacing) if len(spacing) == 3 else (1.0, *spacing)  # per-axis resampling: axis 0 is irrelevant
        target = [full[b] for b in self.plans.transpose_backward]
        fp = self.fingerprint
        median = median_resampled_shape(fp.spacings, fp.shapes_after_crop, target)
        return tuple(float(median[f]) for f in self.plans.transpose_forward)[-len(spacing):]

    def dataset_voxels(self, median: Sequence[float]) -> float:
        """Voxels of the training set at a median shape (``2d``: times the planned 3D median depth, as planned)."""
        depth = 1.0
        if len(median) == 2 and "3d_fullres" in self.plans.configurations:
            depth = self.plans.configurations["3d_fullres"].median_shape[0]
        return float(np.prod(median, dtype=np.float64)) * depth * self.plans.num_training


def apply_overrides(plans: Plans, fingerprint: DatasetFingerprint, overrides: OverrideInput) -> Plans:
    """Apply overrides to freshly planned plans and derive again what depends on them.

    Args:
        plans: the plans :func:`~autoseg.planner.planner.plan_experiment` made from ``fingerprint``.
        fingerprint: the dataset fingerprint (median shapes at a new spacing come from it).
        overrides: see :func:`parse_overrides`.

    Returns:
        The plans with the overrides applied, recorded in each changed configuration's ``overrides`` and explained in
        its decisions; ``plans`` itself when there are none.

    Raises:
        PlanningError: an invalid override (one line naming the key, the value and the fix).

    Example:
        >>> plans = apply_overrides(plans, fp, ["3d_fullres.patch_size=96,160,160"])  # doctest: +SKIP
    """
    parsed = parse_overrides(overrides)
    if not parsed:
        return plans
    by_config: dict[str, dict[str, Override]] = {}
    for o in parsed:
        if o.configuration not in plans.configurations:
            raise o.error(f"the plans of {plans.dataset_name!r} have no {o.configuration!r} configuration"
                          f"{_did_you_mean(o.configuration, list(plans.configurations))}; planned: "
                          f"{', '.join(plans.configurations)}.")
        if o.configuration == "3d_cascade_fullres" and o.key == "spacing":
            raise o.error("3d_cascade_fullres uses 3d_fullres's spacing and preprocessed data; set "
                          "3d_fullres.spacing instead (the cascade is then planned again with it).")
        by_config.setdefault(o.configuration, {})[o.key] = o
    ctx = _Context(plans, fingerprint, get_preset(plans.preset))
    configs, decisions = dict(plans.configurations), list(plans.decisions)
    respaced = by_config.get("3d_fullres", {}).get("spacing")
    if respaced is not None:
        configs, note = _replan_3d(configs, respaced, ctx)
        decisions.append(note)
    for name in [n for n in CONFIGURATIONS if n in by_config]:
        items = by_config[name]
        if name not in configs:
            raise next(iter(items.values())).error(
                f"{name} is no longer planned after {respaced.text if respaced else 'the overrides'}; drop this "
                "override or choose another spacing.")
        configs[name] = _apply(configs[name], items, ctx, replanned=name == "3d_fullres" and respaced is not None)
    order = [n for n in CONFIGURATIONS if n in configs] + [n for n in configs if n not in CONFIGURATIONS]
    return dataclasses.replace(plans, configurations={n: configs[n] for n in order}, decisions=tuple(decisions))


def override_warnings(plans: Plans) -> list[str]:
    """The warnings among the decisions overrides added (e.g. a memory overshoot), each ``CONFIGURATION: text``."""
    return [f"{c.name}: {d[len(WARNING):]}" for c in plans.configurations.values() for d in c.decisions
            if d.startswith(WARNING)]


def _apply(config: ConfigurationPlan, items: dict[str, Override], ctx: _Context, *,
           replanned: bool) -> ConfigurationPlan:
    """One configuration's overrides, in dependency order: spacing, patch, batch, training length."""
    notes = [f"set by hand after planning: {', '.join(o.text.partition('.')[2] for o in items.values())}"]
    if "spacing" in items and not replanned:
        config, more = _respace(config, items["spacing"], ctx, refit="patch_size" not in items)
        notes += more
    if "patch_size" in items:
        config, more = _repatch(config, items["patch_size"], ctx, rebatch="batch_size" not in items)
        notes += more
    if "batch_size" in items:
        batch = int(items["batch_size"].value)  # type: ignore[arg-type]
        notes.append(f"batch size {batch} instead of {config.batch_size}")
        config = dataclasses.replace(config, batch_size=batch)
    for key in _TRAINING_LENGTH:
        if key in items:
            notes.append(f"{key} {items[key].value} instead of {getattr(config, key)}")
            config = dataclasses.replace(config, **{key: items[key].value})
    if {"spacing", "patch_size", "batch_size"} & set(items):
        notes.append(_memory_note(config, ctx))
    recorded = {**config.overrides, **{k: o.json_value() for k, o in items.items()}}
    lines = tuple(n if n.startswith(DECISION_PREFIX) else DECISION_PREFIX + n for n in notes)
    # planned again at the new spacing: the decisions are current, so what was set comes first
    decisions = (lines[0], *config.decisions, *lines[1:]) if replanned else config.decisions + lines
    return dataclasses.replace(config, overrides=recorded, decisions=decisions)


def _per_axis(o: Override, config: ConfigurationPlan) -> tuple[Any, ...]:
    """The override's per-axis value, checked to have one value per axis of the configuration."""
    value = o.value if isinstance(o.value, tuple) else (o.value,)
    if len(value) != config.ndim:
        current = ",".join(f"{v:g}" for v in getattr(config, o.key))
        raise o.error(f"{config.name} has {config.ndim} axes, so {o.key} needs {config.ndim} values, not "
                      f"{len(value)}; e.g. {config.name}.{o.key}={current}.")
    return value


def _fmt(values: Sequence[float]) -> str:
    return "x".join(f"{float(v):.4g}" for v in values)


def _fmt_list(values: Sequence[Sequence[int]]) -> str:
    return "[" + ", ".join("(" + ",".join(map(str, v)) + ")" for v in values) + "]"


def _respace(config: ConfigurationPlan, o: Override, ctx: _Context, *,
             refit: bool) -> tuple[ConfigurationPlan, list[str]]:
    """A new spacing: the median shape at it, and (``refit``) the patch, topology and batch fitted as planned."""
    spacing = tuple(float(v) for v in _per_axis(o, config))
    median = ctx.median_shape(spacing)
    notes = [f"spacing {_fmt(spacing)} instead of {_fmt(config.spacing)}: median shape {_fmt(median)} at it",
             *_anisotropy_notes(config.spacing, spacing, ctx.plans)]
    config = dataclasses.replace(config, spacing=spacing, median_shape=median)
    if not refit:
        return config, notes
    fit = fit_patch(spacing, median, dataset_voxels=ctx.dataset_voxels(median), **ctx.fit_kw(config))
    notes += [f"at that spacing, {d}" for d in fit.decisions(ctx.preset)]
    return dataclasses.replace(config, patch_size=fit.patch_size, topology=fit.topology, batch_size=fit.batch_size,
                               estimated_feature_map_elements=fit.estimate, memory_budget=fit.budget), notes


def _anisotropy_notes(old: Sequence[float], new: Sequence[float], plans: Plans) -> list[str]:
    """The planned resampling rule (an axis > 3x the finest is resampled on its own, order 0) for a median case at
    the new spacing, and a note when the coarsest axis is no longer the first one."""
    median_case = plans.original_median_spacing[-len(new):]
    axis, before = separate_z_axis(median_case, new), separate_z_axis(median_case, old)
    notes = []
    if axis is not None:
        notes.append(f"spacing {_fmt(new)} is anisotropic (max/min {max(new) / min(new):.3g} > "
                     f"{ANISOTROPY_THRESHOLD:g}): as planned, a median case is resampled to it along axis {axis} "
                     "separately, with order 0 (the pooling keeps 1-kernels on that axis until it is fine enough)")
    elif before is not None:
        notes.append(f"spacing {_fmt(new)} is not anisotropic (max/min <= {ANISOTROPY_THRESHOLD:g}): a median case "
                     f"is no longer resampled along axis {before} separately")
    if len(new) == 3 and max(new) > new[0]:
        notes.append(f"axis {int(np.argmax(new))} is now the coarsest; the plans keep the axis order "
                     f"{plans.transpose_forward} chosen for the planned spacing (coarsest first)")
    return notes


def _repatch(config: ConfigurationPlan, o: Override, ctx: _Context, *,
             rebatch: bool) -> tuple[ConfigurationPlan, list[str]]:
    """A new patch: checked against the pooling and the network; topology, estimate (and batch) derived for it."""
    patch = tuple(int(v) for v in _per_axis(o, config))
    network, name = ctx.network(config)
    problems = _divisibility(config.spacing, patch, network, name)
    if problems:
        raise o.error("; ".join(problems) + ".")
    try:
        topology = network.topology(topology_for(pooling_layout(config.spacing, patch), ctx.preset))
    except PlanningError as err:
        raise o.error(f"{err} Choose a smaller patch.") from None
    estimate = network.feature_map_elements(topology, patch, num_classes=ctx.num_classes)
    t = topology
    notes = [f"patch {_fmt(patch)} instead of {_fmt(config.patch_size)}: {t.n_stages} stages, strides "
             f"{_fmt_list(t.strides[1:])}, kernels {_fmt_list(t.kernel_sizes)}, features "
             f"{_fmt(t.features_per_stage)}; estimate {estimate:,} elements per sample"]
    config = dataclasses.replace(config, patch_size=patch, topology=topology, estimated_feature_map_elements=estimate,
                                 memory_budget=ctx.budget(config.ndim))
    if rebatch:
        batch, why = _batch_rule(config, ctx)
        notes.append(f"batch size {batch} instead of {config.batch_size}, by the planner's rule ({why})")
        config = dataclasses.replace(config, batch_size=batch)
    return config, notes


def _divisibility(spacing: Sequence[float], patch: tuple[int, ...], network: NetworkPart, name: str) -> list[str]:
    """One problem per axis whose size the pooling (or the network's input constraint) does not allow, with the
    nearest sizes that it does; empty when the patch is valid."""
    layout = pooling_layout(spacing, patch)
    fitted = network.fit_patch(patch)
    problems = []
    for axis, size in enumerate(patch):
        if layout.patch_size[axis] != size:
            d = layout.divisible_by[axis]
            why = f"size {size} is not divisible by {d} (the network pools that axis {d.bit_length() - 1} times)"
        elif fitted[axis] != size:
            why = f"size {size} does not meet network {name}'s input constraint (it would take {fitted[axis]})"
        else:
            continue
        near = " or ".join(str(v) for v in _nearest_valid(spacing, patch, axis, network)) or "none nearby"
        problems.append(f"axis {axis} {why}; nearest valid sizes {near}")
    return problems


def _nearest_valid(spacing: Sequence[float], patch: tuple[int, ...], axis: int, network: NetworkPart) -> list[int]:
    """The nearest sizes of ``axis`` below and above ``patch[axis]`` that pooling and network allow there."""
    def ok(size: int) -> bool:
        trial = patch[:axis] + (size,) + patch[axis + 1:]
        return (pooling_layout(spacing, trial).patch_size[axis] == size
                and network.fit_patch(trial)[axis] == size)

    size = patch[axis]
    below = next((s for s in range(size - 1, 0, -1) if ok(s)), None)
    above = next((s for s in range(size + 1, 4 * size + 64) if ok(s)), None)
    return [s for s in (below, above) if s is not None]


def _batch_rule(config: ConfigurationPlan, ctx: _Context) -> tuple[int, str]:
    """The planner's batch rule (:func:`~autoseg.planner.patch.fit_patch`) for the configuration's patch and
    estimate: what the memory allows, capped by the dataset share, at least the preset's minimum."""
    pr, ref_bs = ctx.preset, ctx.ref_batch(config.ndim)
    from_memory = round(ctx.budget(config.ndim) / config.estimated_feature_map_elements * ref_bs)
    cap = round(ctx.dataset_voxels(config.median_shape) * pr.max_dataset_covered
                / math.prod(float(p) for p in config.patch_size))
    batch = max(min(from_memory, cap), pr.min_batch_size)
    cap_text = "no dataset cap" if pr.max_dataset_covered >= 1 else f"{pr.max_dataset_covered:.0%} dataset cap {cap}"
    return batch, f"memory allows {from_memory}, {cap_text}, minimum {pr.min_batch_size}"


def _memory_note(config: ConfigurationPlan, ctx: _Context) -> str:
    """The memory estimate of the patch at the batch against the budget; a warning when it is over."""
    budget, ref_bs = ctx.budget(config.ndim), ctx.ref_batch(config.ndim)
    used = config.estimated_feature_map_elements * config.batch_size / ref_bs
    ratio = used / budget
    what = f"patch {_fmt(config.patch_size)} at batch {config.batch_size}"
    gb = f"{ctx.plans.gpu_memory_gb:g} GB"
    if ratio > 1:
        return (f"{WARNING}{what} is {ratio:.1f}x the memory budget of {gb} ({used:.4g} > {budget:.4g} feature-map "
                f"elements); training may run out of memory: use a smaller patch or batch, or plan with a larger "
                "--gpu-memory")
    return f"{what} uses {ratio:.0%} of the memory budget of {gb} ({used:.4g} of {budget:.4g} feature-map elements)"


def _replan_3d(configs: dict[str, ConfigurationPlan], o: Override, ctx: _Context
               ) -> tuple[dict[str, ConfigurationPlan], str]:
    """``3d_fullres.spacing``: the 3D block planned again at that spacing with the planner's rules (the cascade
    stages included, so they cannot fall out of step); returns the configurations and a dataset-level decision."""
    old = configs["3d_fullres"]
    spacing = tuple(float(v) for v in _per_axis(o, old))
    median = ctx.median_shape(spacing)
    planned, why = plan_3d(np.asarray(spacing), np.asarray(median), old.normalization, ctx.fit_kw(old),
                            n_vox=ctx.dataset_voxels(median), num_training=ctx.plans.num_training)
    if "3d_fullres" not in planned:
        raise o.error(f"at that spacing the median image is {_fmt(median)} voxels, no longer 3D; choose a finer "
                      "spacing along axis 0.")
    head = (f"{DECISION_PREFIX}spacing {_fmt(spacing)} instead of {_fmt(old.spacing)}; the decisions below are "
            "those of planning at it",
            *(DECISION_PREFIX + n for n in _anisotropy_notes(old.spacing, spacing, ctx.plans)))
    kept = {k: v for k, v in configs.items() if not k.startswith("3d_")}
    for name, config in planned.items():
        extra = head if name == "3d_fullres" else (f"{DECISION_PREFIX}planned again with 3d_fullres at {o.text}",)
        kept[name] = dataclasses.replace(config, recipe=old.recipe, decisions=extra + config.decisions)
    gone = [n for n in configs if n.startswith("3d_") and n not in planned]
    note = (f"override {o.text}: the 3D configurations were planned again at that spacing (median shape "
            f"{_fmt(median)}): {'; '.join(why) or 'no change to the cascade'}"
            + (f"; {', '.join(gone)} no longer planned" if gone else "") + "; 2d keeps its planned spacing")
    return kept, note
