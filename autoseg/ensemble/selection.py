"""``find-best``: pick the configuration or ensemble that is best on cross-validation, then learn postprocessing.

Candidates are every trained configuration (its folds' validation predictions together cover the training cases)
and every ensemble of two or more of them (their validation probabilities averaged, nnU-Net's ensembling; it
tries pairs only, we try every subset). All candidates are scored on the same cases (those every configuration has
a validation prediction for) against ``labelsTr`` with :mod:`autoseg.evaluation`; the best mean foreground score
wins (ties: fewer members first). Postprocessing rules are then learnt on the winner's CV predictions and kept
only where they improve the CV score (:mod:`autoseg.ensemble.postprocessing`).

Files written in ``<workdir>/selection/``: ``cv/<candidate>/`` (ensembled CV predictions and each candidate's
``summary.json`` and ``cases.csv``), ``cv_summary.json`` (every candidate's score), ``best.json`` (the choice),
``postprocessing.json`` (the rules), ``quality.json`` (the quality flag's threshold and the Spearman correlation
between each quality score and the real CV errors, :mod:`autoseg.evaluation.quality`). ``autoseg predict`` uses
``best.json``, its postprocessing and the quality threshold by default.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoseg.ensemble.candidates import (
    LOWER_IS_BETTER,
    METRICS,
    Candidate,
    CVScoring,
    best_candidate,
    ensemble_candidates,
)
from autoseg.ensemble.choice import BEST, POSTPROCESSING, QUALITY_RULE, SELECTION, BestChoice, Member, load_best  # noqa: F401
from autoseg.ensemble.imported_cv import missing_probabilities
from autoseg.ensemble.learning import CasePair, learn_postprocessing
from autoseg.ensemble.postprocessing import PostprocessingRules, postprocess_job
from autoseg.errors import FileFormatError, SelectionError
from autoseg.evaluation.metrics import class_values, classes_from_labels
from autoseg.evaluation.quality import calibrate_quality, case_errors
from autoseg.evaluation.quality import describe as describe_quality
from autoseg.evaluation.quality_rule import QualityRule
from autoseg.evaluation.summary import EvaluationSummary
from autoseg.inference.export import probabilities_path
from autoseg.inference.uncertainty import combined_score
from autoseg.io.annotations import dataset_annotations
from autoseg.io.atomic import read_json, write_json_atomic
from autoseg.io.dataset import Dataset, dataset_source, load_dataset
from autoseg.io.model_folder import IMPORTED_FROM, configuration_folder, fold_folder
from autoseg.networks.checkpoint import FINAL
from autoseg.planner.plans import Plans
from autoseg.training.splits import load_splits
from autoseg.training.validation import QUALITY


@dataclass
class Selection:
    """What :func:`find_best` decided (``best.json`` holds the same)."""

    metric: str
    candidates: list[Candidate]
    best: Candidate
    final: EvaluationSummary
    rules: PostprocessingRules | None
    folder: Path
    notes: list[str] = field(default_factory=list)
    quality: QualityRule | None = None

    def predict_command(self, workdir: Path) -> str:
        """The explicit command that reproduces the chosen pipeline (``autoseg predict --workdir W`` alone also
        does, since it reads ``best.json``)."""
        parts = ["autoseg", "predict", "-i", "INPUT_FOLDER", "-o", "OUTPUT_FOLDER", "--workdir", str(workdir),
                 "-c", *[m.configuration for m in self.best.members],
                 "-f", *self.best.members[0].folds]
        parts += ["--postprocessing", str(self.folder / POSTPROCESSING)] if self.rules and not self.rules.is_empty \
            else ["--postprocessing", "none"]
        return " ".join(shlex.quote(p) if p not in ("INPUT_FOLDER", "OUTPUT_FOLDER") else p for p in parts)

    def format_table(self) -> str:
        """Candidates ranked, then the chosen pipeline's per-class CV table and its postprocessing."""
        lower = self.metric in LOWER_IS_BETTER
        ranked = sorted(self.candidates, key=lambda c: (c.score if lower else -c.score, len(c.members)))
        width = max(len(c.name) for c in ranked)
        n = len(self.best.predictions)
        lines = [f"cross-validation ({n} case(s)), mean foreground {self.metric}:"]
        for c in ranked:
            mark = "  <- best" if c is self.best else ""
            lines.append(f"  {c.name.ljust(width)}  {c.score:.4f}{mark}")
        if self.rules is not None:
            lines.append("postprocessing (kept only where it improves the CV score):")
            lines += [f"  {d}" for d in self.rules.describe()] or ["  none kept"]
            rejected = sum(not t.get("accepted") for t in self.rules.tried)
            if rejected:
                lines.append(f"  {rejected} candidate rule(s) rejected; {self.folder / POSTPROCESSING} lists each "
                             "with its CV score ('tried')")
        lines.append(f"chosen pipeline on CV, after postprocessing ({self.best.name}):")
        lines.append(self.final.format_table())
        if self.quality is not None:
            lines += describe_quality(self.quality)
        return "\n".join(lines)


def _cv_folds(workdir: Path, configuration: str, n_folds: int) -> list[str]:
    """The CV folds of a configuration that have a final checkpoint."""
    return [str(k) for k in range(n_folds) if (fold_folder(workdir, configuration, k) / FINAL).is_file()]


def find_best(workdir: str | os.PathLike[str], *, dataset: Dataset | str | os.PathLike[str] | None = None,
              metric: str = "dice", configurations: Sequence[str] | None = None, ensembles: bool = True,
              postprocessing: bool = True, jobs: int = 1, progress: bool = True, device: str = "auto",
              on_note: Callable[[str], None] | None = None) -> Selection:
    """Evaluate every trained configuration and ensemble on cross-validation, choose the best, learn postprocessing.

    Missing validation outputs (a fold trained with ``--no-validation``, or without probabilities when ensembles
    are needed) are computed first from the fold's final checkpoint.

    Args:
        workdir: the work folder (``models/<configuration>/fold_<k>/``, ``splits.json``).
        dataset: the dataset (for ``labelsTr``); default: the one the work folder was planned from.
        metric: ranking metric, the mean over foreground classes (``dice``, ``nsd``, ``iou``, ``lesion_dice``;
            ``hd95``, ``assd``, ``lesion_hd95`` are minimised).
        configurations: candidates (default: every configuration with a trained CV fold).
        ensembles: also try ensembles of two or more configurations.
        postprocessing: learn postprocessing rules for the winner.
        jobs: worker processes for evaluation and ensembling.
        progress: show progress bars.
        device: for validation outputs that must be computed.
        on_note: called with each note (what is being computed and why).

    Returns:
        The selection (``format_table()`` prints the CV table); files are written to ``<workdir>/selection``.

    Raises:
        SelectionError: nothing trained, no reference labels, an unknown metric.
    """
    wd = Path(workdir)
    note = on_note or (lambda m: None)
    if metric not in METRICS:
        raise SelectionError(f"metric {metric!r} is not known; use one of {', '.join(METRICS)}.")
    plans = Plans.load(wd / "plans.json")
    ds = _resolve_dataset(wd, dataset)
    splits = load_splits(wd / "splits.json") if (wd / "splits.json").is_file() else []
    names, folds = _cv_configurations(wd, plans, splits, configurations)
    need_npz = ensembles and len(names) > 1
    files: dict[str, dict[str, Path]] = {}
    for c in names:  # an imported model's CV results are nnU-Net's: never recomputed here
        imported = (configuration_folder(wd, c) / IMPORTED_FROM).is_file()
        files[c] = _validation_files(ds, plans, wd, c, folds[c], splits, need_npz and not imported, device=device,
                                     progress=progress, note=note)
    refs, common = _common_cases(wd, ds, names, files, note)
    classes = classes_from_labels(plans.labels)
    out = wd / SELECTION
    (out / "cv").mkdir(parents=True, exist_ok=True)
    scoring = CVScoring(common, refs, classes, ds.spec.ignore_label, ds.spec.file_ending, metric, out / "cv",
                        jobs=jobs, progress=progress, annotated=dataset_annotations(ds))
    candidates = [Candidate(c, [Member(c, tuple(folds[c]))], {cid: files[c][cid] for cid in common}) for c in names]
    members = _with_probabilities(wd, names, files, note) if need_npz else []
    if len(members) > 1:
        candidates += ensemble_candidates(members, folds, files, scoring, note)
    for cand in candidates:
        note(f"evaluating {cand.name}")
        scoring.evaluate(cand)
    best = best_candidate(candidates, metric)
    rules, final = _postprocess_winner(best, scoring, out, postprocessing, note)
    quality = calibrate_quality(_cv_quality(wd, best.members, splits, common), case_errors(final, "dice"),
                                candidate=best.name)
    if quality is not None:
        quality.save(out / QUALITY_RULE)
    selection = Selection(metric, candidates, best, final, rules, out, quality=quality)
    _write_records(selection, wd, common)
    return selection


def _cv_configurations(wd: Path, plans: Plans, splits: list, configurations: Sequence[str] | None
                       ) -> tuple[list[str], dict[str, list[str]]]:
    """The configurations to compare (the named ones, else every one with a trained CV fold) and their CV folds.

    Raises:
        SelectionError: none has a trained CV fold, or a named one has none.
    """
    names = list(configurations) if configurations else [
        c for c in plans.configurations if splits and _cv_folds(wd, c, len(splits))]
    names = [c for c in names if c in plans.configurations]
    if not names:
        raise SelectionError(f"{wd}: no configuration has a trained cross-validation fold (models/<config>/fold_<k>/"
                             f"{FINAL}); train some with `autoseg train DATASET CONFIG cv`.")
    folds = {c: _cv_folds(wd, c, len(splits)) for c in names}
    untrained = [c for c in names if not folds[c]]
    if untrained:
        raise SelectionError(f"{wd}: {', '.join(untrained)} has no trained cross-validation fold; train it or leave "
                             "it out of --configurations.")
    return names, folds


def _validation_files(ds: Dataset, plans: Plans, wd: Path, configuration: str, folds: Sequence[str], splits: list,
                      need_npz: bool, *, device: str, progress: bool, note: Callable[[str], None]) -> dict[str, Path]:
    """Case -> validation segmentation of the folds. Folds whose validation outputs are incomplete (a segmentation
    or the quality scores missing, or probabilities when ``need_npz``) are recomputed first."""
    files, incomplete = {}, set()
    for f in folds:
        val = fold_folder(wd, configuration, f) / "val"
        paths = {cid: val / f"{cid}{ds.spec.file_ending}" for cid in splits[int(f)].val}
        if not all(p.is_file() for p in paths.values()) or (paths and not (val / QUALITY).is_file()):
            incomplete.add(f)
        files.update(paths)
    if need_npz:
        incomplete |= {f for f in folds if any(not probabilities_path(files[cid]).is_file()
                                               for cid in splits[int(f)].val)}
    if incomplete:
        _revalidate(ds, plans, wd, configuration, sorted(incomplete), device=device, progress=progress, note=note)
    return files


def _with_probabilities(wd: Path, names: Sequence[str], files: dict[str, dict[str, Path]],
                        note: Callable[[str], None]) -> list[str]:
    """The configurations that can be ensembled: all but imported ones whose CV results lack probabilities."""
    out = []
    for c in names:
        bare = missing_probabilities(wd, c, files[c])
        if bare:
            note(f"{c}: imported without CV probabilities for {len(bare)} case(s) (nnU-Net trained without --npz); "
                 "it is scored and can be chosen alone, but no ensemble includes it. To ensemble it, rerun nnU-Net's "
                 "validation with `nnUNetv2_train DATASET CONFIG FOLD --val --npz` and import the model again.")
        else:
            out.append(c)
    return out


def _common_cases(wd: Path, ds: Dataset, names: Sequence[str], files: dict[str, dict[str, Path]],
                  note: Callable[[str], None]) -> tuple[dict[str, Path], list[str]]:
    """The reference labels, and the cases every configuration has a validation prediction and a label for.

    Raises:
        SelectionError: there is no such case.
    """
    refs = {case.case_id: case.label for case in ds.cases if case.label is not None}
    common = sorted(set(refs).intersection(*[set(files[c]) for c in names]))
    if not common:
        raise SelectionError(f"{wd}: no case has both a validation prediction and a reference label in {ds.root}.")
    partial = [c for c in names if len(files[c]) < len(refs)]
    if partial:
        note(f"{', '.join(partial)}: not every fold is trained; all candidates are compared on the {len(common)} "
             f"case(s) with predictions from every configuration.")
    return refs, common


def _postprocess_winner(best: Candidate, scoring: CVScoring, out: Path, learn: bool, note: Callable[[str], None]
                        ) -> tuple[PostprocessingRules | None, EvaluationSummary]:
    """Learn postprocessing rules on the winner's CV predictions (``learn``; else an earlier rules file is removed)
    and evaluate the pipeline with every metric, after the rules where some were kept."""
    rules = None
    if learn:
        note(f"learning postprocessing on the CV predictions of {best.name}")
        pairs = [CasePair(cid, best.predictions[cid], scoring.refs[cid]) for cid in scoring.cases]
        rules = learn_postprocessing(pairs, {k: class_values(v) for k, v in scoring.classes.items()},
                                     ignore_label=scoring.ignore_label, jobs=scoring.jobs, progress=scoring.progress)
        rules.save(out / POSTPROCESSING)
        if not rules.is_empty:
            rules_json = rules.to_json()
            post = scoring.write_candidate(f"{best.name}__postprocessed", best.members, postprocess_job,
                                           lambda cid, dst: (best.predictions[cid], dst, rules_json), desc="postprocess")
            scoring.evaluate(post, full=True)
            assert post.summary is not None
            return rules, post.summary
    elif (out / POSTPROCESSING).is_file():
        (out / POSTPROCESSING).unlink()
    scoring.evaluate(best, full=True)
    assert best.summary is not None
    return rules, best.summary


def _write_records(selection: Selection, wd: Path, cases: list[str]) -> None:
    """``cv_summary.json`` (every candidate's score on the CV ``cases``) and ``best.json`` (the choice)."""
    best, metric, rules = selection.best, selection.metric, selection.rules
    write_json_atomic(selection.folder / "cv_summary.json", {
        "version": 1, "metric": metric, "cases": cases,
        "candidates": [{"name": c.name, "members": [m.to_json() for m in c.members], "score": c.score,
                        "foreground_mean": c.summary.to_json()["foreground_mean"] if c.summary else None}
                       for c in selection.candidates]})
    BestChoice(name=best.name, members=tuple(best.members), metric=metric, score=best.score, n_cases=len(cases),
               postprocessing=POSTPROCESSING if rules is not None and not rules.is_empty else None,
               score_after_postprocessing=float(selection.final.foreground_mean(metric)),
               predict_command=selection.predict_command(wd)).save(wd)


def _cv_quality(wd: Path, members: Sequence[Member], splits: list, cases: Sequence[str]
                ) -> dict[str, dict[str, float | None]]:
    """Per CV case the quality scores its validation saved, averaged over the pipeline's configurations."""
    per_member = []
    for m in members:
        scores: dict[str, dict[str, Any]] = {}
        for f in m.folds:
            path = fold_folder(wd, m.configuration, f) / "val" / QUALITY
            if path.is_file():
                scores.update(read_json(path, FileFormatError, "rerun the fold's validation").get("cases", {}))
        per_member.append(scores)
    out: dict[str, dict[str, float | None]] = {}
    for cid in cases:
        entries = [s[cid] for s in per_member if cid in s]
        if len(entries) == len(per_member):
            out[cid] = {}
            for name in ("tta_agreement", "confidence", "expected_dice"):
                vals = [e.get(name) for e in entries]
                out[cid][name] = None if any(v is None for v in vals) else float(sum(vals)) / len(vals)
            out[cid]["combined"] = combined_score(out[cid])  # of the averaged parts, as predict computes it
    return out


def _resolve_dataset(wd: Path, dataset: Dataset | str | os.PathLike[str] | None) -> Dataset:
    if isinstance(dataset, Dataset):
        return dataset
    root = Path(dataset) if dataset is not None else dataset_source(wd)
    if root is None:
        raise SelectionError(f"{wd}: the dataset with the reference labels is not recorded in this work folder; "
                             "pass it with --dataset DATASET_FOLDER.")
    return load_dataset(root)


def _revalidate(ds: Dataset, plans: Plans, wd: Path, configuration: str, folds: Sequence[str], *, device: str,
                progress: bool, note: Callable[[str], None]) -> None:
    from autoseg.training.run import revalidate_fold
    from autoseg.training.settings import TrainSettings

    note(f"{configuration} fold(s) {', '.join(folds)}: computing validation predictions with probabilities "
         f"(`autoseg train {ds.root} {configuration} {','.join(folds)} --validate-only --save-probabilities`)")
    settings = TrainSettings(save_probabilities=True, device=device, progress=progress)
    for f in folds:
        revalidate_fold(ds, plans, configuration, int(f), wd, settings=settings)
