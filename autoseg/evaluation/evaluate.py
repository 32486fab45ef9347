"""Evaluate a folder of predictions against a folder of references.

:func:`evaluate_folder` pairs files by name (case id = file name minus the file ending), computes
:func:`~autoseg.evaluation.metrics.case_metrics` for every case (in worker processes with ``jobs > 1``),
writes ``summary.json`` and ``cases.csv`` atomically and returns an
:class:`~autoseg.evaluation.summary.EvaluationSummary`.
:func:`evaluate_pairs` does the same for an explicit list of ``(case_id, pred_path, ref_path)``.

Metrics use the reference's spacing. A prediction whose array shape differs from its reference, or whose
spacing differs by more than 0.1 %, is an error naming both files.

``summary.json`` layout (NaN is written as ``null``)::

    {"version": 1, "classes": {name: label or [labels]}, "settings": {...}, "notes": [...],
     "mean": {class: {metric: v}}, "foreground_mean": {metric: v}, "median": {class: {metric: v}},
     "cases": {case: {class: {metric: v}}}}

Means ignore NaN cases (both masks empty); ``foreground_mean`` averages the per-class means and is NaN
when one of them is NaN, as in nnU-Net.

Example::

    summary = evaluate_folder("predictions", "Dataset001/labelsTr", dataset_json="Dataset001/dataset.json")
    print(summary.format_table())
    summary.foreground_mean("dice")
"""

from __future__ import annotations

import inspect
import math
import os
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.evaluation.lesions import lesion_metrics
from autoseg.evaluation.metrics import ClassSpec, EvaluationError, case_metrics, classes_from_labels
from autoseg.evaluation.summary import EvaluationSummary, normalise_classes, to_json_value
from autoseg.evaluation.surface import IMPLEMENTATION
from autoseg.io.dataset import DatasetSpec, read_dataset_json
from autoseg.io.image import SUPPORTED_ENDINGS, read_label
from autoseg.io.image import file_ending as ending_of
from autoseg.parallel import imap_ordered

SPACING_RTOL = 1e-3
_LESION_DEFAULTS = {k: p.default for k, p in inspect.signature(lesion_metrics).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY}
LESION_IMPLEMENTATION = ("lesion-wise: BraTS 2023 rules (reference dilated by a full cube, full-connectivity "
                         "components, lesion score vs union of touching predicted components, missed lesion and "
                         "false positive = Dice 0 / HD95 penalty)")


def _check_pair(pred_path: str, ref_path: str, pred_shape: tuple[int, ...], ref_shape: tuple[int, ...],
                pred_spacing: tuple[float, ...], ref_spacing: tuple[float, ...]) -> None:
    if pred_shape != ref_shape:
        raise EvaluationError(
            f"{pred_path}: prediction shape {pred_shape} differs from the reference {ref_path} shape "
            f"{ref_shape}. Predict on the reference images (same grid), or resample the prediction onto the "
            "reference's grid, before evaluating.")
    if any(abs(p - r) > SPACING_RTOL * abs(r) for p, r in zip(pred_spacing, ref_spacing, strict=True)):
        raise EvaluationError(
            f"{pred_path}: spacing {pred_spacing} differs from the reference {ref_path} spacing {ref_spacing} "
            f"by more than {SPACING_RTOL:.1%}. The prediction was saved with another geometry; write it with the "
            "reference's geometry (or resample it) before evaluating.")


def _evaluate_case(item: tuple[str, str, str, dict[str, ClassSpec], dict[str, Any]]) -> tuple[str, Any]:
    """Worker: read one pair, check it and compute its metrics (module-level for the process pool)."""
    case_id, pred_path, ref_path, classes, options = item
    pred, ref = read_label(pred_path), read_label(ref_path)
    _check_pair(pred_path, ref_path, pred.array.shape, ref.array.shape, pred.geometry.spacing,
                ref.geometry.spacing)
    return case_id, case_metrics(pred.array, ref.array, classes, ref.geometry.array_spacing, **options)


def _label_values_in(path: str) -> list[int]:
    """Worker: the distinct values of a label file."""
    return [int(v) for v in np.unique(read_label(path).array)]


def evaluate_pairs(pairs: Sequence[tuple[str, str | os.PathLike[str], str | os.PathLike[str]]],
                   classes: Mapping[str, int | Sequence[int]], *, ignore_label: int | None = None,
                   tolerance_mm: float = 1.0, lesion_wise: bool = True, surface: bool = True,
                   lesion_kwargs: Mapping[str, Any] | None = None, jobs: int = 1,
                   progress: bool = True, annotated: Mapping[str, Collection[str]] | None = None) -> EvaluationSummary:
    """Evaluate explicit ``(case_id, pred_path, ref_path)`` pairs.

    Args:
        pairs: one ``(case_id, prediction file, reference file)`` per case.
        classes: class name -> label value or region (list/tuple of label values).
        ignore_label: reference value excluded from every metric.
        tolerance_mm: NSD tolerance in mm.
        lesion_wise: also compute lesion-wise metrics.
        surface: also compute the surface metrics (HD95, ASSD, NSD); overlap metrics alone are ~10x faster.
        lesion_kwargs: options of :func:`~autoseg.evaluation.lesions.lesion_metrics`.
        jobs: worker processes (1 = in this process).
        progress: show a progress bar.
        annotated: partially annotated cases: case id -> the classes annotated in it
            (:func:`~autoseg.io.annotations.dataset_annotations`); the other classes' metrics of that case are NaN,
            so the means skip them instead of counting a miss. Cases not listed are fully annotated.

    Returns:
        The summary (cases in the order given).

    Raises:
        EvaluationError: no classes, duplicate case ids, unknown lesion options, or a prediction whose
            shape or spacing differs from its reference.
        ImageReadError: a file cannot be read.
    """
    cls = normalise_classes(classes)
    if not cls:
        raise EvaluationError("no classes to evaluate; give dataset.json labels or at least one class "
                              "(name -> label value).")
    ids = [str(p[0]) for p in pairs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise EvaluationError(f"case id(s) {', '.join(dup)} appear more than once; give each case once.")
    lesion_opts = dict(lesion_kwargs or {})
    unknown = sorted(set(lesion_opts) - set(_LESION_DEFAULTS))
    if unknown:
        raise EvaluationError(f"unknown lesion option(s) {', '.join(unknown)}; valid: "
                              f"{', '.join(_LESION_DEFAULTS)}.")
    options = {"ignore_label": ignore_label, "tolerance_mm": float(tolerance_mm), "lesion_wise": lesion_wise,
               "surface": surface, "lesion_kwargs": lesion_opts}
    items = [(str(cid), str(p), str(r), cls, options) for cid, p, r in pairs]
    cases = dict(imap_ordered(_evaluate_case, items, jobs=jobs, desc="evaluating", label=lambda it: it[0],
                              progress=progress))
    settings = {
        "tolerance_mm": float(tolerance_mm),
        "ignore_label": ignore_label,
        "lesion_wise": bool(lesion_wise),
        "surface": bool(surface),
        "lesion": {**_LESION_DEFAULTS, **lesion_opts} if lesion_wise else None,
        "spacing": "reference file's spacing",
        "implementation": IMPLEMENTATION + ("; " + LESION_IMPLEMENTATION if lesion_wise else ""),
    }
    for cid, names in (annotated or {}).items():
        for name, metrics in cases.get(cid, {}).items():
            if name not in names:
                metrics.update({m: math.nan for m in metrics})
    return EvaluationSummary(classes=cls, cases=cases, settings=to_json_value(settings, "settings"))


def detect_file_ending(folder: Path) -> str:
    """The most common supported file ending among the files of ``folder``.

    Raises:
        EvaluationError: the folder holds no supported image file.
    """
    counts = Counter(ending_of(p) for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    found = [e for e in SUPPORTED_ENDINGS if counts.get(e)]
    if not found:
        raise EvaluationError(f"{folder}: no image files found (looked for {', '.join(SUPPORTED_ENDINGS)}). "
                              "Check the folder, or give the file ending (or a dataset.json).")
    return max(found, key=lambda e: counts[e])


def _case_files(folder: Path, ending: str) -> dict[str, Path]:
    return {p.name[: -len(ending)]: p for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(ending.lower())
            and len(p.name) > len(ending)}


def _listing(ids: Sequence[str], limit: int = 50) -> str:
    return ", ".join(ids[:limit]) + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def evaluate_folder(pred_dir: str | os.PathLike[str], ref_dir: str | os.PathLike[str], *,
                    dataset_json: str | os.PathLike[str] | DatasetSpec | None = None,
                    classes: Mapping[str, int | Sequence[int]] | None = None, ignore_label: int | None = None,
                    file_ending: str | None = None, allow_missing: bool = False,
                    output: str | os.PathLike[str] | None = None, tolerance_mm: float = 1.0,
                    lesion_wise: bool = True, lesion_kwargs: Mapping[str, Any] | None = None, jobs: int = 1,
                    progress: bool = True) -> EvaluationSummary:
    """Evaluate every reference in ``ref_dir`` against the prediction of the same name in ``pred_dir``.

    Classes: ``classes`` when given, else the labels of ``dataset_json`` (background and ``ignore``
    skipped, lists as regions), else every nonzero value found in the references (named by value).
    The ignore label defaults to dataset.json's ``ignore`` entry. The file ending is ``file_ending``, else
    dataset.json's, else the most common supported ending in ``ref_dir``.

    Args:
        pred_dir: folder of predicted label files.
        ref_dir: folder of reference label files.
        dataset_json: path of a dataset.json (or a parsed ``DatasetSpec``) giving labels, ignore label and
            file ending.
        classes: class name -> label value or region; overrides dataset.json's labels.
        ignore_label: reference value excluded from every metric.
        file_ending: e.g. ``".nii.gz"``.
        allow_missing: evaluate only the references that have a prediction (noted in the summary)
            instead of failing.
        output: folder for ``summary.json`` and ``cases.csv`` (default ``pred_dir``).
        tolerance_mm, lesion_wise, lesion_kwargs, jobs, progress: as in :func:`evaluate_pairs`.

    Returns:
        The summary, also written to ``output``.

    Raises:
        EvaluationError: a folder is missing or empty, references lack predictions (all listed), no
            class to evaluate, or a prediction does not match its reference.
        DatasetError: dataset.json is missing or malformed.
        ImageReadError: a file cannot be read.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    for folder, what in ((pred_dir, "prediction"), (ref_dir, "reference")):
        if not folder.is_dir():
            raise EvaluationError(f"{folder}: {what} folder not found. Check the path.")
    spec = dataset_json if isinstance(dataset_json, DatasetSpec) or dataset_json is None \
        else read_dataset_json(Path(dataset_json))
    ending = file_ending or (spec.file_ending if spec is not None else None) or detect_file_ending(ref_dir)
    refs, preds = _case_files(ref_dir, ending), _case_files(pred_dir, ending)
    if not refs:
        raise EvaluationError(f"{ref_dir}: no reference files ending in '{ending}'. Check the folder and the "
                              "file ending.")
    missing = sorted(set(refs) - set(preds))
    notes: list[str] = []
    if missing and not allow_missing:
        raise EvaluationError(
            f"{pred_dir}: {len(missing)} of {len(refs)} reference case(s) in {ref_dir} have no prediction "
            f"'<case>{ending}': {_listing(missing)}. Predict them, or allow missing predictions "
            "(`--allow-missing`; allow_missing=True in Python) to evaluate only the cases present.")
    if missing:
        notes.append(f"{len(missing)} reference case(s) without a prediction were skipped: {_listing(missing)}")
    extra = sorted(set(preds) - set(refs))
    if extra:
        notes.append(f"{len(extra)} prediction(s) without a reference were ignored: {_listing(extra)}")
    case_ids = sorted(set(refs) & set(preds))
    if not case_ids:
        raise EvaluationError(f"{pred_dir}: none of the {len(refs)} reference cases has a prediction "
                              f"'<case>{ending}'. Check the folder and the file ending.")
    if ignore_label is None and spec is not None:
        ignore_label = spec.ignore_label
    if classes is not None:
        eval_classes = normalise_classes(classes)
    elif spec is not None:
        eval_classes = classes_from_labels(spec.labels)
    else:
        values: set[int] = set()
        for vals in imap_ordered(_label_values_in, [str(refs[c]) for c in case_ids], jobs=jobs,
                                 desc="reading labels", progress=progress):
            values.update(vals)
        eval_classes = {str(v): v for v in sorted(values - {0, ignore_label})}
        if not eval_classes:
            raise EvaluationError(f"{ref_dir}: the references hold no foreground label; give the classes "
                                  "(or a dataset.json) to evaluate.")
    summary = evaluate_pairs([(c, preds[c], refs[c]) for c in case_ids], eval_classes, ignore_label=ignore_label,
                             tolerance_mm=tolerance_mm, lesion_wise=lesion_wise, lesion_kwargs=lesion_kwargs,
                             jobs=jobs, progress=progress)
    summary.notes = notes
    summary.settings.update({"pred_dir": str(pred_dir), "ref_dir": str(ref_dir), "file_ending": ending})
    out = Path(output) if output is not None else pred_dir
    summary.save(out / "summary.json")
    summary.write_csv(out / "cases.csv")
    return summary
