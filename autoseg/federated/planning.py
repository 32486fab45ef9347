"""Federated planning: the sites' statistics merged into one fingerprint, planned with the rules of ``autoseg plan``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from autoseg.fingerprint.merge import SiteStatistics, merge_site_statistics
from autoseg.fingerprint.model import DatasetFingerprint
from autoseg.planner.planner import plan_experiment
from autoseg.planner.plans import Plans
from autoseg.planner.presets import get_preset
from autoseg.planner.recipe import default_recipe, has_regions
from autoseg.training.parts import resolve_recipe


def plan_federation(parts: Sequence[SiteStatistics], *, dataset_name: str, preset: str = "default",
                    gpu_memory_gb: float = 8.0, seed: int = 12345) -> tuple[DatasetFingerprint, Plans]:
    """The merged fingerprint and its plans (the preset's default recipe; no plugins or overrides).

    Raises:
        FederationError: the sites disagree on channels or labels.
        PlanningError: an unknown preset or an unusable fingerprint.
    """
    fp = merge_site_statistics(parts, dataset_name)
    recipe = resolve_recipe(default_recipe(block=get_preset(preset).block, regions=has_regions(fp.labels)))
    plans = plan_experiment(fp, gpu_memory_gb=gpu_memory_gb, preset=preset, seed=seed, recipe=recipe)
    return fp, dataclasses.replace(plans, dataset_signature="")


def default_configuration(plans: Plans) -> str:
    """``3d_fullres`` when planned, else ``2d`` (what ``autoseg train`` trains by default)."""
    return "3d_fullres" if "3d_fullres" in plans.configurations else "2d"
