"""``autoseg report``: one self-contained HTML page describing a work folder.

The page has an overview and seven sections (fingerprint, plans, training, cross-validation, the chosen
model, worst cases, uncertainty). A section whose files do not exist yet says which command makes them; a
file that cannot be read gives a note in its section, never a failure of the whole report.
"""

from __future__ import annotations

import os
import shlex
from datetime import datetime
from pathlib import Path
from typing import Any

from autoseg.ensemble.postprocessing import PostprocessingRules
from autoseg.errors import AutosegError, ReportError
from autoseg.evaluation.metrics import classes_from_labels
from autoseg.evaluation.quality_rule import QualityRule
from autoseg.fingerprint.model import DatasetFingerprint
from autoseg.io.atomic import write_text_atomic
from autoseg.io.dataset import Dataset, load_dataset
from autoseg.planner.plans import Plans
from autoseg.report.collect import Loaded, dataset_folder, find_quality_tables, load, read_runs
from autoseg.report.cv import CVResults, from_folds, from_selection
from autoseg.report.html import Markup, command, esc, page, section
from autoseg.report.sections_data import fingerprint_section, plans_section
from autoseg.report.sections_selection import quality_section, selection_section, worst_section
from autoseg.report.sections_training import cv_section, training_section

#: the report's sections: anchor and title, in page order
CONTENTS = (("overview", "Overview"), ("fingerprint", "1. Dataset fingerprint"), ("plans", "2. Plans and why"),
            ("training", "3. Training"), ("cv", "4. Cross-validation"),
            ("selection", "5. Chosen model and postprocessing"), ("worst", "6. Worst cases"),
            ("quality", "7. Uncertainty and quality flags"))


DONE, NOT_DONE = "\u2713", "\u2013"


def _check(workdir: Path, dataset: Path | None, max_cases: int) -> None:
    if not workdir.is_dir():
        raise ReportError(f"{workdir}: work folder not found. Pass the folder given to `autoseg plan --workdir` "
                          "(it holds plans.json).")
    if not any((workdir / n).exists() for n in ("fingerprint.json", "plans.json", "models", "selection")):
        raise ReportError(f"{workdir}: not an autoseg work folder (no fingerprint.json, plans.json, models/ or "
                          "selection/). Run `autoseg plan DATASET --workdir FOLDER` first, or pass that folder.")
    if dataset is not None and not dataset.is_dir():
        raise ReportError(f"--dataset {dataset}: folder not found. Pass the dataset folder (with imagesTr/ and "
                          "labelsTr/), or leave it out to use the one recorded in source.json.")
    if isinstance(max_cases, bool) or not isinstance(max_cases, int) or max_cases < 0:
        raise ReportError(f"max_cases must be a whole number >= 0, got {max_cases!r}.")


def render_report(workdir: str | os.PathLike[str], *, dataset: str | os.PathLike[str] | None = None,
                  max_cases: int = 4, generated: str | None = None) -> str:
    """The report of a work folder as an HTML string (see :func:`write_report`).

    Args:
        workdir: the work folder.
        dataset: dataset folder for the worst-case images (default: the one in ``source.json``).
        max_cases: worst cases to draw.
        generated: the time stamp shown (default: now); the only part that differs between runs.

    Raises:
        ReportError: no work folder there, the dataset folder does not exist, or ``max_cases`` < 0.
    """
    wd = Path(workdir)
    override = Path(dataset) if dataset is not None else None
    _check(wd, override, max_cases)
    fingerprint = load(wd / "fingerprint.json", wd, "Rerun `autoseg plan` to recompute it.",
                       DatasetFingerprint.from_json)
    plans = load(wd / "plans.json", wd, "Rerun `autoseg plan` to rewrite it.", Plans.from_json)
    ds_path, ds_note = dataset_folder(wd, override)
    ds_arg = shlex.quote(str(ds_path)) if ds_path is not None else "DATASET"
    wd_arg = shlex.quote(str(wd))
    configs = list(plans.value.configurations) if plans.ok else []
    first = "3d_fullres" if "3d_fullres" in configs or not configs else configs[0]
    commands = {"plan": f"autoseg plan {ds_arg} --workdir {wd_arg}",
                "train": f"autoseg train {ds_arg} {first} cv --workdir {wd_arg}",
                "find_best": f"autoseg find-best --workdir {wd_arg}",
                "predict": f"autoseg predict -i INPUT_FOLDER -o OUTPUT_FOLDER --workdir {wd_arg} --uncertainty"}
    runs = read_runs(wd)
    fix = "Rerun `autoseg find-best` to rewrite it."
    best = load(wd / "selection" / "best.json", wd, fix)
    if best.ok and not isinstance(best.value, dict):
        best = Loaded(None, "selection/best.json: not a JSON object. " + fix)
    rules = load(wd / "selection" / "postprocessing.json", wd, fix, PostprocessingRules.from_json)
    rule = load(wd / "selection" / "quality.json", wd, fix, lambda _: QualityRule.load(wd / "selection" / "quality.json"))
    cv = from_selection(wd, best.value)
    if cv is None or not cv.entries:
        pooled = from_folds(runs)
        cv = CVResults(pooled.entries, notes=(cv.notes if cv is not None else []) + pooled.notes)
    labels = _labels(wd, plans, fingerprint)
    try:
        classes = classes_from_labels(labels)
    except AutosegError:
        classes = {}
    channels = plans.value.channel_names if plans.ok else (fingerprint.value.channel_names if fingerprint.ok else ())
    reference = cv.reference
    ds, ds_notes = None, [ds_note] if ds_note else []
    if reference is not None and max_cases > 0 and ds_path is not None:
        try:
            ds = load_dataset(ds_path)
        except AutosegError as err:
            ds_notes.append(f"the dataset cannot be read, so no images are shown: {err}")
    ending = _file_ending(wd, ds)
    name = (plans.value.dataset_name if plans.ok else fingerprint.value.dataset_name if fingerprint.ok else wd.name)
    body = [
        _overview(wd, fingerprint, plans, runs, best, commands),
        fingerprint_section(fingerprint, commands["plan"]),
        plans_section(plans, commands["plan"]),
        training_section(runs, configs, commands["train"]),
        cv_section(cv, commands["train"], commands["find_best"]),
        selection_section(best, rules, rule, commands["find_best"]),
        worst_section(reference, max_cases, ds, ds_notes, classes, channels[0] if channels else "channel 0", ending,
                      wd, commands["train"], _held_out_by(wd)),
        quality_section(runs, rule.value, find_quality_tables(wd), commands["predict" if runs else "train"]),
    ]
    from autoseg import __version__

    stamp = generated if generated is not None else datetime.now().astimezone().isoformat(timespec="seconds")
    meta = [f"work folder: {wd}", f"dataset: {ds_path if ds_path is not None else 'unknown (pass --dataset)'}",
            f"autoseg {__version__}"]
    return page(f"autoseg report: {name}", meta, CONTENTS, body, stamp)


def write_report(workdir: str | os.PathLike[str], output: str | os.PathLike[str] | None = None, *,
                 dataset: str | os.PathLike[str] | None = None, max_cases: int = 4) -> Path:
    """Write one self-contained HTML page describing a work folder: fingerprint, plans and their reasons,
    training curves, cross-validation Dice, the chosen model and postprocessing, the worst cases with image
    overlays, and quality flags. Sections whose files are missing say which command makes them.

    Args:
        workdir: the work folder (``autoseg plan --workdir``).
        output: the HTML file (default ``<workdir>/report.html``); written atomically.
        dataset: dataset folder the worst-case images are read from (default: the one ``source.json`` names).
        max_cases: how many of the worst CV cases to draw (0: none).

    Returns:
        The path written.

    Raises:
        ReportError: no work folder there, the dataset folder does not exist, or ``max_cases`` < 0.
        OSError: the output cannot be written.

    Example:
        >>> from autoseg.report import write_report
        >>> write_report("autoseg_work/Dataset001_Brain")  # doctest: +SKIP
        PosixPath('autoseg_work/Dataset001_Brain/report.html')
    """
    wd = Path(workdir)
    out = Path(output) if output is not None else wd / "report.html"
    text = render_report(wd, dataset=dataset, max_cases=max_cases)
    write_text_atomic(out, text)
    return out


def _labels(wd: Path, plans: Loaded, fingerprint: Loaded) -> dict[str, Any]:
    if plans.ok:
        return dict(plans.value.labels)
    if fingerprint.ok:
        return dict(fingerprint.value.labels)
    spec = load(wd / "dataset.json", wd, "").value
    return dict(spec["labels"]) if isinstance(spec, dict) and isinstance(spec.get("labels"), dict) else {}


def _held_out_by(wd: Path) -> dict[str, str]:
    """case -> the fold of ``splits.json`` whose validation set holds it."""
    splits = load(wd / "splits.json", wd, "").value
    out: dict[str, str] = {}
    for k, split in enumerate(splits if isinstance(splits, list) else []):
        val = split.get("val") if isinstance(split, dict) else None
        for case in val if isinstance(val, list) else []:
            out.setdefault(str(case), str(k))
    return out


def _file_ending(wd: Path, ds: Dataset | None) -> str:
    spec = load(wd / "dataset.json", wd, "").value
    ending = spec.get("file_ending") if isinstance(spec, dict) else None
    if isinstance(ending, str) and ending.startswith(".") and "/" not in ending:
        return ending
    return ds.spec.file_ending if ds is not None else ".nii.gz"


def _overview(wd: Path, fingerprint: Loaded, plans: Loaded, runs: list, best: Loaded,
              commands: dict[str, str]) -> Markup:
    splits = load(wd / "splits.json", wd, "").value
    n_splits = len(splits) if isinstance(splits, list) else None
    trained: dict[str, list[str]] = {}
    for r in runs:
        if r.finished:
            trained.setdefault(r.configuration, []).append(r.fold)
    steps = [
        ("fingerprint", fingerprint.ok, f"{len(fingerprint.value.cases)} cases" if fingerprint.ok else "",
         commands["plan"]),
        ("plans", plans.ok, ", ".join(plans.value.configurations) if plans.ok else "", commands["plan"]),
        ("training", bool(trained), "; ".join(
            f"{c}: {len(f)}{f' of {n_splits}' if n_splits else ''} fold(s) finished ({', '.join(f)})"
            for c, f in trained.items()), commands["train"]),
        ("find-best", best.ok, str(best.value.get("name", "")) if best.ok else "", commands["find_best"]),
    ]
    rows = "".join(f"<tr><td>{DONE if done else NOT_DONE}</td><th>{esc(what)}</th><td>{esc(detail)}</td></tr>"
                   for what, done, detail, _ in steps)
    todo = next((cmd for _, done, _, cmd in steps if not done), None)
    nxt = (f"<p>Next step: {command(todo)}</p>" if todo else
           f"<p>Every stage has run. Predict new cases with {command(commands['predict'].replace(' --uncertainty', ''))}"
           ".</p>")
    return section("overview", "Overview", [Markup(f'<div class="tw"><table class="kv status"><tbody>{rows}'
                                                   f"</tbody></table></div>{nxt}")])
