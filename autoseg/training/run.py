"""Train one fold of one configuration: everything around the loop (folders, splits, network, loss, batch
streams, resume rules, DDP under ``torchrun``, the final full-volume validation)."""

from __future__ import annotations

import hashlib
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.device import Runtime, barrier
from autoseg.errors import TrainingError
from autoseg.inference.export import LabelLayout, probabilities_path
from autoseg.io.atomic import remove_stale_temporaries
from autoseg.io.dataset import Dataset
from autoseg.io.model_folder import fold_folder
from autoseg.networks.checkpoint import FINAL, LATEST, CheckpointMeta, load_checkpoint
from autoseg.planner.plans import ConfigurationPlan, Plans
from autoseg.plugins.channels import training_channels
from autoseg.training.augmentation import augmentation_params, training_transforms, validation_transforms
from autoseg.training.cascade import cascade_input_folder, prepare_cascade_inputs
from autoseg.training.dataloader import BatchStream, CaseStore, PatchLoader
from autoseg.training.loop import TrainingLoop
from autoseg.training.modality_dropout import check_modality_dropout
from autoseg.training.progress import TrainingLog
from autoseg.training.settings import TrainSettings
from autoseg.training.splits import Fold, fold_cases, get_splits
from autoseg.training.transfer import TransferReport, load_matching_weights


@dataclass(frozen=True)
class FoldResult:
    """What :func:`train_fold` produced."""

    folder: Path
    epochs: int
    validation: dict[str, Any] | None  # the summary of the final validation, if it ran
    transfer: TransferReport | None = None  # what --init-from copied, when this run started from another model
    main_process: bool = True  # False in the torchrun processes other than rank 0, which report nothing


def derived_seed(*parts: Any) -> int:
    """A 31-bit seed from any values (stable across runs and platforms)."""
    return int.from_bytes(hashlib.sha1(repr(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


def deep_supervision_scales(config: ConfigurationPlan) -> list[tuple[float, ...]]:
    """Relative resolution of each deep-supervision output (highest first): ``1 / cumprod(strides)``."""
    scales, cum = [], np.ones(config.ndim)
    for stride in config.topology.strides[:-1] if config.topology.n_stages > 1 else config.topology.strides:
        cum = cum * np.asarray(stride)
        scales.append(tuple(float(v) for v in 1.0 / cum))
    return scales


def train_fold(dataset: Dataset, plans: Plans, config_name: str, fold: int | str, workdir: str | os.PathLike[str], *,
               settings: TrainSettings = TrainSettings(), resume: bool = False,
               runtime: Runtime | None = None) -> FoldResult:
    """Train (or continue, or extend) one fold, then validate it on its held-out cases.

    The preprocessed data must exist (``autoseg.api.train`` runs preprocessing first).

    Args:
        dataset: the raw dataset (references for the final validation, labels layout).
        plans: the plans.
        config_name: configuration to train.
        fold: fold index, or ``"all"`` (train on every case; validation then repeats training cases).
        workdir: work folder.
        settings: epochs, iterations, device, workers, ...
        resume: continue from the latest/final checkpoint; with a larger ``epochs`` a finished run is extended.
        runtime: device, precision and torchrun position (default: from ``settings``; see :mod:`autoseg.device`).

    Returns:
        The fold folder, the epochs trained and the validation summary.

    Raises:
        TrainingError: checkpoints exist but ``resume`` is False, a device is unavailable, cascade inputs are
            missing, or the batch cannot be split over the DDP processes.
        TrainingConfigError: ``settings.modality_dropout > 0`` for a single-channel dataset.

    The settings (``modality_dropout`` included) are stored in every checkpoint under ``"settings"``, so a
    model folder (and a bundle made from it) says how it was trained.
    """
    workdir = Path(workdir)
    config = plans.configuration(config_name)
    check_modality_dropout(settings.modality_dropout, len(plans.channel_names))  # before any folder is made
    runtime = (runtime or settings.runtime()).start()
    rank, world, device = runtime.rank, runtime.world_size, runtime.device
    folder = fold_folder(workdir, config_name, fold)
    folder.mkdir(parents=True, exist_ok=True)
    epochs = settings.epochs or config.num_epochs
    iters = settings.iters_per_epoch or config.iterations_per_epoch
    val_iters = config.val_iterations if settings.val_iters is None else settings.val_iters

    ckpt = _checkpoint_to_resume(folder, resume)
    case_ids = [c.case_id for c in dataset.cases]
    if str(fold).strip().lower() == "all":  # every case: no split needed (so no 5-case minimum either)
        split = Fold(train=tuple(sorted(case_ids)), val=tuple(sorted(case_ids)))
    else:
        split = fold_cases(get_splits(workdir, case_ids, seed=plans.seed), fold)
    if rank == 0:
        _remove_stale_temporaries(folder, [f"{cid}{dataset.spec.file_ending}" for cid in split.val])
    layout = LabelLayout.from_labels(plans.labels, dataset.spec.regions_class_order)
    prev_folder, prev_labels = None, ()
    if config.previous_stage:
        prev_labels = tuple(v for v in plans.label_values if v != 0)
        prepare_cascade_inputs(dataset, plans, config_name, workdir, progress=settings.progress)
        prev_folder = cascade_input_folder(workdir, config_name)
    plugin_channels = training_channels(dataset, plans, config_name, workdir, install=rank == 0)

    from autoseg.networks.unet import build_network
    from autoseg.training.losses import DeepSupervisionLoss, build_loss

    torch.manual_seed(derived_seed(plans.seed, config_name, fold, "init"))
    # the global generators too, so the RNG states a checkpoint stores depend on the seed alone
    np.random.seed(derived_seed(plans.seed, config_name, fold, "numpy"))
    random.seed(derived_seed(plans.seed, config_name, fold, "python"))
    in_channels = len(plans.channel_names) + plugin_channels.n_channels + len(prev_labels)
    network = build_network(config, in_channels=in_channels, num_classes=layout.num_outputs).to(device)
    transfer = None
    if settings.init_from and ckpt is None:  # fine-tuning starts a new run; a resumed one has its own weights
        transfer = load_matching_weights(network, settings.init_from, configuration=config_name)
    ds_scales = deep_supervision_scales(config)
    loss = build_loss(regions=layout.regions is not None, batch_dice=config.batch_dice,
                      ignore_label=dataset.spec.ignore_label, n_outputs=len(ds_scales),
                      unused_weight=1e-6 if world > 1 else 0.0)  # DDP needs a gradient for every head
    if len(ds_scales) == 1:  # a 2-stage network (small images) still returns a list of one output
        loss = DeepSupervisionLoss(loss, [1.0])
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        network = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    amp = runtime.amp
    loop = TrainingLoop(network, loss, folder=folder, device=device, regions=layout.regions is not None,
                        ignore_label=dataset.spec.ignore_label, amp=amp, initial_lr=settings.initial_lr,
                        weight_decay=settings.weight_decay, momentum=settings.momentum,
                        grad_clip=settings.grad_clip, is_main=rank == 0)
    aug = augmentation_params(config.patch_size)
    loop.state.extra = CheckpointMeta(
        configuration=config_name, fold=str(fold), in_channels=in_channels, num_outputs=layout.num_outputs,
        mirror_axes=tuple(aug.mirror_axes), cascade_labels=tuple(prev_labels), epochs=epochs,
        settings=settings.to_json(), init_from=transfer.to_json() if transfer is not None else None).to_json()
    if ckpt is not None:
        loop.restore(ckpt)

    if loop.state.epoch < epochs:
        batch = _batch_per_rank(config.batch_size, world)
        store_train = CaseStore(workdir / "preprocessed" / config.data_identifier, split.train, prev_folder=prev_folder,
                                extra_folders=plugin_channels.folders)
        store_val = CaseStore(store_train.folder, split.val, prev_folder=prev_folder,
                              extra_folders=plugin_channels.folders)
        label_kw = {"label_values": None, "regions": layout.regions, "ignore_label": dataset.spec.ignore_label,
                    "ds_scales": ds_scales}
        mask_channels = [i for i, n in enumerate(config.normalization) if n.use_mask]
        t_train = training_transforms(aug, mask_channels=mask_channels, cascade_labels=prev_labels,
                                      modality_dropout=settings.modality_dropout,
                                      n_image_channels=len(plans.channel_names), **label_kw)
        t_val = validation_transforms(cascade_labels=prev_labels, **label_kw)
        seed = derived_seed(plans.seed, config_name, fold, rank)
        workers = settings.resolved_workers(device.type)
        train_stream = BatchStream(PatchLoader(store_train, patch_size=aug.initial_patch_size,
                                               final_patch_size=config.patch_size, batch_size=batch, seed=seed,
                                               start=loop.state.epoch * iters), t_train, workers=workers,
                                   pin_memory=device.type == "cuda")
        val_stream = BatchStream(PatchLoader(store_val, patch_size=config.patch_size,
                                             final_patch_size=config.patch_size, batch_size=batch, seed=seed + 1,
                                             start=loop.state.epoch * val_iters), t_val,
                                 workers=min(workers, 1))
        log = TrainingLog(folder / "log.jsonl", keep_before=loop.state.epoch)
        try:
            loop.run(train_stream, val_stream, epochs=epochs, iters_per_epoch=iters, val_iters=val_iters,
                     save_every=max(1, settings.save_every), log=log, progress=settings.progress)
        finally:
            train_stream.close()
            val_stream.close()
    summary = None
    if settings.validate and rank == 0:
        from autoseg.training.validation import validate_fold

        net = getattr(network, "module", network)
        summary = validate_fold(net, dataset, plans, config, layout, split.val, workdir, folder / "val",
                                mirror_axes=aug.mirror_axes, device=device, amp=amp, step_size=settings.step_size,
                                save_probabilities=settings.save_probabilities, prev_folder=prev_folder,
                                prev_labels=prev_labels, extra_folders=plugin_channels.folders,
                                progress=settings.progress)
    barrier()
    return FoldResult(folder, epochs, summary, transfer, runtime.is_main)


def revalidate_fold(dataset: Dataset, plans: Plans, config_name: str, fold: int | str, workdir: Path, *,
                    settings: TrainSettings) -> FoldResult:
    """Rerun the final validation of a trained fold without training (e.g. to add probabilities for ensembling).

    Raises:
        FileFormatError: the fold has no final checkpoint.
    """
    from dataclasses import replace

    done = int(load_checkpoint(fold_folder(workdir, config_name, fold) / FINAL)["epoch"])
    # resuming a finished run at its own epoch count trains nothing and validates
    return train_fold(dataset, plans, config_name, fold, workdir, settings=replace(settings, epochs=done, validate=True),
                      resume=True)


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


def _checkpoint_to_resume(folder: Path, resume: bool) -> dict[str, Any] | None:
    existing = [folder / n for n in (FINAL, LATEST) if (folder / n).is_file()]
    if not existing:
        return None
    if not resume:
        raise TrainingError(f"{folder} already holds {', '.join(p.name for p in existing)}; pass --resume to "
                            "continue (a larger --epochs extends a finished run), or delete the folder to start "
                            "over.")
    states = [load_checkpoint(p) for p in existing]
    return max(states, key=lambda s: int(s["epoch"]))
