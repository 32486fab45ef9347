"""The notebook API: each function runs one pipeline stage and saves its result in the work folder.

    >>> import autoseg
    >>> report = autoseg.check("Dataset001_Brain")                     # doctest: +SKIP
    >>> plans = autoseg.plan("Dataset001_Brain", preset="cpu", jobs=2)  # doctest: +SKIP
    >>> print(plans.summary_table())                                    # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoseg.fingerprint.extract import analyze_dataset, dataset_signature
from autoseg.fingerprint.model import DatasetFingerprint
from autoseg.io.atomic import ensure_writable, write_json_atomic, write_text_atomic
from autoseg.io.check import CheckReport, check_dataset
from autoseg.io.dataset import Dataset, load_dataset, record_dataset_source
from autoseg.planner.plans import Plans
from autoseg.planner.planner import plan_experiment
from autoseg.plugins.planning import resolve_plugins, with_plugins
from autoseg.preprocessing.preprocess import PreprocessSummary, preprocess_dataset
from autoseg.training.settings import TrainSettings

if TYPE_CHECKING:
    from autoseg.inference.run import PredictionSummary
    from autoseg.training.run import FoldResult

DatasetLike = Dataset | str | os.PathLike[str]
#: work-folder file with the local signature (file names, sizes, times) the saved fingerprint was computed from
FINGERPRINT_CACHE = "fingerprint.cache.json"


def _dataset(dataset: DatasetLike) -> Dataset:
    return dataset if isinstance(dataset, Dataset) else load_dataset(dataset)


def workdir_for(dataset: DatasetLike, workdir: str | os.PathLike[str] | None = None) -> Path:
    """The work folder of a dataset: ``workdir`` if given, else ``$AUTOSEG_HOME/<name>`` when that
    variable is set, else ``./autoseg_work/<name>``. The folder is created."""
    if workdir is None:
        ds = _dataset(dataset)
        home = os.environ.get("AUTOSEG_HOME")
        workdir = Path(home) / ds.name if home else Path("autoseg_work") / ds.name
    path = Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def check(dataset: DatasetLike, *, jobs: int = 1, progress: bool = True,
          strict_geometry: bool = False) -> CheckReport:
    """Run the integrity check and return every problem found (it never raises on a bad dataset).

    Args:
        dataset: dataset folder (nnU-Net v2 raw layout) or a loaded :class:`Dataset`.
        jobs: worker processes.
        progress: show a progress bar.
        strict_geometry: origin/direction mismatches inside a case are errors, not warnings.

    Returns:
        The report; ``report.ok`` is False when there are errors, ``report.format_table()`` lists them.
    """
    return check_dataset(dataset if isinstance(dataset, Dataset) else Path(dataset), jobs=jobs,
                         progress=progress, strict_geometry=strict_geometry)


def fingerprint(dataset: DatasetLike, *, workdir: str | os.PathLike[str] | None = None, jobs: int = 1,
                progress: bool = True, strict_geometry: bool = False, reuse: bool = True,
                on_report: Callable[[CheckReport], None] | None = None) -> DatasetFingerprint:
    """Check the dataset and compute its fingerprint, saved as ``<workdir>/fingerprint.json``.

    A saved fingerprint is reused when the dataset's files are unchanged (same names, sizes and
    modification times, recorded in ``<workdir>/fingerprint.cache.json``) and ``reuse`` is True.
    ``fingerprint.json`` itself holds no times or paths, so a copy of the dataset gives the same file.

    Args:
        dataset: dataset folder or a loaded :class:`Dataset`.
        workdir: work folder (see :func:`workdir_for`).
        jobs: worker processes.
        progress: show a progress bar.
        strict_geometry: origin/direction mismatches inside a case are errors.
        reuse: reuse a saved fingerprint of unchanged files.
        on_report: called with the integrity report (e.g. to print its warnings).

    Returns:
        The fingerprint.

    Raises:
        DatasetError: the dataset folder or dataset.json is unusable.
        DatasetIntegrityError: the integrity check found errors (the message holds the table).
    """
    ds = _dataset(dataset)
    out = workdir_for(ds, workdir) / "fingerprint.json"
    cache = out.with_name(FINGERPRINT_CACHE)
    signature = dataset_signature(ds)
    if reuse and out.is_file():
        try:
            saved = DatasetFingerprint.load(out)
            # work folders from before the cache file kept the local signature in fingerprint.json
            key = json.loads(cache.read_text(encoding="utf-8"))["files"] if cache.is_file() else saved.dataset_signature
        except Exception:  # noqa: BLE001 - an unreadable cache is recomputed
            saved = key = None
        if saved is not None and key == signature:
            from autoseg.io.check_report import CheckReport
            from autoseg.io.check_values import check_dataset_level

            # the case files are unchanged; files around them (stray, undeclared channels) may not be
            report = CheckReport(dataset=str(ds.root), n_cases=len(ds.cases), problems=check_dataset_level(ds))
            if on_report is not None:
                on_report(report)
            report.raise_for_errors()
            return saved
    ensure_writable(out.parent)  # a read-only or full work folder fails now, not after the analysis
    report, fp = analyze_dataset(ds, jobs=jobs, progress=progress, strict_geometry=strict_geometry)
    if on_report is not None:
        on_report(report)
    report.raise_for_errors()
    assert fp is not None
    fp = dataclasses.replace(fp, dataset_signature=dataset_signature(ds, times=False))  # no times: reproducible
    fp.save(out)
    write_json_atomic(cache, {"files": signature})
    return fp


def plan(dataset: DatasetLike, *, workdir: str | os.PathLike[str] | None = None, gpu_memory_gb: float = 8.0,
         preset: str = "default", jobs: int = 1, progress: bool = True, strict_geometry: bool = False,
         reuse_fingerprint: bool = True, seed: int = 12345, plugins: Sequence[str | dict[str, Any]] = (),
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
        reuse_fingerprint: reuse a saved fingerprint of unchanged files.
        seed: the seed recorded in the plans, from which all later randomness flows.
        plugins: extra input channels / derived labels, e.g. ``["kle_residual", "peritumoral_zones:widths_mm=5,10"]``
            (names, ``NAME:KEY=VALUE:...`` texts or ``{"name", "params"}``; :mod:`autoseg.plugins`).
        on_report: called with the integrity report (e.g. to print its warnings).

    Returns:
        The plans (``plans.summary_table()``, ``plans.explain()``).

    Raises:
        DatasetError, DatasetIntegrityError: the dataset is unusable (the message says why and how to fix).
        PlanningError, PluginError: an option is invalid (e.g. an unknown preset or plugin parameter).
    """
    ds, chosen = _dataset(dataset), resolve_plugins(plugins)  # a bad plugin choice fails before any work
    wd = workdir_for(ds, workdir)
    fp = fingerprint(ds, workdir=wd, jobs=jobs, progress=progress, strict_geometry=strict_geometry,
                     reuse=reuse_fingerprint, on_report=on_report)
    plans = with_plugins(plan_experiment(fp, gpu_memory_gb=gpu_memory_gb, preset=preset, seed=seed), chosen)
    plans.save(wd / "plans.json")
    write_text_atomic(wd / "dataset.json", (ds.root / "dataset.json").read_text(encoding="utf-8"))
    record_dataset_source(wd, ds.root)
    return plans


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
    ds = _dataset(dataset)
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

    from autoseg.training.run import barrier, setup_distributed, train_fold
    from autoseg.training.splits import get_splits

    ds = _dataset(dataset)
    wd = workdir_for(ds, workdir)
    plans = _load_plans(wd)
    config = plans.configuration(configuration)
    settings = dataclasses.replace(settings or TrainSettings(), **overrides)
    rank, _, _ = setup_distributed(settings.device)  # under torchrun only rank 0 writes shared files
    if rank == 0:
        preprocess(ds, [configuration], workdir=wd, jobs=jobs, progress=settings.progress)
        model_dir = wd / "models" / configuration
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
        return [train_fold(ds, plans, config.name, f, wd, settings=settings, resume=resume) for f in folds]
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


#: ``fast=True``: no test-time mirroring and this window step (about 8x and 2-3x fewer network passes in 3D)
FAST_STEP = 0.75


def predict(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], output: str | os.PathLike[str], *,
            workdir: str | os.PathLike[str], configuration: str | Sequence[str] | None = None,
            folds: Sequence[int | str] | None = None, device: str = "auto", tta: bool = True,
            step_size: float | None = None, fast: bool = False, amp: bool | None = None,
            save_probabilities: bool = False, overwrite: bool = False, progress: bool = True,
            postprocessing: bool | str | os.PathLike[str] | None = None,
            label_map: dict[int, int] | str | Sequence[str] | None = None, backend: str = "torch",
            deterministic: bool = False, uncertainty: bool = False, missing: Sequence[str | int] = (),
            drift: bool = True, on_warning: Callable[[str], None] | None = None) -> PredictionSummary:
    """Segment image files with trained models and write the results in the inputs' format and geometry.

    With no ``configuration``, the pipeline chosen by :func:`find_best` (``selection/best.json``: a configuration
    or an ensemble, and its postprocessing) is used; without a choice, the only trained configuration.

    Args:
        inputs: a folder of ``CASE_XXXX<ending>`` channel files (nnU-Net layout), or image files.
        output: output folder (``<case><ending>`` per case), or a file name for a single case.
        workdir: the work folder the models were trained in, or an exported bundle.
        configuration: configuration name(s); several are ensembled (averaged probabilities).
        folds: folds to use (default: the chosen ones, else every trained fold); their logits are averaged.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        tta: test-time mirroring over the axes the model was trained with.
        step_size: window step as a fraction of the patch (default 0.5; :data:`FAST_STEP` with ``fast``).
        fast: no mirroring and a larger step; see the README for its measured Dice cost.
        amp: mixed precision (None: fp16 on CUDA, bf16 on CPUs that compute it natively).
        save_probabilities: also write ``<case>.npz`` probabilities (for ensembling).
        overwrite: redo cases whose output exists (default: skip them).
        progress: show a progress bar.
        postprocessing: None = the learnt rules when following ``find-best``'s choice; True = the learnt rules;
            False / ``"none"`` = none; a path = that rules file.
        label_map: write labels in another convention, ``{old: new}`` or ``"3:4"`` (default: a bundle's own).
        deterministic: float32 and deterministic algorithms, so the same inputs give the same files.
        backend: ``torch``, or ``onnx`` for ONNX Runtime (:mod:`autoseg.inference.onnx_backend`; float32).
        uncertainty: also write voxel-wise entropy and disagreement maps (``OUTPUT/uncertainty/``) and per-case
            quality scores; cases at or below the threshold ``find-best`` learnt on CV are flagged in
            ``OUTPUT/quality.csv``.
        missing: channels (names or indices) that were not acquired: their files are not needed and they are
            filled as the model saw them blanked (best with a model trained with ``modality_dropout``).
        drift: compare each input with the training fingerprint (spacing, size, intensity percentiles, channel
            names); findings are warnings and flags in ``OUTPUT/quality.csv``.
        on_warning: called with each input warning (default: :func:`warnings.warn`).

    Returns:
        What was written and skipped, warnings, per-case timings.

    Raises:
        PredictionInputError: missing, unreadable or mismatched inputs (all listed; nothing is written).
        ModelNotFoundError: no trained model for the configuration or folds.

    Example:
        >>> autoseg.predict("imagesTs", "predictions", workdir="autoseg_work/Dataset001")  # doctest: +SKIP
    """
    import warnings

    from autoseg import __version__
    from autoseg.ensemble.pipeline import load_ensemble, load_quality_rule
    from autoseg.fingerprint.drift import check_case, load_drift_reference
    from autoseg.inference.inputs import PredictionInputError, check_cases, check_channel_names, collect_cases
    from autoseg.inference.run import predict_cases

    wd = Path(workdir)
    ins = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if len(ins) == 1 and Path(ins[0]).is_dir() and Path(output).resolve() == Path(ins[0]).resolve():
        raise PredictionInputError(f"{output}: the output folder is the input folder; write the predictions to "
                                   "another folder (-o), so that they are not mistaken for input images.")
    from autoseg.io.image import SUPPORTED_ENDINGS, file_ending

    out = Path(output)
    out_dir = out.parent if file_ending(out) in SUPPORTED_ENDINGS and not out.is_dir() else out
    if out_dir.is_dir() or not out_dir.exists():
        ensure_writable(out_dir)  # a read-only or full output folder fails now, not after the first prediction
    if deterministic:
        amp = False
    from autoseg.ensemble.bundle import MANIFEST, require_intact

    if (wd / MANIFEST).is_file():  # a bundle: refuse modified files before loading anything
        require_intact(wd)
    model, chosen = load_ensemble(wd, configurations=configuration, folds=folds, postprocessing=postprocessing,
                                  label_map=label_map, device=device, tta=tta and not fast,
                                  step_size=step_size or (FAST_STEP if fast else 0.5), amp=amp, backend=backend)
    names = model.plans.channel_names
    check_channel_names(ins, names)
    cases = collect_cases(ins, names, missing=missing)
    warn = on_warning or (lambda m: warnings.warn(m, stacklevel=3))
    volumes = any(c.ndim == 3 for c in model.plans.configurations.values())  # else 2D images (or 1-slice files)
    check_cases(cases, ndim=3 if volumes else None)  # headers readable, one grid, before any prediction
    reference = load_drift_reference(wd) if drift else None
    drift_check = None if reference is None else (  # spacing, size and intensities against the training data
        lambda cid, images, geometry, missing: [
            f.message for f in check_case(reference, images, geometry.array_spacing, cid, missing=missing)])
    first = model.members[0]
    record = {"autoseg": __version__, "workdir": str(wd), "configuration": "+".join(model.names), **chosen,
              "tta": bool(first.mirror_axes), "step_size": first.step_size, "amp": first.amp, "backend": backend,
              "deterministic": deterministic, "device": str(first.device), "uncertainty": uncertainty,
              "missing": [names[i] for i in sorted({i for c in cases for i in c.missing})], "previous_stage": (
                  {"configuration": first.previous.config.name, "folds": list(first.previous.folds)}
                  if first.previous is not None else None)}
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic or before)
    try:
        summary = predict_cases(model, cases, output, overwrite=overwrite, save_probabilities=save_probabilities,
                                progress=progress, record=record, uncertainty=uncertainty, drift_check=drift_check,
                                quality_rule=load_quality_rule(wd, model.names) if uncertainty else None,
                                on_warning=warn)
    finally:
        torch.use_deterministic_algorithms(before)
    return summary
