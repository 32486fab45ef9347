"""Public API for trusting a model: clinical tables, scores with channels missing, channel attribution.

    >>> autoseg.measure("predictions", workdir="work")                         # doctest: +SKIP
    >>> autoseg.evaluate_missing("work")                                        # doctest: +SKIP
    >>> autoseg.explain("work", "imagesTs", labels="labelsTs", output="why")    # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.evaluation.clinical import TablePaths, measure_folder
from autoseg.evaluation.metrics import EvaluationError, classes_from_labels
from autoseg.planner.plans import Plans


def _classes(workdir: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    if workdir is None:
        return None
    path = Path(workdir) / "plans.json"
    if not path.is_file():
        raise EvaluationError(f"{workdir}: no plans.json; pass the --workdir (or --bundle) the models came from.")
    return classes_from_labels(Plans.load(path).labels)


def measure(folder: str | os.PathLike[str], *, workdir: str | os.PathLike[str] | None = None,
            dataset_json: str | os.PathLike[str] | None = None, output: str | os.PathLike[str] | None = None,
            jobs: int = 1, progress: bool = True) -> TablePaths:
    """Write ``volumes.csv`` (volume per class/region per case) and ``lesions.csv`` (per lesion: volume, centroid,
    longest axial diameter) for a folder of segmentations; see :mod:`autoseg.evaluation.clinical`.

    Args:
        folder: segmentations (predictions or references).
        workdir: a work folder or bundle whose labels name the classes (or give ``dataset_json``).
        dataset_json: a dataset.json naming the labels and regions.
        output: where the tables go (default: ``folder``).
        jobs: worker processes.
        progress: show a progress bar.

    Returns:
        The two paths.
    """
    classes = _classes(workdir) if dataset_json is None else None
    return measure_folder(folder, classes=classes, dataset_json=dataset_json, output_dir=output, jobs=jobs,
                          progress=progress)


def _case_source(workdir: Path, *, images: str | os.PathLike[str] | None, labels: str | os.PathLike[str] | None,
                 dataset: str | os.PathLike[str] | None, configuration: str | None, folds: Sequence[str] | None,
                 device: str, tta: bool, max_cases: int | None, labels_required: bool
                 ) -> tuple[Any, Iterator[tuple[str, Any, np.ndarray, Any, np.ndarray | None]]]:
    """The model's plans and, lazily, ``(case_id, model, images, geometry, reference)`` per case.

    With ``images``: those cases, predicted by the chosen pipeline (references from ``labels``). Without: the
    cross-validation cases of the training set, each predicted by the fold that did not train on it.
    """
    from autoseg.ensemble.pipeline import load_ensemble
    from autoseg.inference.inputs import collect_cases
    from autoseg.io.dataset import dataset_source, load_dataset
    from autoseg.io.image import file_ending
    from autoseg.preprocessing.preprocess import read_case
    from autoseg.training.splits import load_splits

    common = dict(device=device, tta=tta, postprocessing=False)
    if images is not None:
        model, _ = load_ensemble(workdir, configuration=configuration, folds=folds, **common)
        cases = collect_cases([images], model.plans.channel_names)[:max_cases]

        def given() -> Iterator[tuple[str, Any, np.ndarray, Any, np.ndarray | None]]:
            for c in cases:
                arr, _, geometry = read_case(c.as_case_files())
                ref = _reference(labels, c.case_id, file_ending(c.images[0]))
                if ref is None and labels_required:
                    raise EvaluationError("references are needed: pass labels (-r LABELS_FOLDER).")
                yield c.case_id, model, arr, geometry, ref
        return model.plans, given()

    root = Path(dataset) if dataset is not None else dataset_source(workdir)
    if root is None or not (workdir / "splits.json").is_file():
        raise EvaluationError(f"{workdir}: no recorded dataset or splits.json for cross-validation; pass the "
                              "images and labels to score (-i IMAGES -r LABELS) or --dataset.")
    ds = load_dataset(root)
    splits = load_splits(workdir / "splits.json")
    name = configuration or _default_configuration(workdir)
    from autoseg.io.model_folder import configuration_folder, trained_folds

    wanted = [str(f) for f in folds] if folds else [f for f in trained_folds(configuration_folder(workdir, name)) if f.isdigit()]
    if not wanted:
        raise EvaluationError(f"{workdir}: {name} has no trained cross-validation fold; train one or pass -i/-r.")
    by_id = {c.case_id: c for c in ds.cases}
    first, _ = load_ensemble(workdir, configuration=[name], folds=[wanted[0]], **common)

    def cv() -> Iterator[tuple[str, Any, np.ndarray, Any, np.ndarray | None]]:
        count = 0
        for f in wanted:
            model = first if f == wanted[0] else load_ensemble(workdir, configuration=[name], folds=[f], **common)[0]
            for cid in splits[int(f)].val:
                if max_cases is not None and count >= max_cases:
                    return
                arr, ref, geometry = read_case(by_id[cid])
                count += 1
                yield cid, model, arr, geometry, ref
    return first.plans, cv()


def _reference(labels: str | os.PathLike[str] | None, case_id: str, ending: str) -> np.ndarray | None:
    """The reference label map of a case from the ``labels`` folder (None without one)."""
    from autoseg.io.image import read_label

    if labels is None:
        return None
    path = Path(labels) / f"{case_id}{ending}"
    if not path.is_file():
        raise EvaluationError(f"{path}: no reference for case {case_id} in {labels}; add it or leave the case out "
                              "of the images folder.")
    return read_label(path).array


def _default_configuration(workdir: Path) -> str:
    from autoseg.ensemble.choice import load_best
    from autoseg.io.model_folder import trained_configurations

    best = load_best(workdir)
    if best is not None:
        return best.members[0].configuration
    trained = trained_configurations(workdir)
    if len(trained) != 1:
        raise EvaluationError(f"{workdir}: {'several' if trained else 'no'} trained configurations "
                              f"({', '.join(trained) or 'none'}); choose one with -c.")
    return trained[0]


def _subset_predictor(model: Any, images: np.ndarray, geometry: Any) -> Any:
    """``present channels -> label map`` with the other channels absent (blanked as in training dropout)."""
    n = images.shape[0]

    def predict(present: frozenset[int]) -> np.ndarray:
        absent = [i for i in range(n) if i not in present]
        arr = images.copy()
        arr[absent] = 0
        return model.predict(arr, geometry, missing=absent)
    return predict


def _channel_study(study: Any, wd: Path, *, progress: bool, **source: Any) -> Any:
    """Run ``study`` (evaluate over channel subsets, or explain) on the cases of :func:`_case_source`."""
    plans, cases = _case_source(wd, **source)
    classes = _classes(wd) or {}
    return study(((cid, _subset_predictor(m, arr, g), ref) for cid, m, arr, g, ref in cases),
                 len(plans.channel_names), list(plans.channel_names), list(classes), list(classes.values()),
                 progress=progress)


def evaluate_missing(workdir: str | os.PathLike[str], *, images: str | os.PathLike[str] | None = None,
                     labels: str | os.PathLike[str] | None = None, dataset: str | os.PathLike[str] | None = None,
                     configuration: str | None = None, folds: Sequence[str] | None = None, device: str = "auto",
                     tta: bool = False, max_cases: int | None = None, output: str | os.PathLike[str] | None = None,
                     progress: bool = True) -> Any:
    """Dice of the model with every non-empty subset of its input channels (the others absent).

    Args:
        workdir: work folder or bundle.
        images, labels: cases to score and their references (default: the cross-validation cases, each predicted
            by the fold that did not train on it).
        dataset: the training dataset for the CV cases (default: the one the work folder was planned from).
        configuration: which configuration (default: the ``find-best`` choice's first, else the only trained).
        folds: folds to use.
        device: where the networks run.
        tta: test-time mirroring (off by default: 2^C - 1 predictions per case already).
        max_cases: score at most this many cases.
        output: folder for ``missing_channels.json`` and ``.csv`` (default ``<workdir>/trust``).
        progress: show a progress bar.

    Returns:
        A :class:`~autoseg.evaluation.modalities.MissingModalitySummary` (``format_table()`` prints it).
    """
    from autoseg.evaluation.modalities import evaluate_missing as run

    wd = Path(workdir)
    summary = _channel_study(run, wd, images=images, labels=labels, dataset=dataset, configuration=configuration,
                             folds=folds, device=device, tta=tta, max_cases=max_cases, labels_required=True,
                             progress=progress)
    out = Path(output) if output is not None else wd / "trust"
    out.mkdir(parents=True, exist_ok=True)
    summary.save(out / "missing_channels.json")
    summary.write_csv(out / "missing_channels.csv")
    return summary


def explain(workdir: str | os.PathLike[str], images: str | os.PathLike[str], *, output: str | os.PathLike[str],
            labels: str | os.PathLike[str] | None = None, configuration: str | None = None,
            folds: Sequence[str] | None = None, device: str = "auto", tta: bool = False,
            max_cases: int | None = None, progress: bool = True, method: str | Sequence[str] = "shapley",
            layer: str | None = None, evaluate: bool = False) -> Any:
    """Explain the model on given cases: channel attribution (``method="shapley"``, the default) or spatial maps.

    **shapley**: exact Shapley values of each input channel per class (at most 5 channels: 2^C predictions per
    case). The value of a set of channels is the Dice against ``labels``, or against the all-channel prediction
    without labels; absent channels are blanked as in training dropout. Writes ``attribution.csv``,
    ``attribution.json`` and the bar chart ``attribution.png`` to ``output``.

    **gradcam, gradcam++, occlusion, attention** (one or several): per case, class and method a map in the
    input's geometry (``output/maps/``), an overlay PNG of the three slices with the most mass
    (``output/overlays/``) and ``output/explanations.csv``; see :mod:`autoseg.inference.saliency` for the
    methods, the target (the class's logits summed over the predicted mask, or over the reference with
    ``labels``) and ``layer`` (default ``decoder.0``, the last decoder stage). With ``evaluate``, deletion and
    insertion AUCs and the mass inside the reference, against a random and a distance baseline
    (:mod:`autoseg.evaluation.explanation_scores`), also written to ``output/explanation_scores.csv``.
    Spatial maps use one configuration (``configuration``, default the find-best choice's first) without
    mirroring.

    Returns:
        An :class:`~autoseg.evaluation.attribution.Attribution`, or for spatial methods a
        :class:`~autoseg.evaluation.spatial_explain.SpatialExplanation` (``format_table()`` prints either).

    Raises:
        EvaluationError: ``layer`` or ``evaluate`` with ``shapley``, a missing reference.
        InferenceError: an unknown method or layer, ``attention`` on a network without gates, captum missing.
    """
    methods = [method] if isinstance(method, str) else list(method)
    if methods != ["shapley"]:
        if "shapley" in methods:
            raise EvaluationError("shapley explains channels, the other methods voxels: run them separately.")
        return _explain_spatial(Path(workdir), images, Path(output), labels=labels, configuration=configuration,
                                folds=folds, device=device, max_cases=max_cases, progress=progress,
                                methods=methods, layer=layer, evaluate=evaluate)
    if layer is not None or evaluate:
        raise EvaluationError("--layer and --evaluate apply to the spatial methods (gradcam, gradcam++, occlusion, "
                              "attention), not to shapley.")
    from autoseg.evaluation.attribution import explain_cases

    result = _channel_study(explain_cases, Path(workdir), images=images, labels=labels, dataset=None,
                            configuration=configuration, folds=folds, device=device, tta=tta, max_cases=max_cases,
                            labels_required=False, progress=progress)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    result.write_csv(out / "attribution.csv")
    result.save(out / "attribution.json")
    result.plot(out / "attribution.png")
    return result


def _explain_spatial(wd: Path, images: str | os.PathLike[str], out: Path, *, labels: str | os.PathLike[str] | None,
                     configuration: str | None, folds: Sequence[str] | None, device: str, max_cases: int | None,
                     progress: bool, methods: list[str], layer: str | None, evaluate: bool) -> Any:
    """Spatial maps (and their scores) of every method on the cases in ``images``."""
    from autoseg.evaluation.explanation_scores import ExplanationEvaluation
    from autoseg.evaluation.spatial_explain import (
        SpatialExplanation,
        explain_case,
        prepare_case,
        score_case,
        targets,
        write_summary,
    )
    from autoseg.inference.inputs import collect_cases
    from autoseg.inference.predictor import Predictor
    from autoseg.inference.saliency import check_method, load_networks, resolve_layer
    from autoseg.io.image import file_ending
    from autoseg.io.model_folder import configuration_folder, trained_folds
    from autoseg.preprocessing.preprocess import read_case

    name = configuration or _default_configuration(wd)
    wanted = [str(f) for f in folds] if folds else trained_folds(configuration_folder(wd, name))
    nets = load_networks(wd, name, wanted)
    for m in methods:  # refuse before any work
        check_method(m, nets[0])
    if any(m.startswith("gradcam") for m in methods):
        resolve_layer(nets[0], layer)
    predictor = Predictor.from_workdir(wd, name, folds=wanted, device=device, tta=False)
    tgts = targets(predictor)
    cases = collect_cases([images], predictor.plans.channel_names)[:max_cases]
    if progress:
        from tqdm import tqdm
        cases = tqdm(cases, desc="explain", unit="case")
    out.mkdir(parents=True, exist_ok=True)
    rows, evaluation = [], ExplanationEvaluation() if evaluate else None
    for c in cases:
        arr, _, geometry = read_case(c.as_case_files())
        ending = file_ending(c.images[0])
        case = prepare_case(predictor, c.case_id, arr, geometry, _reference(labels, c.case_id, ending), tgts,
                            use_reference=labels is not None)
        maps, r = explain_case(predictor, nets, case, tgts, methods=methods, layer=layer, output=out, ending=ending)
        rows += r
        if evaluation is not None:
            evaluation.scores += score_case(predictor, case, tgts, maps)
    write_summary(out / "explanations.csv", rows)
    if evaluation is not None:
        evaluation.write_csv(out / "explanation_scores.csv")
    return SpatialExplanation(rows, evaluation)
