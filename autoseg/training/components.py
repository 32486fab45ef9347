"""The parts of one fold's training run, each built by one step: the prepared fold (folders, split, label layout,
cascade and plugin inputs), the components (network, loss, training loop, augmentation parameters) and the batch
streams. :func:`autoseg.training.run.train_fold` only puts them together and trains.

Randomness is seeded in :func:`build_components` from the plans' seed, the configuration and the fold, before the
network is built, so a fold's initial weights and the RNG states its checkpoints store depend on the seed alone.
"""

from __future__ import annotations

import hashlib
import math
import random
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.device import Runtime
from autoseg.errors import TrainingError
from autoseg.inference.export import LabelLayout, probabilities_path
from autoseg.io.annotations import annotatable_names, annotated_outputs, dataset_annotations
from autoseg.io.atomic import remove_stale_temporaries
from autoseg.io.dataset import Dataset
from autoseg.io.model_folder import FINAL, LATEST, fold_folder
from autoseg.networks.checkpoint import CheckpointMeta
from autoseg.networks.error_head import error_head_of
from autoseg.networks.parts import UNetPart
from autoseg.planner.plans import ConfigurationPlan, Plans
from autoseg.planner.recipe import PartChoice, Recipe, parse_recipe
from autoseg.plugins.channels import training_channels
from autoseg.training.augmentation import (
    AugmentationParams,
    augmentation_params,
    training_transforms,
    validation_transforms,
)
from autoseg.training.augmentation_presets import AugmentationPreset
from autoseg.training.batch_augment import BatchAugmenter
from autoseg.training.batch_stream import BatchStream
from autoseg.training.cascade import cascade_input_folder, prepare_cascade_inputs
from autoseg.training.dataloader import CaseStore, PatchLoader
from autoseg.training.error_head import ErrorHeadLoss
from autoseg.training.feeding import CompactBatch, DeviceFeeder
from autoseg.training.loop import TrainingLoop
from autoseg.training.losses import DeepSupervisionLoss, build_loss
from autoseg.training.losses.partial import PartialLabelLoss
from autoseg.training.parts import build_part, check_recipe_builds, resolve_recipe
from autoseg.training.settings import TrainSettings
from autoseg.training.splits import Fold, fold_cases, get_splits
from autoseg.training.transfer import TransferReport, load_matching_weights


def derived_seed(*parts: Any) -> int:
    """A 31-bit seed from any values (stable across runs and platforms)."""
    return int.from_bytes(hashlib.sha1(repr(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


def deep_supervision_scales(config: ConfigurationPlan) -> list[tuple[float, ...]]:
    """Relative resolution of each deep-supervision output of the plan's U-Net (highest first): ``1 / cumprod(strides)``
    (:meth:`~autoseg.networks.parts.NetworkPart.supervised_scales`)."""
    return UNetPart().supervised_scales(config.topology)


@dataclass(frozen=True)
class PreparedFold:
    """What a fold's run trains on and where it writes; built by :func:`prepare_fold` and :func:`finish_preparing`."""

    config: ConfigurationPlan
    fold_key: int | str  # as the caller gave it: the seeds derive from it
    folder: Path
    epochs: int
    iters: int
    val_iters: int
    split: Fold = Fold(train=(), val=())
    layout: LabelLayout | None = None
    prev_folder: Path | None = None
    prev_labels: tuple[int, ...] = ()
    extra_folders: tuple[Path, ...] = ()
    in_channels: int = 0  # network input: the images, plugin channels and one-hot cascade labels
    recipe: Recipe | None = None  # the planned recipe with this run's overrides, every part checked
    annotated: dict[str, tuple[bool, ...]] | None = None  # partially annotated datasets: per case, outputs annotated

    @property
    def fold(self) -> str:
        """The fold's name (``"0"``, ``"all"``)."""
        return str(self.fold_key)


def prepare_fold(dataset: Dataset, plans: Plans, config_name: str, fold: int | str, workdir: Path,
                 settings: TrainSettings, runtime: Runtime) -> PreparedFold:
    """The fold's folder (created), its training length (settings, else the plan's) and its recipe (the plan's with
    the settings' overrides).

    Raises:
        PlanningError, PluginError: a bad recipe override, an unknown part or parameter (checked before any folder
            is made).
    """
    config = plans.configuration(config_name)
    recipe = resolve_recipe(plans.recipe(config_name).with_overrides(parse_recipe(settings.recipe)))
    if settings.recipe:  # this run's overrides: refused before any folder is made
        check_recipe_builds(recipe, regions=plans.has_regions, ignore_label=plans.labels.get("ignore"))
    folder = fold_folder(workdir, config_name, fold)
    folder.mkdir(parents=True, exist_ok=True)
    return PreparedFold(config, fold, folder, epochs=settings.epochs or config.num_epochs,
                        iters=settings.iters_per_epoch or config.iterations_per_epoch,
                        val_iters=config.val_iterations if settings.val_iters is None else settings.val_iters,
                        recipe=recipe)


def finish_preparing(run: PreparedFold, dataset: Dataset, plans: Plans, workdir: Path, settings: TrainSettings,
                     runtime: Runtime) -> PreparedFold:
    """The split, the label layout, the cascade's first-stage inputs and the plugin channels of the fold.

    Raises:
        CascadeInputError: a cascade stage's first-stage predictions are missing.
    """
    case_ids = [c.case_id for c in dataset.cases]
    if run.fold.strip().lower() == "all":  # every case: no split needed (so no 5-case minimum either)
        split = Fold(train=tuple(sorted(case_ids)), val=tuple(sorted(case_ids)))
    else:
        split = fold_cases(get_splits(workdir, case_ids, seed=plans.seed), run.fold_key)
    if runtime.is_main:
        _remove_stale_temporaries(run.folder, [f"{cid}{dataset.spec.file_ending}" for cid in split.val])
    prev_folder, prev_labels = None, ()
    if run.config.previous_stage:
        prev_labels = tuple(v for v in plans.label_values if v != 0)
        prepare_cascade_inputs(dataset, plans, run.config.name, workdir, progress=settings.progress)
        prev_folder = cascade_input_folder(workdir, run.config.name)
    channels = training_channels(dataset, plans, run.config.name, workdir, install=runtime.is_main)
    return replace(run, split=split, layout=LabelLayout.from_labels(plans.labels, dataset.spec.regions_class_order),
                   prev_folder=prev_folder, prev_labels=prev_labels, extra_folders=tuple(channels.folders),
                   in_channels=len(plans.channel_names) + channels.n_channels + len(prev_labels),
                   annotated=_annotated(dataset, plans))


def _annotated(dataset: Dataset, plans: Plans) -> dict[str, tuple[bool, ...]] | None:
    """Per case the outputs annotated, when dataset.json declares partial annotations (else None)."""
    partial = dataset_annotations(dataset)
    if not partial:
        return None
    full = annotated_outputs(plans.labels, annotatable_names(plans.labels))
    return {c.case_id: annotated_outputs(plans.labels, partial[c.case_id]) if c.case_id in partial else full
            for c in dataset.cases}


@dataclass
class Components:
    """The network (wrapped for DDP when distributed), the training loop that owns loss and optimiser, the
    augmentation parameters and what fine-tuning copied."""

    network: torch.nn.Module
    loop: TrainingLoop
    aug: AugmentationParams
    ds_scales: list[tuple[float, ...]]
    transfer: TransferReport | None


def build_components(run: PreparedFold, plans: Plans, ignore_label: int | None, settings: TrainSettings,
                     runtime: Runtime, *, fine_tune: bool) -> Components:
    """Seed, then build the network (fine-tuned from ``settings.init_from`` when ``fine_tune``), loss and loop."""
    assert run.layout is not None and run.recipe is not None, "prepare_fold and finish_preparing run first"
    config, device, recipe = run.config, runtime.device, run.recipe
    torch.manual_seed(derived_seed(plans.seed, config.name, run.fold_key, "init"))
    # the global generators too, so the RNG states a checkpoint stores depend on the seed alone
    np.random.seed(derived_seed(plans.seed, config.name, run.fold_key, "numpy"))
    random.seed(derived_seed(plans.seed, config.name, run.fold_key, "python"))
    part = build_part("network", recipe.network)
    network = part.build(config.topology, in_channels=run.in_channels, num_classes=run.layout.num_outputs).to(device)
    transfer = None
    if settings.init_from and fine_tune:  # fine-tuning starts a new run; a resumed one has its own weights
        transfer = load_matching_weights(network, settings.init_from, configuration=config.name)
    ds_scales = part.supervised_scales(config.topology)
    loss = build_loss(regions=run.layout.regions is not None, batch_dice=config.batch_dice, ignore_label=ignore_label,
                      n_outputs=len(ds_scales), unused_weight=1e-6 if runtime.distributed else 0.0,
                      factory=build_part("loss", recipe.loss))
    if len(ds_scales) == 1:  # a 2-stage network (small images) still returns a list of one output
        loss = DeepSupervisionLoss(loss, [1.0])
    if run.annotated is not None:  # unannotated classes teach nothing (marginal / masked loss)
        loss = PartialLabelLoss(loss, regions=run.layout.regions is not None)
    if error_head_of(network) is not None:  # its term, added to the recipe's loss
        loss = ErrorHeadLoss(loss, num_outputs=run.layout.num_outputs, regions=run.layout.regions is not None,
                             ignore_label=ignore_label)
    if runtime.distributed:  # DDP needs a gradient for every head (the unused_weight above)
        from torch.nn.parallel import DistributedDataParallel

        network = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    loop = TrainingLoop(network, loss, folder=run.folder, device=device, regions=run.layout.regions is not None,
                        ignore_label=ignore_label, amp=runtime.amp, initial_lr=settings.initial_lr,
                        weight_decay=settings.weight_decay, momentum=settings.momentum,
                        grad_clip=settings.grad_clip, is_main=runtime.is_main,
                        optimizer=build_part("optimizer", recipe.optimizer)(network.parameters(), settings),
                        schedule=build_part("schedule", recipe.schedule)(),
                        amp_dtype=getattr(torch, settings.amp_dtype),
                        compile=settings.resolved_compile(device.type))
    aug = augmentation_params(config.patch_size, mirror_axes=recipe.mirror_axes_for(config.ndim))
    loop.state.extra = CheckpointMeta(
        configuration=config.name, fold=run.fold, in_channels=run.in_channels, num_outputs=run.layout.num_outputs,
        mirror_axes=tuple(aug.mirror_axes), cascade_labels=run.prev_labels, epochs=run.epochs,
        settings=settings.to_json(), init_from=transfer.to_json() if transfer is not None else None,
        recipe=recipe.to_json()).to_json()
    return Components(network, loop, aug, ds_scales, transfer)


def batch_streams(run: PreparedFold, plans: Plans, parts: Components, ignore_label: int | None,
                  settings: TrainSettings, runtime: Runtime, workdir: Path) -> tuple[DeviceFeeder, DeviceFeeder]:
    """The training and online-validation batch streams, positioned at the loop's epoch and, for a run preempted
    mid-epoch, at its iteration (batch ``k`` is a function of ``(seed, k)`` alone, so this is exact resume).

    Raises:
        TrainingError: the plan's batch cannot be split over the DDP processes.
    """
    assert run.layout is not None and run.recipe is not None, "prepare_fold and finish_preparing run first"
    config, epoch = run.config, parts.loop.state.epoch
    batch = _batch_per_rank(config.batch_size, runtime.world_size)
    store_train = CaseStore(workdir / "preprocessed" / config.data_identifier, run.split.train,
                            prev_folder=run.prev_folder, extra_folders=list(run.extra_folders))
    store_val = CaseStore(store_train.folder, run.split.val, prev_folder=run.prev_folder,
                          extra_folders=list(run.extra_folders))
    label_kw = {"label_values": None, "regions": run.layout.regions, "ignore_label": ignore_label,
                "ds_scales": parts.ds_scales}
    mask_channels = [i for i, n in enumerate(config.normalization) if n.use_mask]
    preset = build_part("augmentation", run.recipe.augmentation)()
    aug_kw = {"mask_channels": mask_channels, "modality_dropout": settings.modality_dropout,
              "n_image_channels": len(plans.channel_names)}
    t_train, on_device = _train_transforms(parts.aug, preset, run.prev_labels, label_kw, aug_kw,
                                           CompactBatch.for_step(runtime.device.type, runtime.amp))
    t_val = validation_transforms(cascade_labels=run.prev_labels, **label_kw)
    seed = derived_seed(plans.seed, config.name, run.fold_key, runtime.rank)
    workers = settings.resolved_workers(runtime.device.type)
    train = BatchStream(PatchLoader(store_train, patch_size=parts.aug.initial_patch_size,
                                    final_patch_size=config.patch_size, batch_size=batch, seed=seed,
                                    start=epoch * run.iters + parts.loop.state.iteration, annotated=run.annotated),
                        t_train, workers=workers)
    val = BatchStream(PatchLoader(store_val, patch_size=config.patch_size, final_patch_size=config.patch_size,
                                  batch_size=batch, seed=seed + 1, start=epoch * run.val_iters,
                                  annotated=run.annotated), t_val,
                      workers=min(workers, 2))
    # a thread receives, pins and copies the next batches (and augments them there with nnunet) meanwhile
    device = runtime.device
    return (DeviceFeeder(train, device, transform=on_device), DeviceFeeder(val, device))


def _train_transforms(aug: AugmentationParams, preset: AugmentationPreset, prev_labels: tuple[int, ...],
                      label_kw: dict[str, Any], aug_kw: dict[str, Any],
                      compact: CompactBatch) -> tuple[Any, BatchAugmenter | None]:
    """The workers' transform and, for an augmentation on the training device, the batch augmenter (the workers
    then only ``compact`` the cropped batch). A cascade stage runs an on-device preset's steps on the CPU workers
    (with the previous stage's perturbations), said once."""
    if preset.on_device and prev_labels:
        warnings.warn("augmentation: this cascade stage augments on the CPU workers (the previous stage's "
                      "perturbations run there); the other configurations augment on the training device.",
                      stacklevel=2)
        preset = replace(preset, on_device=False)
    if not preset.on_device:
        return training_transforms(aug, preset=preset, cascade_labels=prev_labels, **aug_kw, **label_kw), None
    augmenter = BatchAugmenter(aug, preset, regions=label_kw["regions"], ignore_label=label_kw["ignore_label"],
                               ds_scales=label_kw["ds_scales"], **aug_kw)
    return compact, augmenter


def keep_recorded_augmentation(run: PreparedFold, checkpoint: dict[str, Any], settings: TrainSettings) -> PreparedFold:
    """The run resuming ``checkpoint`` with the augmentation the checkpoint recorded (a half-trained run keeps its
    pipeline when the default changes or the plans are rewritten), unless this run's ``--recipe`` names one.
    Checkpoints from before recipes were recorded trained with the CPU workers' ``nnunet_cpu``."""
    if run.recipe is None or "augmentation" in parse_recipe(settings.recipe):
        return run
    recorded = checkpoint.get("recipe")
    choice = Recipe.from_json(recorded).augmentation if recorded is not None else PartChoice("nnunet_cpu")
    return replace(run, recipe=resolve_recipe(replace(run.recipe, augmentation=choice)))


def _batch_per_rank(batch_size: int, world: int) -> int:
    if world <= 1:
        return batch_size
    if batch_size < world:
        raise TrainingError(f"the plan's batch size {batch_size} is smaller than the {world} DDP processes; use "
                            "fewer GPUs (one fold per GPU is usually faster) or plan with a larger GPU memory target.")
    return math.ceil(batch_size / world)


def _remove_stale_temporaries(folder: Path, val_files: list[str]) -> None:
    """Delete what a killed run was writing in the fold folder (checkpoints are hundreds of MB) and in ``val/``."""
    val = [folder / "val" / n for n in val_files]
    remove_stale_temporaries(*(folder / n for n in (FINAL, LATEST, "log.jsonl", "progress.png")), *val,
                             *(probabilities_path(p) for p in val), folder / "val" / "summary.json")
