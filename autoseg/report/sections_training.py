"""Report sections about training and cross-validation: curves per fold, Dice per class of every candidate."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from autoseg.report import figures
from autoseg.report.collect import FoldRun
from autoseg.report.cv import CVResults
from autoseg.report.html import Markup, esc, figure, fmt, notes, section, table, unavailable


def duration(seconds: float) -> str:
    """``42 s``, ``12.5 min``, ``3.2 h`` (an en dash when unknown)."""
    if not math.isfinite(seconds) or seconds <= 0:
        return "\u2013"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _state(run: FoldRun) -> str:
    if run.finished:
        return "finished"
    if run.has_latest:
        return "stopped or running (resumable)"
    return "started" if run.records else "no log yet"


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def validation_dice(run: FoldRun) -> float:
    """Mean over classes of the per-class mean validation Dice of a fold (NaN when not validated)."""
    if not run.val_cases:
        return math.nan
    means = [_nanmean([c.get(k, math.nan) for c in run.val_cases.values()]) for k in run.classes]
    return float(np.mean(means)) if means else math.nan


def _best_ema(run: FoldRun) -> str:
    ema = run.series("ema_fg_dice")
    if not ema or all(math.isnan(v) for v in ema):
        return "\u2013"
    i = int(np.nanargmax(ema))
    return f"{ema[i]:.4f} (epoch {int(run.series('epoch')[i])})"


def _last(run: FoldRun, key: str) -> float:
    values = [v for v in run.series(key) if not math.isnan(v)]
    return values[-1] if values else math.nan


def training_section(runs: Sequence[FoldRun], planned: Sequence[str], train_command: str) -> Markup:
    """Section 3: one row per fold and, per configuration, its loss, pseudo Dice and learning-rate curves."""
    title = "3. Training"
    if not runs:
        return section("training", title, [unavailable("training logs (models/<configuration>/fold_<k>/log.jsonl)",
                                                       train_command)])
    rows = [[r.configuration, r.fold, _state(r), fmt(len(r.records)), fmt(_last(r, "train_loss")),
             fmt(_last(r, "val_loss")), _best_ema(r), duration(float(np.nansum(r.series("epoch_time")))),
             fmt(validation_dice(r)), fmt(len(r.val_cases)) if r.val_cases else "\u2013"] for r in runs]
    body: list = [table(["configuration", "fold", "state", "epochs", "train loss", "val loss",
                         "best pseudo Dice (EMA)", "time", "validation Dice", "val cases"], rows,
                        numeric=(3, 4, 5, 7, 8, 9),
                        caption="Losses of the last epoch (Dice + cross-entropy, so below zero is normal). Pseudo "
                                "Dice: online validation on patches. Validation Dice: full held-out cases after "
                                "training (val/summary.json), mean over classes.")]
    trained = {r.configuration for r in runs}
    missing = [c for c in planned if c not in trained]
    if missing:
        body.append(Markup(f'<p class="na">Planned but not trained yet: {esc(", ".join(missing))}.</p>'))
    for cfg in dict.fromkeys(r.configuration for r in runs):
        logged = [r for r in runs if r.configuration == cfg and r.records]
        body.append(Markup(f"<h3>{esc(cfg)}</h3>"))
        if not logged:
            body.append(Markup('<p class="na">No epoch records in log.jsonl yet.</p>'))
            continue
        body.append(figure(figures.training_curves(logged), f"training curves of {cfg}",
                           f"{cfg}: fold{'s' if len(logged) > 1 else ''} {', '.join(r.fold for r in logged)} "
                           f"(models/{cfg}/fold_*/log.jsonl)"))
    body.append(notes(n for r in runs for n in r.notes))
    return section("training", title, body, intro="Each fold's training log (models/<configuration>/fold_<k>/).")


def cv_section(results: CVResults, train_command: str, find_best_command: str) -> Markup:
    """Section 4: Dice per class of each configuration or ensemble, and box plots of the per-case Dice."""
    title = "4. Cross-validation"
    body: list = [notes(results.notes)]
    if not results.entries:
        body.append(unavailable("cross-validation Dice (validation of trained folds)", train_command))
        return section("cv", title, body)
    classes = results.classes
    entries = sorted(results.entries, key=lambda e: (-e.foreground_mean if not math.isnan(e.foreground_mean)
                                                     else math.inf))
    rows = [[e.label + (" \u2190 chosen" if e.chosen else ""), e.members, fmt(len(e.cases)),
             *(fmt(e.class_mean(c)) for c in classes), fmt(e.foreground_mean)] for e in entries]
    caption = ("Mean Dice over the CV cases (all candidates on the same cases, from selection/cv/<candidate>/"
               "summary.json); mean = mean of the class means." if results.from_selection else
               "Mean Dice over each configuration's validated cases (models/<configuration>/fold_<k>/val/"
               "summary.json); configurations may cover different cases until find-best compares them.")
    body.append(table(["configuration / ensemble", "members", "cases", *classes, "mean"], rows,
                      numeric=range(2, 4 + len(classes)), highlight=[i for i, e in enumerate(entries) if e.chosen],
                      caption=caption))
    if not results.from_selection:
        body.append(unavailable("the comparison of configurations and ensembles on the same cases",
                                find_best_command))
    if classes and any(e.cases for e in entries):
        body.append(figure(figures.dice_boxes(entries, classes), "per-case Dice per class",
                           "Per-case Dice of each class; boxes span the quartiles, dots are cases."))
    return section("cv", title, body, intro="How well each trained configuration (and ensemble) segments the "
                                            "held-out cases of cross-validation.")
