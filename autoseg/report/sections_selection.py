"""Report sections about the chosen pipeline: the choice and its postprocessing, the worst CV cases with
overlays, and the uncertainty scores and quality flags."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.errors import AutosegError
from autoseg.evaluation.metrics import ClassSpec
from autoseg.evaluation.quality_rule import QualityRule
from autoseg.io.dataset import Dataset
from autoseg.report import figures
from autoseg.report.cases import load_case_view
from autoseg.report.collect import CsvTable, FoldRun, Loaded, rel
from autoseg.report.cv import CVEntry, members_text, prediction_file, worst_cases
from autoseg.report.html import (
    Markup,
    bullets,
    code,
    details,
    esc,
    figure,
    fmt,
    key_values,
    note,
    notes,
    section,
    table,
    unavailable,
)

#: rows of a quality table shown per configuration (the lowest scores first) and per quality.csv
MAX_QUALITY_ROWS = 15
MAX_CSV_ROWS = 40


def selection_section(best: Loaded, rules: Loaded, rule: Loaded, find_best_command: str) -> Markup:
    """Section 5: the pipeline find-best chose, its postprocessing rules and the quality-flag rule."""
    title = "5. Chosen model and postprocessing"
    body: list = [notes(n for n in (best.note, rules.note, rule.note) if n)]
    if not best.ok:
        body.append(unavailable("the chosen configuration or ensemble (selection/best.json)", find_best_command))
        return section("selection", title, body)
    b: dict[str, Any] = best.value if isinstance(best.value, dict) else {}
    body.append(key_values([
        ("chosen", str(b.get("name", "?"))),
        ("members", members_text(b.get("members"))[0] or "\u2013"),
        ("ranked by", f"mean foreground {b.get('metric', 'dice')} on {b.get('n_cases', '?')} CV case(s)"),
        ("CV score", fmt(b.get("score"))),
        ("after postprocessing", fmt(b.get("score_after_postprocessing"))),
    ]))
    if isinstance(b.get("predict_command"), str):
        body.append(Markup("<p>Predict new cases with this pipeline (<code>autoseg predict --workdir W</code> alone "
                           "does the same, since it reads best.json):</p>"))
        body.append(code(b["predict_command"]))
    body.append(Markup("<h3>Postprocessing</h3>"))
    if rules.ok:
        kept = rules.value.describe()
        body.append(bullets(kept) if kept else Markup(
            '<p>No rule kept: none improved the CV score, so predictions are used as they are.</p>'))
        tried = rules.value.describe(tried=True)
        if tried:
            body.append(details(f"Every rule tried on the CV predictions ({len(tried)}), kept only where it helped",
                                bullets(tried)))
    elif not rules.note:
        body.append(Markup('<p class="na">No postprocessing learnt (find-best ran with --no-postprocessing).</p>'))
    body.append(Markup("<h3>Quality flag</h3>"))
    if rule.ok:
        q: QualityRule = rule.value
        body.append(Markup(f"<p>A predicted case is flagged for review when its <b>{esc(q.score)}</b> score is at "
                           f"or below <b>{esc(f'{q.threshold:.4f}')}</b>, the threshold that catches the worst "
                           f"{esc(f'{q.fraction:.0%}')} of the {esc(q.n_cases)} CV case(s) of "
                           f"{esc(q.candidate or 'the chosen pipeline')}.</p>"))
        body.append(table(["quality score", "Spearman(1 \u2212 score, 1 \u2212 Dice)"],
                          [[k, fmt(v, 3)] for k, v in q.spearman.items()], numeric=(1,),
                          caption=f"How well each score ranks the real CV errors (1 = perfectly). Flag precision "
                                  f"{fmt(q.precision, 2)}, recall {fmt(q.recall, 2)}."))
    elif not rule.note:
        body.append(Markup('<p class="na">No quality rule learnt (the folds\' validation has no quality scores).</p>'))
    return section("selection", title, body, intro="What `autoseg find-best` chose on cross-validation "
                                                   "(selection/best.json, postprocessing.json, quality.json).")


def _fold_of(case: str, path: Path | None, folds: Mapping[str, str]) -> str:
    if path is not None and path.parent.name == "val" and path.parent.parent.name.startswith("fold_"):
        return path.parent.parent.name.removeprefix("fold_")
    return folds.get(case, "\u2013")


def worst_section(entry: CVEntry | None, n: int, dataset: Dataset | None, dataset_notes: Sequence[str],
                  classes: Mapping[str, ClassSpec], channel: str, ending: str, workdir: Path,
                  train_command: str, folds: Mapping[str, str]) -> Markup:
    """Section 6: the CV cases with the lowest mean Dice, each with image, reference and prediction overlays.

    ``folds`` maps a case to the CV fold that held it out (from ``splits.json``)."""
    title = "6. Worst cases"
    if entry is None:
        return section("worst", title, [unavailable("per-case CV Dice", train_command)])
    cases = worst_cases(entry, n)
    body: list = []
    files = {c: prediction_file(entry, c, ending) for c in cases}
    names = list(entry.classes)
    rows = [[c, _fold_of(c, files[c], folds), fmt(entry.case_mean(c)), *(fmt(entry.cases[c].get(k)) for k in names),
             rel(files[c], workdir) if files[c] else "not found"] for c in cases]
    body.append(table(["case", "fold", "mean Dice", *names, "prediction"], rows, numeric=range(1, 3 + len(names)),
                      caption=f"The {len(cases)} lowest of {len(entry.cases)} CV case(s) of {entry.label}, by mean "
                              "Dice over classes."))
    body.append(notes(dataset_notes))
    if dataset is None and not dataset_notes:
        body.append(note("the dataset folder is not known: pass --dataset to show the images."))
    by_id = {c.case_id: c for c in dataset.cases} if dataset is not None else {}
    for case in cases if dataset is not None else []:
        files_of = by_id.get(case)
        if files_of is None or not files_of.images:
            body.append(note(f"{case}: not in the dataset folder {dataset.root}; no image shown."))
            continue
        try:
            view = load_case_view(case, files_of.images[0], files_of.label, files[case], classes)
        except (AutosegError, OSError, ValueError, MemoryError) as err:
            body.append(note(f"{case}: cannot draw it ({err})."))
            continue
        uri = figures.case_panels(view, list(classes), channel, entry.cases[case])
        body.append(figure(uri, f"{case}: image, reference and prediction",
                           f"{case} ({view.where}, cropped around the structure): mean Dice "
                           f"{fmt(entry.case_mean(case))}."))
        body.append(notes(f"{case}: {p}." for p in view.problems))
    return section("worst", title, body, intro="Where the chosen model does worst on cross-validation: look here "
                                               "first for label errors, unusual images or systematic misses.")


def quality_section(runs: Sequence[FoldRun], rule: QualityRule | None, tables: Sequence[CsvTable],
                    predict_command: str) -> Markup:
    """Section 7: the per-case quality scores of the CV cases, their relation to Dice, and quality.csv tables."""
    title = "7. Uncertainty and quality flags"
    score = rule.score if rule is not None else "combined"
    by_config: dict[str, dict[str, tuple[str, dict[str, float], float]]] = {}
    for run in runs:
        for case, scores in run.quality.items():
            dice = [v for v in run.val_cases.get(case, {}).values() if not math.isnan(v)]
            by_config.setdefault(run.configuration, {})[case] = (run.fold, scores,
                                                                 float(np.mean(dice)) if dice else math.nan)
    body: list = []
    if not by_config and not tables:
        body.append(unavailable("quality scores (val/quality.json of trained folds, or quality.csv of predictions)",
                                predict_command))
        return section("quality", title, body)
    points = {}
    for cfg, cases in by_config.items():
        names = list(dict.fromkeys(k for _, s, _ in cases.values() for k in s))
        flag_here = rule is not None and rule.candidate == cfg
        ordered = sorted(cases.items(), key=lambda kv: (_num(kv[1][1].get(score)), kv[0]))
        rows = [[case, fold, *(fmt(s.get(k), 3) for k in names), fmt(dice, 3),
                 ("flagged" if rule.is_low(s) else "") if flag_here else ""]
                for case, (fold, s, dice) in ordered[:MAX_QUALITY_ROWS]]
        more = f" Showing the {MAX_QUALITY_ROWS} lowest of {len(ordered)}." if len(ordered) > MAX_QUALITY_ROWS else ""
        body.append(Markup(f"<h3>{esc(cfg)}</h3>"))
        body.append(table(["case", "fold", *names, "mean Dice", "flag"], rows, numeric=range(1, 3 + len(names)),
                          caption=f"Quality scores of the CV cases (higher = more trustworthy), lowest {score} "
                                  f"first.{more}"))
        xy = [(_num(s.get(score)), d) for _, s, d in cases.values()]
        xy = [(x, y) for x, y in xy if math.isfinite(x) and math.isfinite(y)]
        if xy:
            points[cfg] = ([x for x, _ in xy], [y for _, y in xy])
    if points:
        threshold = rule.threshold if rule is not None and rule.candidate in points else None
        body.append(figure(figures.quality_scatter(points, score, threshold), f"{score} against Dice",
                           "Each dot is a CV case: a useful score puts the low-Dice cases on the left."))
    for t in tables:
        body.append(Markup(f"<h3>{esc(t.path)}</h3>"))
        if t.note:
            body.append(note(t.note))
            continue
        more = f" Showing {MAX_CSV_ROWS} of {len(t.rows)} rows." if len(t.rows) > MAX_CSV_ROWS else ""
        body.append(table(t.head, t.rows[:MAX_CSV_ROWS], caption=f"Written by autoseg predict.{more}"))
    return section("quality", title, body, intro="How much to trust each segmentation: agreement under test-time "
                                                 "mirroring, confidence and the expected Dice, per case.")


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) else math.inf
