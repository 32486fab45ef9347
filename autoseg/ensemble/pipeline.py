"""The deploy pipeline: load what ``predict`` runs from a work folder or bundle (the chosen configurations, folds,
postprocessing and label map), then segment files with it (:func:`predict_files`).

With no configuration named, the choice of ``find-best`` (``selection/best.json``) is used with its
postprocessing; without one, the only trained configuration. Naming configurations (``-c``) gives exactly those,
and postprocessing only when asked for (a rules file, or ``True`` for the learnt one).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from autoseg.ensemble.cases import Extras, PredictionSummary, predict_cases
from autoseg.ensemble.choice import POSTPROCESSING, QUALITY_RULE, SELECTION, BestChoice, load_best
from autoseg.ensemble.models import ModelEnsemble, parse_label_map
from autoseg.ensemble.postprocessing import PostprocessingRules
from autoseg.ensemble.sharding import Sharing, select_part
from autoseg.errors import ModelNotFoundError, PredictionInputError
from autoseg.evaluation.quality_rule import QualityRule
from autoseg.fingerprint.drift import check_case, load_drift_reference
from autoseg.inference.export import output_names
from autoseg.inference.inputs import InputCase, check_cases, check_channel_names, collect_cases
from autoseg.inference.predictor import Predictor
from autoseg.inference.settings import InferenceSettings
from autoseg.io.atomic import ensure_writable
from autoseg.io.dicom import is_series_path
from autoseg.io.dicom_seg import Algorithm
from autoseg.io.image import SUPPORTED_ENDINGS, file_ending
from autoseg.io.model_folder import FINAL, fold_folder, is_bundle, require_intact, sha256, trained_configurations

PostprocessingChoice = bool | str | os.PathLike[str] | PostprocessingRules | None


def _rules(choice: PostprocessingChoice, wd: Path, default: Path | None) -> PostprocessingRules | None:
    if choice is None or choice is True:
        path = default if choice is None else (default or wd / SELECTION / POSTPROCESSING)
        if path is None:
            return None
        if not path.is_file():
            if choice is True:
                raise ModelNotFoundError(f"{path}: no learnt postprocessing; run `autoseg find-best --workdir {wd}` "
                                         "first, or pass a rules file.")
            return None
        return PostprocessingRules.load(path)
    if choice is False or (isinstance(choice, str) and choice.lower() == "none"):
        return None
    if isinstance(choice, PostprocessingRules):
        return choice
    return PostprocessingRules.load(Path(choice))


def load_ensemble(workdir: str | os.PathLike[str], settings: InferenceSettings | None = None, **knobs: Any
                  ) -> tuple[ModelEnsemble, dict[str, Any]]:
    """The models, postprocessing and label map ``predict`` applies, and a record of the choice.

    Args:
        workdir: a work folder or an exported bundle.
        settings: which configurations, folds, postprocessing and label map, and how to run them
            (:class:`InferenceSettings`); ``knobs`` replace single fields. With no configuration: the ``find-best``
            choice, else the only trained configuration. The label map defaults to a bundle's own.

    Raises:
        ModelNotFoundError: nothing trained, or several configurations and no ``find-best`` choice.
    """
    settings = InferenceSettings.create(settings, **knobs)
    wd = Path(workdir)
    best = load_best(wd) if settings.configuration is None else None
    names, member_folds = _members(wd, settings, best)
    default_rules = wd / SELECTION / best.postprocessing if best is not None and best.postprocessing else None
    label_map = settings.label_map if settings.label_map is not None or best is None else best.label_map
    members = [Predictor.from_workdir(wd, n, folds=settings.folds if settings.folds is not None else member_folds[n],
                                      settings=settings) for n in names]
    rules = _rules(settings.postprocessing, wd, default_rules)
    mapping = parse_label_map(label_map)
    ensemble = ModelEnsemble(members, postprocess=rules.apply if rules is not None and not rules.is_empty else None,
                             label_map=mapping)
    record = {"configurations": names, "folds": {m.config.name: list(m.folds) for m in members},
              "selection": best.name if best is not None else None,
              "postprocessing": rules.describe() if rules is not None else None,
              "label_map": {str(k): v for k, v in mapping.items()} if mapping else None}
    return ensemble, record


def _members(wd: Path, settings: InferenceSettings, best: BestChoice | None
             ) -> tuple[list[str], dict[str, list[str] | None]]:
    """The configurations to load and, per configuration, the folds the choice names (None: every trained one)."""
    if best is not None:
        return list(best.configurations), {m.configuration: list(m.folds) or None for m in best.members}
    if settings.configuration is None:
        trained = trained_configurations(wd)
        if len(trained) != 1:
            raise ModelNotFoundError(
                f"{wd}: " + (f"several configurations are trained ({', '.join(trained)}); choose with -c, or run "
                             f"`autoseg find-best --workdir {wd}` to pick the best one (or ensemble) on "
                             "cross-validation." if trained else
                             "no trained model found (models/<configuration>/fold_*/checkpoint_final.pt). Train "
                             "one with `autoseg train`, or pass the right --workdir."))
        names = trained
    else:
        names = [settings.configuration] if isinstance(settings.configuration, str) else list(settings.configuration)
    return names, {n: None for n in names}


def load_quality_rule(workdir: str | os.PathLike[str], names: Sequence[str]) -> QualityRule | None:
    """The quality threshold ``find-best`` learnt (``selection/quality.json``), if it was learnt for the pipeline
    made of the configurations ``names``; None otherwise (cases are then flagged for input drift only)."""
    path = Path(workdir) / SELECTION / QUALITY_RULE
    if not path.is_file():
        return None
    rule = QualityRule.load(path)
    learnt = rule.candidate.removeprefix("ensemble__").removesuffix("__postprocessed").split("__")
    return rule if sorted(learnt) == sorted(names) else None


def predict_files(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], output: str | os.PathLike[str],
                  workdir: str | os.PathLike[str], settings: InferenceSettings | None = None, *,
                  on_warning: Callable[[str], None] | None = None) -> PredictionSummary:
    """Segment image files with the models of a work folder or bundle; see :func:`autoseg.api.predict`.

    Raises:
        PredictionInputError: missing, unreadable or mismatched inputs (all listed; nothing is written).
        ModelNotFoundError: no trained model for the configuration or folds.
        BundleError: a bundle's files do not match its manifest (nothing is loaded).
    """
    settings = settings or InferenceSettings()
    wd = Path(workdir)
    ins = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    _check_output(ins, Path(output))
    if is_bundle(wd):  # refuse modified files before loading anything
        require_intact(wd)
    model, chosen = load_ensemble(wd, settings)
    names = model.plans.channel_names
    check_channel_names(ins, names)
    everyone = collect_cases(ins, names, missing=settings.missing)
    cases = select_part(everyone, settings.num_parts, settings.part_id) if settings.num_parts > 1 else everyone
    volumes = any(c.ndim == 3 for c in model.plans.configurations.values())  # else 2D images (or 1-slice files)
    check_cases(cases, ndim=3 if volumes else None)  # headers readable, one grid, before any prediction
    extras = _extras(wd, model, settings, cases)
    record = _record(wd, model, chosen, settings, [names[i] for i in sorted({i for c in cases for i in c.missing})])
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(settings.deterministic or before)
    try:
        return predict_cases(model, cases, output, overwrite=settings.overwrite,
                             save_probabilities=settings.save_probabilities, progress=settings.progress, record=record,
                             uncertainty=settings.uncertainty, drift_check=_drift_check(wd) if settings.drift else None,
                             quality_rule=load_quality_rule(wd, model.names) if settings.uncertainty else None,
                             on_warning=on_warning or (lambda m: warnings.warn(m, stacklevel=4)),
                             sharing=Sharing.from_settings(everyone, settings), extras=extras)
    finally:
        torch.use_deterministic_algorithms(before)


def _extras(wd: Path, model: ModelEnsemble, settings: InferenceSettings, cases: Sequence[InputCase]) -> Extras:
    """The probability images and DICOM-SEG files asked for; DICOM-SEG is refused unless every input is a DICOM
    series (it references the series the segmentation was made from)."""
    names = tuple(output_names(model.plans.labels, model.layout)) if settings.probability_images else ()
    if settings.output_format != "dicom-seg":
        return Extras(names)
    other = [c.case_id for c in cases if not is_series_path(c.images[0])]
    if other:
        listed = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        raise PredictionInputError(f"--output-format dicom-seg needs DICOM series inputs, but case(s) {listed} are "
                                   "image files; give DICOM series folders, or drop --output-format dicom-seg.")
    from autoseg import __version__
    from autoseg.io.dicom_seg import require_highdicom

    require_highdicom()  # missing: say so now, before any prediction
    return Extras(names, Algorithm(f"autoseg {'+'.join(model.names)}", __version__, model_hash(wd, model)))


def model_hash(wd: Path, model: ModelEnsemble) -> str:
    """SHA-256 identifying the models: of a bundle's manifest (which holds every file's hash), else of the plans and
    the final checkpoints of the folds used."""
    import hashlib

    if is_bundle(wd):
        return sha256(wd / "manifest.json")
    h = hashlib.sha256()
    for m in model.members:
        for fold in m.folds:
            path = fold_folder(wd, m.config.name, fold) / FINAL
            h.update(f"{m.config.name}/{fold}:{sha256(path) if path.is_file() else '-'}\n".encode())
    if (wd / "plans.json").is_file():
        h.update(sha256(wd / "plans.json").encode())
    return h.hexdigest()


def _check_output(inputs: Sequence[str | os.PathLike[str]], out: Path) -> None:
    """Refuse writing into the input folder; a read-only or full output folder fails now, not after a prediction."""
    if len(inputs) == 1 and Path(inputs[0]).is_dir() and out.resolve() == Path(inputs[0]).resolve():
        raise PredictionInputError(f"{out}: the output folder is the input folder; write the predictions to "
                                   "another folder (-o), so that they are not mistaken for input images.")
    out_dir = out.parent if file_ending(out) in SUPPORTED_ENDINGS and not out.is_dir() else out
    if out_dir.is_dir() or not out_dir.exists():
        ensure_writable(out_dir)


def _drift_check(wd: Path) -> Callable[..., list[str]] | None:
    """Spacing, size and intensities of each input against the training fingerprint (None without one)."""
    reference = load_drift_reference(wd)
    if reference is None:
        return None
    return lambda cid, images, geometry, missing: [
        f.message for f in check_case(reference, images, geometry.array_spacing, cid, missing=missing)]


def _record(wd: Path, model: ModelEnsemble, chosen: dict[str, Any], settings: InferenceSettings,
            missing: list[str]) -> dict[str, Any]:
    """What ``prediction.json`` says produced the outputs."""
    from autoseg import __version__

    first = model.members[0]
    return {"autoseg": __version__, "workdir": str(wd), "configuration": "+".join(model.names), **chosen,
            "tta": bool(first.mirror_axes), "step_size": first.step_size, "amp": first.amp,
            "backend": settings.backend, "deterministic": settings.deterministic, "device": str(first.device),
            "uncertainty": settings.uncertainty, "missing": missing, "previous_stage": (
                {"configuration": first.previous.config.name, "folds": list(first.previous.folds)}
                if first.previous is not None else None)}
