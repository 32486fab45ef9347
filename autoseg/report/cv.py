"""Cross-validation results for the report: Dice per case and class of every configuration or ensemble.

Where ``find-best`` has run, each candidate's ``selection/cv/<candidate>/summary.json`` is used (all candidates
on the same cases, plus the chosen one after postprocessing); before that, the validation summaries of the
trained folds (``models/<configuration>/fold_<k>/val/summary.json``) are pooled per configuration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.evaluation.summary import EvaluationSummary
from autoseg.io.model_folder import configuration_folder
from autoseg.report.collect import FoldRun, load, number, rel, safe_case_id


@dataclass
class CVEntry:
    """One row of the cross-validation table.

    Attributes:
        name: the candidate's name (``3d_fullres``, ``ensemble__2d__3d_fullres``, ...).
        label: a short display name (``2d + 3d_fullres``, ``3d_fullres + postprocessing``).
        members: the configurations and folds, in words.
        classes: class names, in order.
        cases: case -> class -> Dice (NaN where undefined).
        prediction_folders: where its CV segmentations are, searched in order.
        source: the file(s) the numbers come from (relative to the work folder).
        chosen: this is the pipeline ``find-best`` chose (after postprocessing when rules were kept).
    """

    name: str
    label: str
    members: str
    classes: list[str]
    cases: dict[str, dict[str, float]]
    prediction_folders: list[Path] = field(default_factory=list)
    source: str = ""
    chosen: bool = False

    def class_values(self, cls: str) -> list[float]:
        """Dice of ``cls`` per case, in case order (NaN where undefined)."""
        return [self.cases[c].get(cls, math.nan) for c in self.cases]

    def class_mean(self, cls: str) -> float:
        vals = [v for v in self.class_values(cls) if not math.isnan(v)]
        return float(np.mean(vals)) if vals else math.nan

    @property
    def foreground_mean(self) -> float:
        """Mean over classes of the class means (NaN when a class has no value; nnU-Net's convention)."""
        means = [self.class_mean(c) for c in self.classes]
        return float(np.mean(means)) if means else math.nan

    def case_mean(self, case: str) -> float:
        """Mean Dice over the classes of one case, ignoring undefined ones."""
        vals = [v for v in self.cases[case].values() if not math.isnan(v)]
        return float(np.mean(vals)) if vals else math.nan


@dataclass
class CVResults:
    """Every CV entry plus where they came from and what went wrong reading them."""

    entries: list[CVEntry] = field(default_factory=list)
    from_selection: bool = False
    metric: str = "dice"
    notes: list[str] = field(default_factory=list)

    @property
    def reference(self) -> CVEntry | None:
        """The entry worst cases are taken from: the chosen pipeline, else the best mean foreground Dice."""
        if not self.entries:
            return None
        chosen = [e for e in self.entries if e.chosen]
        if chosen:
            return chosen[0]
        scored = [e for e in self.entries if not math.isnan(e.foreground_mean)]
        return max(scored, key=lambda e: e.foreground_mean) if scored else self.entries[0]

    @property
    def classes(self) -> list[str]:
        seen: dict[str, None] = {}
        for e in self.entries:
            seen.update(dict.fromkeys(e.classes))
        return list(seen)


def members_text(members: Any) -> tuple[str, list[str]]:
    """``2d (fold 0) + 3d_fullres (folds 0, 1)`` and the configuration names."""
    parts, configs = [], []
    for m in members if isinstance(members, list) else []:
        if not isinstance(m, dict):
            continue
        cfg, folds = str(m.get("configuration", "?")), [str(f) for f in m.get("folds", []) or []]
        configs.append(cfg)
        parts.append(f"{cfg} (fold{'s' if len(folds) != 1 else ''} {', '.join(folds)})")
    return " + ".join(parts), configs


def _summary_cases(summary: EvaluationSummary) -> dict[str, dict[str, float]]:
    return {case: {cls: number(summary.cases[case].get(cls, {}).get("dice")) for cls in summary.classes}
            for case in sorted(summary.cases)}


def from_selection(workdir: Path, best: dict[str, Any] | None) -> CVResults | None:
    """CV entries of ``selection/cv_summary.json`` (None when find-best has not run or the file is unusable)."""
    sel = workdir / "selection"
    summary = load(sel / "cv_summary.json", workdir, "Rerun `autoseg find-best` to rewrite it.")
    if not summary.ok:
        return CVResults(notes=[summary.note]) if summary.note else None
    data = summary.value
    cands = data.get("candidates") if isinstance(data, dict) else None
    if not isinstance(cands, list):
        return CVResults(notes=["selection/cv_summary.json: no 'candidates' list. Rerun `autoseg find-best`."])
    out = CVResults(from_selection=True, metric=str(data.get("metric", "dice")))
    chosen = best.get("name") if isinstance(best, dict) else None
    post_kept = isinstance(best, dict) and bool(best.get("postprocessing"))
    for cand in cands:
        name = str(cand.get("name", "")) if isinstance(cand, dict) else ""
        if not name or not safe_case_id(name):
            out.notes.append(f"selection/cv_summary.json: a candidate without a usable name was skipped ({cand!r:.80}).")
            continue
        members, configs = members_text(cand.get("members"))
        label = " + ".join(configs) if len(configs) > 1 else name
        folders = [sel / "cv" / name] + ([configuration_folder(workdir, configs[0])]
                                         if len(configs) == 1 and safe_case_id(configs[0]) else [])
        names = [(name, label, folders, chosen == name and not post_kept)]
        if chosen == name and post_kept:
            names.append((f"{name}__postprocessed", f"{label} + postprocessing", [sel / "cv" / f"{name}__postprocessed"],
                          True))
        for folder_name, text, pred_folders, is_chosen in names:
            path = sel / "cv" / folder_name / "summary.json"
            loaded = load(path, workdir, "Rerun `autoseg find-best` to rewrite it.",
                          lambda d, p=path: EvaluationSummary.from_json(d, source=rel(p, workdir)))
            if not loaded.ok:
                out.notes.append(loaded.note or f"{rel(path, workdir)}: missing; rerun `autoseg find-best`.")
                continue
            s: EvaluationSummary = loaded.value
            out.entries.append(CVEntry(folder_name, text, members, list(s.classes), _summary_cases(s),
                                       pred_folders, rel(path, workdir), is_chosen))
    return out


def from_folds(runs: list[FoldRun]) -> CVResults:
    """Per configuration, the validation Dice of its trained folds pooled (before ``find-best``)."""
    out = CVResults()
    by_config: dict[str, list[FoldRun]] = {}
    for run in runs:
        if run.val_cases:
            by_config.setdefault(run.configuration, []).append(run)
    for cfg, folds in by_config.items():
        cases: dict[str, dict[str, float]] = {}
        for run in folds:
            cases.update(run.val_cases)
        classes = list(dict.fromkeys(c for run in folds for c in run.classes))
        names = [r.fold for r in folds]
        members = f"{cfg} (fold{'s' if len(names) != 1 else ''} {', '.join(names)})"
        out.entries.append(CVEntry(cfg, cfg, members, classes, dict(sorted(cases.items())),
                                   [folds[0].folder.parent],
                                   ", ".join(f"{r.folder.parent.name}/{r.folder.name}/val/summary.json" for r in folds)))
    return out


def prediction_file(entry: CVEntry, case: str, ending: str) -> Path | None:
    """The CV segmentation of ``case`` for ``entry``: in its selection folder, else in a fold's ``val/``."""
    if not safe_case_id(case):
        return None
    for folder in entry.prediction_folders:
        if (folder / f"{case}{ending}").is_file():
            return folder / f"{case}{ending}"
        for fold in sorted(p for p in folder.glob("fold_*") if p.is_dir()):
            if (fold / "val" / f"{case}{ending}").is_file():
                return fold / "val" / f"{case}{ending}"
    return None


def worst_cases(entry: CVEntry, n: int) -> list[str]:
    """The ``n`` cases with the lowest mean Dice over classes (undefined last; ties by case id)."""
    def key(case: str) -> tuple[float, str]:
        m = entry.case_mean(case)
        return (math.inf if math.isnan(m) else m, case)
    return sorted(entry.cases, key=key)[:max(n, 0)]
