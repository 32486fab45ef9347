"""Train one fold of one configuration: everything around the loop (folders, splits, network, loss, batch
streams, resume rules, DDP under ``torchrun``, the final full-volume validation)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoseg.device import Runtime, barrier
from autoseg.errors import TrainingError
from autoseg.io.dataset import Dataset
from autoseg.io.model_folder import fold_folder
from autoseg.networks.checkpoint import FINAL, LATEST, load_checkpoint
from autoseg.planner.plans import Plans
from autoseg.training.components import (
    Components,
    PreparedFold,
    batch_streams,
    build_components,
    finish_preparing,
    keep_recorded_augmentation,
    prepare_fold,
)
from autoseg.training.modality_dropout import check_modality_dropout
from autoseg.training.progress import TrainingLog
from autoseg.training.settings import TrainSettings
from autoseg.training.tracking import Tracker, TrackerGroup, check_trackers, open_trackers
from autoseg.training.transfer import TransferReport

if TYPE_CHECKING:
    from autoseg.training.validation import ValidationSummary


@dataclass(frozen=True)
class FoldResult:
    """What :func:`train_fold` produced."""

    folder: Path
    epochs: int
    validation: ValidationSummary | None  # the summary of the final validation, if it ran
    transfer: TransferReport | None = None  # what --init-from copied, when this run started from another model
    main_process: bool = True  # False in the torchrun processes other than rank 0, which report nothing


def train_fold(dataset: Dataset, plans: Plans, config_name: str, fold: int | str, workdir: str | os.PathLike[str], *,
               settings: TrainSettings = TrainSettings(), resume: bool = False,
               runtime: Runtime | None = None, trackers: Sequence[Tracker] = ()) -> FoldResult:
    """Train (or continue, or extend) one fold, then validate it on its held-out cases.

    The preprocessed data must exist (``autoseg.api.train`` runs preprocessing first).

    Args:
        dataset: the raw dataset (references for the final validation, labels layout).
        plans: the plans.
        config_name: configuration to train.
        fold: fold index, or ``"all"`` (train on every case; validation then repeats training cases).
        workdir: work folder.
        settings: epochs, iterations, device, workers, ...
        resume: continue from the latest/final checkpoint; with a larger ``epochs`` a finished run is extended. The
            run keeps the augmentation its checkpoint recorded unless ``settings.recipe`` names one.
        runtime: device, precision and torchrun position (default: from ``settings``; see :mod:`autoseg.device`).
        trackers: trackers of the caller's own, next to those ``settings.log_to`` names (see
            :mod:`autoseg.training.tracking`); they get the epochs, checkpoints and final validation (rank 0 only).

    Returns:
        The fold folder, the epochs trained and the validation summary.

    Raises:
        TrainingError: checkpoints exist but ``resume`` is False, a device is unavailable, cascade inputs are
            missing, or the batch cannot be split over the DDP processes.
        TrainingConfigError: ``settings.modality_dropout > 0`` for a single-channel dataset.
        MissingDependencyError: a tracker of ``settings.log_to`` needs a package that is not installed.
        TrainingInterrupted: SIGTERM or SIGUSR1 arrived during training; the state reached is in
            ``checkpoint_latest.pt`` and ``resume=True`` continues exactly (see :mod:`autoseg.training.loop`).

    The settings (``modality_dropout`` included) are stored in every checkpoint under ``"settings"``, so a
    model folder (and a bundle made from it) says how it was trained.
    """
    workdir = Path(workdir)
    check_modality_dropout(settings.modality_dropout, len(plans.channel_names))  # before any folder is made
    check_trackers(settings.log_to)
    runtime = (runtime or settings.runtime()).start()
    run = prepare_fold(dataset, plans, config_name, fold, workdir, settings, runtime)
    ckpt = _checkpoint_to_resume(run.folder, resume)
    if ckpt is not None:
        run = keep_recorded_augmentation(run, ckpt, settings)
    run = finish_preparing(run, dataset, plans, workdir, settings, runtime)
    parts = build_components(run, plans, dataset.spec.ignore_label, settings, runtime, fine_tune=ckpt is None)
    if ckpt is not None:
        parts.loop.restore(ckpt)
    training = parts.loop.state.epoch < run.epochs
    log = TrainingLog(run.folder / "log.jsonl", keep_before=parts.loop.state.epoch) if training else None
    tracker = _open_trackers(dataset, run, parts, settings, runtime, workdir, log, trackers)
    try:
        if log is not None:
            _train(run, plans, parts, dataset.spec.ignore_label, settings, runtime, workdir, log, tracker)
        summary = None
        if settings.validate and runtime.is_main:
            from autoseg.training.validation import ValidationInputs, validate_fold

            net = getattr(parts.network, "module", parts.network)
            inputs = ValidationInputs(run.config, run.layout, tuple(run.split.val), run.prev_folder,
                                      run.prev_labels, run.extra_folders)
            summary = validate_fold(net, dataset, plans, inputs, workdir, run.folder / "val",
                                    mirror_axes=parts.aug.mirror_axes, runtime=runtime, settings=settings)
            tracker.on_validation(summary)
    finally:
        tracker.close()
    barrier()
    return FoldResult(run.folder, run.epochs, summary, parts.transfer, runtime.is_main)


def _open_trackers(dataset: Dataset, run: PreparedFold, parts: Components, settings: TrainSettings,
                   runtime: Runtime, workdir: Path, log: TrainingLog | None, extra: Sequence[Tracker]) -> TrackerGroup:
    """The run's trackers (none on processes other than rank 0); ``log`` is None when nothing is trained."""
    if not runtime.is_main:
        return TrackerGroup()
    params = {**settings.to_json(), "configuration": run.config.name, "fold": run.fold, "epochs": run.epochs,
              "iters_per_epoch": run.iters, "val_iters": run.val_iters, "recipe_overrides": list(settings.recipe),
              "recipe": run.recipe.to_json() if run.recipe is not None else None}
    return open_trackers(settings.log_to, folder=run.folder, workdir=workdir, first_epoch=parts.loop.state.epoch,
                         history=log.records if log is not None else None, params=params,
                         experiment=f"autoseg/{dataset.root.name}/{run.config.name}", run_name=f"fold_{run.fold}",
                         extra=extra)


def _train(run: PreparedFold, plans: Plans, parts: Components, ignore_label: int | None, settings: TrainSettings,
           runtime: Runtime, workdir: Path, log: TrainingLog, tracker: Tracker) -> None:
    """Run the loop on the fold's batch streams, positioned where the loop's state is (exact resume)."""
    train_streams = batch_streams(run, plans, parts, ignore_label, settings, runtime, workdir)
    try:
        parts.loop.run(*train_streams, epochs=run.epochs, iters_per_epoch=run.iters, val_iters=run.val_iters,
                       save_every=max(1, settings.save_every), log=log, progress=settings.progress, tracker=tracker)
    finally:
        for stream in train_streams:
            stream.close()


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


def _checkpoint_to_resume(folder: Path, resume: bool) -> dict[str, Any] | None:
    existing = [folder / n for n in (FINAL, LATEST) if (folder / n).is_file()]
    if not existing:
        return None
    if not resume:
        raise TrainingError(f"{folder} already holds {', '.join(p.name for p in existing)}; pass --resume to "
                            "continue (a larger --epochs extends a finished run), or delete the folder to start "
                            "over.")
    states = [load_checkpoint(p) for p in existing]
    # the furthest: a preempted extension of a finished run has a latest checkpoint inside the final's epoch count
    return max(states, key=lambda s: (int(s["epoch"]), int(s.get("iteration", 0))))
