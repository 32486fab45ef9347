"""The plans: every configuration the planner derived, with the reasons, saved as ``plans.json``.

Axis convention: every spacing, shape and patch in a configuration is in the *transposed* order
(``transpose_forward`` applied to the fingerprint's ``z, y, x`` axes; the coarsest axis first). The ``2d``
configuration keeps the last two of those axes.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any

from autoseg.errors import FileFormatError, PlanningError
from autoseg.io.atomic import read_json, write_json_atomic
from autoseg.networks.topology import UNetTopology
from autoseg.planner.normalization import ChannelNormalization
from autoseg.planner.recipe import Recipe, default_recipe, has_regions
from autoseg.planner.resampling import ResamplingPlan

PLANS_VERSION = 1
#: formats of the preprocessed cases (``Plans.storage``; :mod:`autoseg.preprocessing.storage` reads and writes them)
STORAGES = ("npy", "blosc2")
#: whose numerical rules preprocessing and inference follow (``ConfigurationPlan.rules``)
RULES = ("autoseg", "nnunet")


@dataclass(frozen=True)
class ConfigurationPlan:
    """One trainable configuration (``2d``, ``3d_fullres``, ``3d_lowres``, ``3d_cascade_fullres``).

    Attributes:
        name: configuration name.
        data_identifier: preprocessed-data folder it uses (the cascade shares ``3d_fullres``'s data).
        spacing: target spacing (transposed axes).
        median_shape: median case shape at that spacing.
        patch_size: training patch.
        batch_size: training batch size.
        topology: the U-Net.
        normalization: one record per input channel.
        resampling: resampling orders and separate-z rule.
        batch_dice: compute Dice over the whole batch (True) or per sample.
        previous_stage: for a cascade stage, the configuration whose predictions it takes as input.
        next_stage: for a cascade's first stage, the configuration that consumes its predictions.
        estimated_feature_map_elements: memory estimate of one sample (see ``autoseg.networks.memory``).
        memory_budget: reference budget the patch was fitted to (feature-map elements).
        decisions: human-readable account of how the numbers were chosen.
        num_epochs: default training length (``autoseg train --epochs`` overrides it).
        iterations_per_epoch: default training iterations per epoch (``--iters-per-epoch``).
        val_iterations: default online-validation iterations per epoch.
        recipe: the training recipe (network, loss, optimiser, schedule, augmentation, mirror axes); None in plans
            written before recipes existed, which train with :func:`~autoseg.planner.recipe.default_recipe`.
        overrides: what was set by hand after planning (``autoseg plan --set``), key -> value as given (e.g.
            ``{"patch_size": [96, 160, 160], "batch_size": 4}``; see :mod:`autoseg.planner.overrides`); empty when
            nothing was, and then absent from the JSON.
        rules: ``autoseg``, or ``nnunet`` for a model imported from nnU-Net v2 (``autoseg import-nnunet``), whose
            preprocessing and sliding window follow nnU-Net's rules where they differ: order-3 image resampling
            clipped to the input's range, window starts rounded half-to-even, nnU-Net's Gaussian importance map.
    """

    name: str
    data_identifier: str
    spacing: tuple[float, ...]
    median_shape: tuple[float, ...]
    patch_size: tuple[int, ...]
    batch_size: int
    topology: UNetTopology
    normalization: tuple[ChannelNormalization, ...]
    resampling: ResamplingPlan
    batch_dice: bool
    previous_stage: str | None = None
    next_stage: str | None = None
    estimated_feature_map_elements: int = 0
    memory_budget: float = 0.0
    decisions: tuple[str, ...] = ()
    num_epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations: int = 50
    recipe: Recipe | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    rules: str = "autoseg"

    def __post_init__(self) -> None:
        if self.rules not in RULES:
            raise PlanningError(f"configuration {self.name!r}: rules {self.rules!r} is not one of {', '.join(RULES)}.")

    @property
    def ndim(self) -> int:
        """2 or 3."""
        return len(self.patch_size)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "name": self.name, "data_identifier": self.data_identifier, "spacing": list(self.spacing),
            "median_shape": list(self.median_shape), "patch_size": list(self.patch_size),
            "batch_size": self.batch_size, "topology": self.topology.to_json(),
            "normalization": [n.to_json() for n in self.normalization], "resampling": self.resampling.to_json(),
            "batch_dice": self.batch_dice, "previous_stage": self.previous_stage, "next_stage": self.next_stage,
            "estimated_feature_map_elements": self.estimated_feature_map_elements,
            "memory_budget": self.memory_budget, "decisions": list(self.decisions),
            "num_epochs": self.num_epochs, "iterations_per_epoch": self.iterations_per_epoch,
            "val_iterations": self.val_iterations,
            **({"recipe": self.recipe.to_json()} if self.recipe is not None else {}),
            **({"overrides": dict(self.overrides)} if self.overrides else {}),  # absent: plans as before
            **({"rules": self.rules} if self.rules != "autoseg" else {}),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ConfigurationPlan:
        """Inverse of :meth:`to_json`."""
        return cls(
            name=str(d["name"]), data_identifier=str(d["data_identifier"]),
            spacing=tuple(float(v) for v in d["spacing"]), median_shape=tuple(float(v) for v in d["median_shape"]),
            patch_size=tuple(int(v) for v in d["patch_size"]), batch_size=int(d["batch_size"]),
            topology=UNetTopology.from_json(d["topology"]),
            normalization=tuple(ChannelNormalization.from_json(n) for n in d["normalization"]),
            resampling=ResamplingPlan.from_json(d["resampling"]), batch_dice=bool(d["batch_dice"]),
            previous_stage=d.get("previous_stage"), next_stage=d.get("next_stage"),
            estimated_feature_map_elements=int(d.get("estimated_feature_map_elements", 0)),
            memory_budget=float(d.get("memory_budget", 0.0)), decisions=tuple(d.get("decisions", ())),
            num_epochs=int(d.get("num_epochs", 1000)), iterations_per_epoch=int(d.get("iterations_per_epoch", 250)),
            val_iterations=int(d.get("val_iterations", 50)),
            recipe=Recipe.from_json(d["recipe"]) if d.get("recipe") is not None else None,
            overrides=dict(d.get("overrides") or {}), rules=str(d.get("rules", "autoseg")),
        )


@dataclass(frozen=True)
class Plans:
    """All configurations of a dataset plus the global decisions.

    Attributes:
        dataset_name: name from the fingerprint.
        preset: planner preset used.
        gpu_memory_gb: memory target the budgets were scaled to.
        seed: the seed all later randomness flows from.
        channel_names: input channels.
        labels: dataset.json labels (name -> value or region values).
        num_training: training cases.
        transpose_forward: axis permutation from the fingerprint's ``z, y, x`` order to the planning order.
        transpose_backward: its inverse.
        original_median_spacing: median case spacing, transposed (informational).
        original_median_shape: median case shape after cropping, transposed (informational).
        configurations: name -> configuration, in the order they were planned.
        decisions: dataset-level decisions (target spacing, transpose, which configurations and why).
        dataset_signature: signature of the files the fingerprint was computed from.
        plugins: chosen plugins (extra input channels, derived labels), each ``{"name", "kind", "params"}`` with
            every parameter filled in (see :mod:`autoseg.plugins`); empty in plans written before plugins existed.
        storage: how preprocessed cases are stored: ``npy`` (memory-mapped, the default) or ``blosc2``
            (compressed; :mod:`autoseg.preprocessing.storage`); plans written before the choice existed are ``npy``.
        allow_geometry_mismatch: planned with ``--allow-geometry-mismatch``: some image and label headers place
            voxels more than half a voxel apart and the user chose to train on them as they are
            (:mod:`autoseg.io.geometry_policy`); absent from the JSON when False.
        version: plans format version.
    """

    dataset_name: str
    preset: str
    gpu_memory_gb: float
    seed: int
    channel_names: tuple[str, ...]
    labels: dict[str, Any]
    num_training: int
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    original_median_spacing: tuple[float, ...]
    original_median_shape: tuple[float, ...]
    configurations: dict[str, ConfigurationPlan] = field(default_factory=dict)
    decisions: tuple[str, ...] = ()
    dataset_signature: str = ""
    plugins: tuple[dict[str, Any], ...] = ()
    storage: str = "npy"
    allow_geometry_mismatch: bool = False
    version: int = PLANS_VERSION

    def __post_init__(self) -> None:
        if self.storage not in STORAGES:
            raise PlanningError(f"storage {self.storage!r} is not one of {', '.join(STORAGES)}.")

    @property
    def label_values(self) -> tuple[int, ...]:
        """Integer label values a segmentation may hold: background included, regions expanded into their
        labels, the ignore label excluded; sorted."""
        vals: set[int] = set()
        for name, v in self.labels.items():
            if name != "ignore":
                vals.update(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
        return tuple(sorted(vals))

    @property
    def has_regions(self) -> bool:
        """Whether the labels define overlapping regions (region training, sigmoid outputs)."""
        return has_regions(self.labels)

    def recipe(self, configuration: str) -> Recipe:
        """The recipe a configuration trains with (the default one for plans written before recipes)."""
        config = self.configuration(configuration)
        return config.recipe or default_recipe(block=config.topology.block, regions=self.has_regions)

    def configuration(self, name: str) -> ConfigurationPlan:
        """The configuration called ``name``.

        Raises:
            PlanningError: no such configuration (the message lists them and suggests the closest).
        """
        if name in self.configurations:
            return self.configurations[name]
        close = difflib.get_close_matches(name, list(self.configurations), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PlanningError(f"configuration {name!r} is not in the plans of {self.dataset_name!r}{hint}; "
                            f"available: {', '.join(self.configurations)}.")

    def explain(self) -> list[str]:
        """Every decision and why, dataset-level first, then per configuration (for ``autoseg plan --explain``)."""
        lines = [f"plans for {self.dataset_name} (preset {self.preset!r}, {self.gpu_memory_gb:g} GB target):"]
        lines += [f"  - {d}" for d in self.decisions]
        for cfg in self.configurations.values():
            lines.append(f"{cfg.name}:")
            lines += [f"  - {d}" for d in cfg.decisions]
        return lines

    def summary_table(self) -> str:
        """A compact table: configuration, spacing, median shape, patch, batch, stages, estimate."""
        head = ("config", "spacing", "median shape", "patch", "batch", "stages", "est. elements")
        rows = [head]
        for c in self.configurations.values():
            rows.append((c.name, "x".join(f"{v:.3g}" for v in c.spacing),
                         "x".join(f"{v:g}" for v in c.median_shape), "x".join(map(str, c.patch_size)),
                         str(c.batch_size), str(c.topology.n_stages), f"{c.estimated_feature_map_elements / 1e6:.0f}M"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    # ---- JSON -------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (what ``plans.json`` holds)."""
        return {
            "version": self.version, "dataset_name": self.dataset_name, "preset": self.preset,
            "gpu_memory_gb": self.gpu_memory_gb, "seed": self.seed, "channel_names": list(self.channel_names),
            "labels": self.labels, "num_training": self.num_training,
            "transpose_forward": list(self.transpose_forward), "transpose_backward": list(self.transpose_backward),
            "original_median_spacing": list(self.original_median_spacing),
            "original_median_shape": list(self.original_median_shape),
            "decisions": list(self.decisions), "dataset_signature": self.dataset_signature,
            "configurations": {k: v.to_json() for k, v in self.configurations.items()},
            **({"plugins": [dict(p) for p in self.plugins]} if self.plugins else {}),  # absent: plans as before
            "storage": self.storage,
            **({"allow_geometry_mismatch": True} if self.allow_geometry_mismatch else {}),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Plans:
        """Inverse of :meth:`to_json`.

        Raises:
            FileFormatError: unknown version or a missing/malformed field.
        """
        if d.get("version") != PLANS_VERSION:
            raise FileFormatError(f"plans version {d.get('version')!r} is not supported (this autoseg writes "
                                  f"version {PLANS_VERSION}); rerun `autoseg plan` to regenerate plans.json.")
        try:
            return cls(
                dataset_name=str(d["dataset_name"]), preset=str(d["preset"]), gpu_memory_gb=float(d["gpu_memory_gb"]),
                seed=int(d["seed"]), channel_names=tuple(d["channel_names"]), labels=dict(d["labels"]),
                num_training=int(d["num_training"]), transpose_forward=tuple(int(v) for v in d["transpose_forward"]),
                transpose_backward=tuple(int(v) for v in d["transpose_backward"]),
                original_median_spacing=tuple(float(v) for v in d["original_median_spacing"]),
                original_median_shape=tuple(float(v) for v in d["original_median_shape"]),
                configurations={k: ConfigurationPlan.from_json(v) for k, v in d["configurations"].items()},
                decisions=tuple(d.get("decisions", ())), dataset_signature=str(d.get("dataset_signature", "")),
                plugins=tuple(_plugin_entry(p) for p in d.get("plugins", ())),
                storage=str(d.get("storage", "npy")),
                allow_geometry_mismatch=bool(d.get("allow_geometry_mismatch", False)),
            )
        except (KeyError, TypeError, ValueError, PlanningError) as err:
            raise FileFormatError(f"plans JSON is missing or has a malformed field ({err!r}); rerun `autoseg plan` "
                                  "to regenerate plans.json.") from err

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``plans.json`` atomically."""
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plans:
        """Read a saved ``plans.json``.

        Raises:
            FileFormatError: missing, not JSON, malformed, or of an unknown version.
        """
        data = read_json(path, FileFormatError, "Rerun `autoseg plan` to recreate it.")
        try:
            return cls.from_json(data)
        except FileFormatError as err:
            raise FileFormatError(f"{path}: {err}") from err


def _plugin_entry(p: Any) -> dict[str, Any]:
    """One stored plugin choice, checked for shape (its name and parameters are checked where it is used)."""
    if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not isinstance(p.get("params", {}), dict):
        raise TypeError(f"plugin entry {p!r} is not {{'name': ..., 'kind': ..., 'params': {{...}}}}")
    return {"name": p["name"], "kind": str(p.get("kind", "")), "params": dict(p.get("params", {}))}


def load_plans(path: str | os.PathLike[str]) -> Plans:
    """Load a saved ``plans.json``.

    Args:
        path: the file.

    Returns:
        The plans.

    Raises:
        FileFormatError: missing, not JSON, malformed, or of an unknown version.
    """
    return Plans.load(path)
