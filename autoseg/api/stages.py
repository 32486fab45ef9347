"""The stages up to training: check, fingerprint, plan, preprocess, train; each saves its result in the work folder.

    >>> import autoseg
    >>> report = autoseg.check("Dataset001_Brain")                     # doctest: +SKIP
    >>> plans = autoseg.plan("Dataset001_Brain", preset="cpu", jobs=2)  # doctest: +SKIP
    >>> print(plans.summary_table())                                    # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoseg.fingerprint.stage import fingerprint
from autoseg.io.atomic import write_text_atomic
from autoseg.io.check import CheckReport, check_dataset
from autoseg.io.dataset import Dataset, record_dataset_source
from autoseg.io.model_folder import configuration_folder
from autoseg.io.workdir import DatasetLike, as_dataset, workdir_for
from autoseg.planner.overrides import OverrideInput, apply_overrides, parse_overrides
from autoseg.planner.planner import plan_experiment
from autoseg.planner.plans import Plans
from autoseg.planner.presets import get_preset
from autoseg.planner.recipe import Recipe, default_recipe, has_regions, parse_recipe
from autoseg.plugins.channels import prepare_channels
from autoseg.plugins.planning import resolve_plugins, with_plugins
from autoseg.preprocessing.preprocess import PreprocessSummary, preprocess_dataset
from autoseg.preprocessing.storage import DEFAULT_STORAGE, check_storage
from autoseg.training.parts import check_recipe_builds, resolve_recipe
from autoseg.training.settings import TrainSettings

if TYPE_CHECKING:
    from autoseg.training.run import FoldResult



def check(dataset: DatasetLike, *, jobs: int = 1, progress: bool = True,
          strict_geometry: bool = False, allow_geometry_mismatch: bool = False) -> CheckReport:
    """Run the integrity check and return every problem found (it never raises on a bad dataset).

    Args:
        dataset: dataset folder (nnU-Net v2 raw layout) or a loaded :class:`Dataset`.
        jobs: worker processes.
        progress: show a progress bar.
        strict_geometry: origin/direction mismatches inside a case are errors, not warnings.
        allow_geometry_mismatch: mismatches that move voxels by more than half their size are warnings, not errors
            (:mod:`autoseg.io.geometry_policy`).

    Returns:
        The report; ``report.ok`` is False when there are errors, ``report.format_table()`` lists them.
    """
    return check_dataset(dataset if isinstance(dataset, Dataset) else Path(dataset), jobs=jobs,
                         progress=progress, strict_geometry=strict_geometry,
                         allow_geometry_mismatch=allow_geometry_mismatch)


def plan(dataset: DatasetLike, *, workdir: str | os.PathLike[str] | None = None, gpu_memory_gb: float = 8.0,
         preset: str = "default", jobs: int = 1, progress: bool = True, strict_geometry: bool = False,
         allow_geometry_mismatch: bool = False,
         reuse_fingerprint: bool = True, seed: int = 12345, plugins: Sequence[str | dict[str, Any]] = (),
         recipe: Sequence[str] | str | Recipe | None = None, overrides: OverrideInput = None,
         storage: str | None = None,
         on_report: Callable[[CheckReport], None] | None = None) -> Plans:
    """Check, fingerprint and plan a dataset; saves ``fingerprint.json``, ``plans.json`` and a copy of
    ``dataset.json`` in the work folder.

    Args:
        dataset: dataset folder or a loaded :class:`Dataset`.
        workdir: work folder (see :func:`workdir_for`).
        gpu_memory_gb: GPU memory the training configurations are sized for.
        preset: planner preset (``default`` = nnU-Net v2's rules; ``cpu`` = sized to train on a CPU).
        jobs: worker processes for the check and fingerprint.
        progress: show progress bars.
        strict_geometry: origin/direction mismatches inside a case are errors.
        allow_geometry_mismatch: proceed although image and label headers place voxels more than half a voxel
            apart (:mod:`autoseg.io.geometry_policy`); recorded in the plans.
        reuse_fingerprint: reuse a saved fingerprint of unchanged files.
        seed: the seed recorded in the plans, from which all later randomness flows.
        plugins: extra input channels / derived labels, e.g. ``["kle_residual", "peritumoral_zones:widths_mm=5,10"]``
            (names, ``NAME:KEY=VALUE:...`` texts or ``{"name", "params"}``; :mod:`autoseg.plugins`).
        recipe: the training recipe, as overrides of the default (``["network=attention_unet",
            "loss=dice_focal:gamma=2"]``, :mod:`autoseg.planner.recipe`) or a whole :class:`Recipe`; recorded
            in every configuration of the plans. Its network's cost model sizes the patches and batches.
        overrides: values set by hand after planning, e.g. ``["3d_fullres.patch_size=96,160,160",
            "3d_fullres.batch_size=4"]`` or ``{"3d_fullres": {"spacing": (1, 1, 1)}}`` (keys ``spacing``,
            ``patch_size``, ``batch_size``, ``num_epochs``, ``iterations_per_epoch``, ``val_iterations``); what depends
            on them is derived again with the planner's rules and each configuration records them
            (:mod:`autoseg.planner.overrides`).
        storage: how the preprocessed cases are stored, ``npy`` or ``blosc2`` (compressed; needs
            ``pip install "autoseg[blosc2]"``); None: ``npy`` (:mod:`autoseg.preprocessing.storage` says why).
            Recorded in the plans; changing it re-preprocesses.
        on_report: called with the integrity report (e.g. to print its warnings).

    Returns:
        The plans (``plans.summary_table()``, ``plans.explain()``).

    Raises:
        DatasetError, DatasetIntegrityError: the dataset is unusable (the message says why and how to fix).
        PlanningError, PluginError: an option is invalid (e.g. an unknown preset, plugin, recipe part or parameter).
        MissingDependencyError: ``storage="blosc2"`` without the blosc2 package.
    """
    storage = check_storage(storage or DEFAULT_STORAGE)  # an unknown format or a missing package fails first
    ds, chosen = as_dataset(dataset), resolve_plugins(plugins)  # a bad plugin choice fails before any work
    chosen_recipe = _recipe(recipe, preset, ds)  # and so does a bad recipe
    chosen_overrides = parse_overrides(overrides)  # and a malformed override
    wd = workdir_for(ds, workdir)
    fp = fingerprint(ds, workdir=wd, jobs=jobs, progress=progress, strict_geometry=strict_geometry,
                     allow_geometry_mismatch=allow_geometry_mismatch,
                     reuse=reuse_fingerprint, on_report=on_report)
    planned = plan_experiment(fp, gpu_memory_gb=gpu_memory_gb, preset=preset, seed=seed, recipe=chosen_recipe)
    plans = with_plugins(apply_overrides(planned, fp, chosen_overrides), chosen)
    plans = dataclasses.replace(plans, storage=storage, allow_geometry_mismatch=allow_geometry_mismatch)
    if allow_geometry_mismatch:
        plans = dataclasses.replace(plans, decisions=(*plans.decisions, "geometry: planned with "
                                    "--allow-geometry-mismatch; cases whose image and label headers place voxels more "
                                    "than half a voxel apart were accepted as they are"))
    plans.save(wd / "plans.json")
    write_text_atomic(wd / "dataset.json", (ds.root / "dataset.json").read_text(encoding="utf-8"))
    record_dataset_source(wd, ds.root)
    return plans


def _recipe(recipe: Sequence[str] | str | Recipe | None, preset: str, ds: Dataset) -> Recipe:
    """The recipe to plan with, every part checked: the preset's default with the given overrides."""
    regions = has_regions(ds.spec.labels)
    base = default_recipe(block=get_preset(preset).block, regions=regions)
    chosen = resolve_recipe(recipe if isinstance(recipe, Recipe) else base.with_overrides(parse_recipe(recipe)))
    check_recipe_builds(chosen, regions=regions, ignore_label=ds.spec.ignore_label)
    return chosen


def _load_plans(wd: Path) -> Plans:
    path = wd / "plans.json"
    if not path.is_file():
        from autoseg.errors import PlanningError

        raise PlanningError(f"{path} does not exist; run `autoseg plan DATASET --workdir {wd}` first.")
    return Plans.load(path)


def default_configurations(plans: Plans) -> list[str]:
    """The configuration(s) preprocessed by default: ``3d_fullres`` when planned, else ``2d``."""
    return ["3d_fullres"] if "3d_fullres" in plans.configurations else ["2d"]


def preprocess(dataset: DatasetLike, configurations: Sequence[str] | None = None, *,
               workdir: str | os.PathLike[str] | None = None, jobs: int = 1, progress: bool = True,
               overwrite: bool = False) -> dict[str, PreprocessSummary]:
    """Preprocess the training cases for some configurations (default: see :func:`default_configurations`).

    Idempotent: cases already stored for the same plan are reused, changed or incomplete ones redone.

    Returns:
        Per configuration, which cases were processed and which reused.

    Raises:
        PlanningError: no plans in the work folder, or an unknown configuration.
    """
    ds = as_dataset(dataset)
    wd = workdir_for(ds, workdir)
    plans = _load_plans(wd)
    names = list(configurations) if configurations else default_configurations(plans)
    out: dict[str, PreprocessSummary] = {}
    done: set[str] = set()
    for name in names:
        ident = plans.configuration(name).data_identifier
        if ident in done:
            continue
        out[name] = preprocess_dataset(ds, plans, name, wd, jobs=jobs, progress=progress, overwrite=overwrite)
        if plans.plugins:  # channel plugins are fitted on the preprocessed cases (refitted only when those change)
            prepare_channels(ds, plans, name, wd, progress=progress)
        done.add(ident)
    return out


def train(dataset: DatasetLike, configuration: str = "3d_fullres", fold: int | str = 0, *,
          workdir: str | os.PathLike[str] | None = None, settings: TrainSettings | None = None,
          resume: bool = False, jobs: int = 1, groups: str | os.PathLike[str] | dict[str, str] | None = None,
          validate_only: bool = False, **overrides: Any) -> list[FoldResult]:
    """Train one fold, several, or every fold of a configuration (preprocessing first if needed).

    Args:
        dataset: dataset folder or a loaded :class:`Dataset`.
        configuration: ``2d``, ``3d_fullres``, ``3d_lowres`` or ``3d_cascade_fullres``.
        fold: a fold index, ``"0,2"``, ``"cv"`` (every fold of ``splits.json`` in turn) or ``"all"`` (one
            model on every case, nnU-Net's meaning).
        workdir: work folder holding ``plans.json``.
        settings: training settings; keyword ``overrides`` (e.g. ``epochs=5``) replace single fields.
        resume: continue from checkpoints (a larger ``epochs`` extends a finished run).
        jobs: worker processes for preprocessing.
        groups: case -> group (e.g. patient) mapping or a CSV with ``case,group`` columns; new splits keep each
            group in one fold, existing ``splits.json`` files are checked against it.
        validate_only: do not train; rerun the final validation of trained folds (e.g. with
            ``save_probabilities=True`` to get the probabilities ensembling needs).

    Returns:
        One result per fold (model folder, epochs, validation summary).

    Example:
        >>> autoseg.train("Dataset001_Brain", "3d_fullres", 0, epochs=5, device="cpu")  # doctest: +SKIP
    """
    import dataclasses

    from autoseg.device import barrier
    from autoseg.training.run import train_fold
    from autoseg.training.splits import get_splits

    ds = as_dataset(dataset)
    wd = workdir_for(ds, workdir)
    plans = _load_plans(wd)
    config = plans.configuration(configuration)
    settings = dataclasses.replace(settings or TrainSettings(), **overrides)
    runtime = settings.runtime().start()
    rank = runtime.rank  # under torchrun only rank 0 writes shared files
    if rank == 0:
        preprocess(ds, [configuration], workdir=wd, jobs=jobs, progress=settings.progress)
        model_dir = configuration_folder(wd, configuration)
        model_dir.mkdir(parents=True, exist_ok=True)
        plans.save(model_dir / "plans.json")
        write_text_atomic(model_dir / "dataset.json", (ds.root / "dataset.json").read_text(encoding="utf-8"))
        record_dataset_source(wd, ds.root)
    every = str(fold).strip().lower() == "all"  # one model on every case needs no split
    if rank == 0 and not every:
        get_splits(wd, [c.case_id for c in ds.cases], seed=plans.seed, groups=groups)
    barrier()
    folds = ["all"] if every else _fold_list(fold, len(get_splits(wd, [c.case_id for c in ds.cases],
                                                                 seed=plans.seed)))
    if not validate_only:
        return [train_fold(ds, plans, config.name, f, wd, settings=settings, resume=resume, runtime=runtime) for f in folds]
    from autoseg.training.run import revalidate_fold

    return [revalidate_fold(ds, plans, config.name, f, wd, settings=settings) for f in folds]


def _fold_list(fold: int | str, n_folds: int) -> list[int | str]:
    if isinstance(fold, int):
        return [fold]
    text = str(fold).strip()
    if text == "cv":
        return list(range(n_folds))
    if text == "all":
        return ["all"]
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        from autoseg.errors import PlanningError

        raise PlanningError(f"fold {fold!r} is not valid; give a fold number (0-{n_folds - 1}), a list like 0,2, "
                            "'cv' for every fold or 'all' for one model on every case.") from err
