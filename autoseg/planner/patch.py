"""Patch size, network topology and batch size of one configuration (nnU-Net v2's
``get_plans_for_configuration`` rules), against a feature-map memory budget."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autoseg.errors import PlanningError
from autoseg.networks.parts import NetworkPart, UNetPart
from autoseg.networks.topology import UNetTopology
from autoseg.planner.presets import PlannerPreset
from autoseg.planner.topology import PoolingLayout, pooling_layout

INITIAL_PATCH_VOXELS_3D = 256 ** 3
INITIAL_PATCH_PIXELS_2D = 2048 ** 2


@dataclass(frozen=True)
class PatchPlan:
    """Outcome of fitting a patch and batch to the budget.

    Attributes:
        initial_patch_size: 1/spacing patch scaled to 256^3 (2048^2), clipped to the median shape.
        patch_size: final (padded) patch.
        topology: the network for that patch.
        estimate: feature-map elements of one sample (the network part's estimate; the U-Net's by default).
        budget: the reference scaled to the memory target.
        shrink_steps: how often an axis was reduced.
        batch_from_memory: ``round(budget / estimate x ref_batch)``.
        batch_from_dataset_cap: ``round(dataset voxels x max_dataset_covered / patch voxels)``.
        batch_size: ``max(min(both), min_batch_size)``.
        adapted_from: the patch before the network adapted it to its constraints (None: not adapted).
        network_name: the recipe's network, named in the adaptation decision.
    """

    initial_patch_size: tuple[int, ...]
    patch_size: tuple[int, ...]
    topology: UNetTopology
    estimate: int
    budget: float
    shrink_steps: int
    batch_from_memory: int
    batch_from_dataset_cap: int
    batch_size: int
    adapted_from: tuple[int, ...] | None = None
    network_name: str = ""

    def decisions(self, preset: PlannerPreset) -> list[str]:
        """Human-readable account of the patch, shrink and batch decisions."""
        ref_bs = preset.ref_batch_3d if len(self.patch_size) == 3 else preset.ref_batch_2d
        out = [f"initial patch {_fmt(self.initial_patch_size)} (1/spacing scaled to "
               f"{'256^3' if len(self.patch_size) == 3 else '2048^2'}, clipped to the median shape)"]
        if self.shrink_steps:
            out.append(f"patch shrunk {self.shrink_steps} times (largest patch/median axis first) to "
                       f"{_fmt(self.patch_size)} so the network fits the budget of {self.budget:.4g} feature-map "
                       f"elements ({_rule_text(preset, ref_bs)})")
        else:
            out.append(f"patch {_fmt(self.patch_size)} (padded to a multiple of "
                       f"{_fmt(self.topology.divisible_by)}) already fits the budget of {self.budget:.4g}")
        if self.adapted_from is not None:
            out.append(f"network {self.network_name} takes patch {_fmt(self.patch_size)} instead of "
                       f"{_fmt(self.adapted_from)} (its input constraint)")
        out.append(f"{self.topology.n_stages} stages, strides {_fmt_list(self.topology.strides[1:])}, kernels "
                   f"{_fmt_list(self.topology.kernel_sizes)}, features {_fmt(self.topology.features_per_stage)}; "
                   f"estimate {self.estimate:,} elements per sample")
        cap = ("no dataset cap" if preset.max_dataset_covered >= 1
               else f"{preset.max_dataset_covered:.0%} dataset cap {self.batch_from_dataset_cap}")
        out.append(f"batch size {self.batch_size} (memory allows {self.batch_from_memory}, {cap}, "
                   f"minimum {preset.min_batch_size})")
        return out


def _fmt(v: Sequence[float]) -> str:
    return "x".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)


def _fmt_list(vs: Sequence[Sequence[int]]) -> str:
    return "[" + ", ".join("(" + ",".join(map(str, v)) + ")" for v in vs) + "]"


def _rule_text(preset: PlannerPreset, ref_bs: int) -> str:
    if preset.shrink_rule == "min_batch":
        return f"rule: estimate / {ref_bs} x 2 <= budget, i.e. room for batch size 2"
    return "rule: estimate <= budget"


def initial_patch_size(spacing: Sequence[float], median_shape: Sequence[float]) -> tuple[float, ...]:
    """Patch with aspect ratio 1/spacing and 256^3 (3D) or 2048^2 (2D) voxels, rounded, clipped to the median.

    Args:
        spacing: target spacing (2 or 3 axes).
        median_shape: median shape at that spacing (values may end in .5; they are kept when clipping).

    Returns:
        The initial patch (floats only where the median clipped it).

    Raises:
        PlanningError: neither 2 nor 3 axes.
    """
    if len(spacing) not in (2, 3):
        raise PlanningError(f"spacing {tuple(spacing)} has {len(spacing)} axes; plans are 2D or 3D.")
    inv = 1.0 / np.asarray(spacing, dtype=float)
    target = INITIAL_PATCH_VOXELS_3D if len(spacing) == 3 else INITIAL_PATCH_PIXELS_2D
    scaled = inv * (target / np.prod(inv)) ** (1.0 / len(spacing))
    return tuple(min(float(round(float(s))), float(m)) for s, m in zip(scaled, median_shape, strict=True))


def topology_for(layout: PoolingLayout, preset: PlannerPreset) -> UNetTopology:
    """The U-Net of a pooling layout under a preset (features doubling from the base up to the cap).

    Args:
        layout: strides and kernels.
        preset: feature counts and blocks per stage.

    Returns:
        The checked topology.

    Raises:
        PlanningError: the preset's per-stage lists are shorter than the number of stages.
    """
    n = layout.n_stages
    cap = preset.max_features_3d if len(layout.patch_size) == 3 else preset.max_features_2d
    if n > len(preset.n_blocks_encoder) or n - 1 > len(preset.n_conv_decoder):
        raise PlanningError(f"preset {preset.name!r} defines {len(preset.n_blocks_encoder)} encoder stages but the "
                            f"patch {_fmt(layout.patch_size)} needs {n}; extend n_blocks_encoder.")
    return UNetTopology(strides=layout.strides, kernel_sizes=layout.kernel_sizes,
                        features_per_stage=tuple(min(cap, preset.base_features * 2 ** i) for i in range(n)),
                        n_blocks_per_stage=preset.n_blocks_encoder[:n],
                        n_conv_per_stage_decoder=preset.n_conv_decoder[:n - 1], block=preset.block).check()


def memory_budget(preset: PlannerPreset, ndim: int, gpu_memory_gb: float) -> float:
    """The preset's reference scaled to the memory target: ``reference x gpu_memory_gb / reference_gb``.

    Raises:
        PlanningError: a non-positive memory target.
    """
    if not gpu_memory_gb > 0:
        raise PlanningError(f"gpu_memory_gb={gpu_memory_gb!r} must be > 0 (e.g. 8 for an 8 GB GPU).")
    ref = preset.reference_3d if ndim == 3 else preset.reference_2d
    return ref * gpu_memory_gb / preset.reference_gb


def _too_big(estimate: int, budget: float, preset: PlannerPreset, ref_bs: int) -> bool:
    if preset.shrink_rule == "min_batch":
        return estimate / ref_bs * 2 > budget
    return estimate > budget


def fit_patch(spacing: Sequence[float], median_shape: Sequence[float], *, preset: PlannerPreset,
              gpu_memory_gb: float, num_classes: int, dataset_voxels: float, network: NetworkPart | None = None,
              network_name: str = "") -> PatchPlan:
    """Choose patch, topology and batch size of one configuration.

    The initial patch is shrunk one axis at a time (the one largest relative to the median shape) while the
    network is over budget. Each step subtracts the axis' divisibility step, recomputes the divisibility of
    the shorter patch and subtracts that instead (so 224 is reached from 256, not skipped to 192), then
    re-derives the topology. The batch fills the remaining budget, capped so one batch covers at most
    ``max_dataset_covered`` of the dataset, and is at least ``min_batch_size``.

    Args:
        spacing: target spacing (transposed; 2 or 3 axes).
        median_shape: median shape at that spacing.
        preset: planner constants.
        gpu_memory_gb: memory target.
        num_classes: output channels (labels incl. background) for the estimate.
        dataset_voxels: approximate voxels of the whole training set (median voxels x cases).
        network: the recipe's network, whose estimate is the yardstick and whose input constraint the final
            patch obeys (default: the preset's U-Net).
        network_name: its name, for the decisions.

    Returns:
        The patch plan.

    Raises:
        PlanningError: invalid spacing/shape or memory target.
    """
    ndim = len(spacing)
    budget = memory_budget(preset, ndim, gpu_memory_gb)
    ref_bs = preset.ref_batch_3d if ndim == 3 else preset.ref_batch_2d
    median = [float(m) for m in median_shape[:ndim]]
    initial = initial_patch_size(spacing, median)
    layout = pooling_layout(spacing, initial)
    net = network or UNetPart()
    topo = net.topology(topology_for(layout, preset))
    estimate = net.feature_map_elements(topo, layout.patch_size, num_classes=num_classes)
    steps = 0
    while _too_big(estimate, budget, preset, ref_bs):
        patch = list(layout.patch_size)
        ratios = [p / m for p, m in zip(patch, median, strict=True)]
        axis = max(i for i, r in enumerate(ratios) if r == max(ratios))  # ties: the last such axis
        trial = list(patch)
        trial[axis] -= layout.divisible_by[axis]
        if trial[axis] < 1:
            raise PlanningError(f"cannot shrink the patch {_fmt(patch)} further to fit the budget of "
                                f"{budget:.4g} elements; raise gpu_memory_gb (now {gpu_memory_gb}).")
        step = pooling_layout(spacing, trial).divisible_by[axis]
        patch[axis] -= step
        layout = pooling_layout(spacing, patch)
        topo = net.topology(topology_for(layout, preset))
        estimate = net.feature_map_elements(topo, layout.patch_size, num_classes=num_classes)
        steps += 1
    patch, adapted = layout.patch_size, None
    if net.fit_patch(patch) != tuple(patch):  # the network's input constraint (e.g. multiples of 32)
        adapted, patch = tuple(patch), net.fit_patch(patch)
        topo = net.topology(topology_for(pooling_layout(spacing, patch), preset))
        estimate = net.feature_map_elements(topo, patch, num_classes=num_classes)
    bs_mem = round(budget / estimate * ref_bs)
    bs_cap = round(dataset_voxels * preset.max_dataset_covered / math.prod(float(p) for p in patch))
    batch = max(min(bs_mem, bs_cap), preset.min_batch_size)
    return PatchPlan(initial_patch_size=tuple(int(round(v)) for v in initial), patch_size=tuple(patch),
                     topology=topo, estimate=estimate, budget=budget, shrink_steps=steps,
                     batch_from_memory=bs_mem, batch_from_dataset_cap=bs_cap, batch_size=batch,
                     adapted_from=adapted, network_name=network_name)
