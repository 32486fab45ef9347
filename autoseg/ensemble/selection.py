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

import itertools
import os
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoseg.ensemble.choice import BEST, POSTPROCESSING, QUALITY_RULE, SELECTION, BestChoice, Member, load_best  # noqa: F401
from autoseg.ensemble.ensembling import average_case
from autoseg.ensemble.learning import CasePair, learn_postprocessing
from autoseg.ensemble.postprocessing import PostprocessingRules, postprocess_job
from autoseg.errors import FileFormatError, SelectionError
from autoseg.evaluation.evaluate import evaluate_pairs
from autoseg.evaluation.metrics import classes_from_labels
from autoseg.evaluation.quality import calibrate_quality, case_errors
from autoseg.evaluation.quality import describe as describe_quality
from autoseg.evaluation.quality_rule import QualityRule
from autoseg.evaluation.summary import EvaluationSummary
from autoseg.inference.export import probabilities_path
from autoseg.inference.uncertainty import combined_score
from autoseg.io.atomic import read_json, write_json_atomic
from autoseg.io.dataset import Dataset, dataset_source, load_dataset
from autoseg.io.model_folder import configuration_folder
from autoseg.networks.checkpoint import FINAL
from autoseg.parallel import imap_ordered
from autoseg.planner.plans import Plans
from autoseg.training.splits import load_splits
from autoseg.training.validation import QUALITY

#: metrics where lower is better; every other metric is maximised
LOWER_IS_BETTER = frozenset({"hd95", "assd", "lesion_hd95"})
#: metrics a selection can rank by (means over foreground classes)
METRICS = ("dice", "iou", "nsd", "precision", "recall", "lesion_dice", "hd95", "assd", "lesion_hd95")


@dataclass
class Candidate:
    """A configuration or ensemble with its cross-validation evaluation."""

    name: str
    members: list[Member]
    predictions: dict[str, Path]
    summary: EvaluationSummary | None = None
    score: float = float("nan")


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
    model_dir = configuration_folder(workdir, configuration)
    return [str(k) for k in range(n_folds) if (model_dir / f"fold_{k}" / FINAL).is_file()]


def _cv_files(workdir: Path, configuration: str, folds: Sequence[str], splits: list, ending: str
              ) -> tuple[dict[str, Path], list[str]]:
    """Case -> validation segmentation of the folds; and the folds whose validation outputs are incomplete."""
    files, incomplete = {}, []
    for f in folds:
        val = configuration_folder(workdir, configuration) / f"fold_{f}" / "val"
        paths = {cid: val / f"{cid}{ending}" for cid in splits[int(f)].val}
        if not all(p.is_file() for p in paths.values()):
            incomplete.append(f)
        files.update(paths)
    return files, incomplete


def _ensemble_job(job: tuple[list[Path], Path, Path]) -> Path:
    npz, geometry_from, out = job
    return average_case(npz, geometry_from, out)


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
    ending = ds.spec.file_ending
    splits = load_splits(wd / "splits.json") if (wd / "splits.json").is_file() else []
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
    need_npz = ensembles and len(names) > 1
    files: dict[str, dict[str, Path]] = {}
    for c in names:
        files[c], incomplete = _cv_files(wd, c, folds[c], splits, ending)
        lacking = {f for f in folds[c] if splits[int(f)].val
                   and not (configuration_folder(wd, c) / f"fold_{f}" / "val" / QUALITY).is_file()}
        if need_npz:
            lacking |= {f for f in folds[c] if any(not probabilities_path(files[c][cid]).is_file()
                                                    for cid in splits[int(f)].val)}
        incomplete = sorted(set(incomplete) | lacking)
        if incomplete:
            _revalidate(ds, plans, wd, c, incomplete, device=device, progress=progress, note=note)
    refs = {case.case_id: case.label for case in ds.cases if case.label is not None}
    common = sorted(set(refs).intersection(*[set(files[c]) for c in names]))
    if not common:
        raise SelectionError(f"{wd}: no case has both a validation prediction and a reference label in {ds.root}.")
    partial = [c for c in names if len(files[c]) < len(refs)]
    if partial:
        note(f"{', '.join(partial)}: not every fold is trained; all candidates are compared on the {len(common)} "
             f"case(s) with predictions from every configuration.")
    classes = classes_from_labels(plans.labels)
    out = wd / SELECTION
    (out / "cv").mkdir(parents=True, exist_ok=True)

    def evaluate(cand: Candidate, full: bool = False) -> None:
        """Candidates are ranked on the metric alone (overlap metrics are ~10x faster than surface ones); the
        chosen pipeline gets every metric."""
        pairs = [(cid, cand.predictions[cid], refs[cid]) for cid in common]
        cand.summary = evaluate_pairs(pairs, classes, ignore_label=ds.spec.ignore_label, jobs=jobs, progress=progress,
                                      surface=full or metric in ("hd95", "assd", "nsd"),
                                      lesion_wise=full or metric.startswith("lesion"))
        cand.summary.save(out / "cv" / cand.name / "summary.json")
        cand.summary.write_csv(out / "cv" / cand.name / "cases.csv")
        cand.score = float(cand.summary.foreground_mean(metric))

    candidates = [Candidate(c, [Member(c, tuple(folds[c]))], {cid: files[c][cid] for cid in common}) for c in names]
    if need_npz:
        for size in range(2, len(names) + 1):
            for combo in itertools.combinations(names, size):
                name = "ensemble__" + "__".join(combo)
                folder = out / "cv" / name
                folder.mkdir(parents=True, exist_ok=True)
                jobs_list = [([probabilities_path(files[c][cid]) for c in combo], files[combo[0]][cid],
                              folder / f"{cid}{ending}") for cid in common]
                note(f"ensembling {' + '.join(combo)} on {len(common)} CV case(s)")
                list(imap_ordered(_ensemble_job, jobs_list, jobs=jobs, desc=name, progress=progress,
                                  label=lambda j: j[2].name))
                candidates.append(Candidate(name, [Member(c, tuple(folds[c])) for c in combo],
                                            {cid: folder / f"{cid}{ending}" for cid in common}))
    for cand in candidates:
        note(f"evaluating {cand.name}")
        evaluate(cand)
    lower = metric in LOWER_IS_BETTER
    best = sorted(candidates, key=lambda c: ((c.score if lower else -c.score) if c.score == c.score else float("inf"),
                                             len(c.members)))[0]
    rules, final = None, best.summary
    if postprocessing:
        note(f"learning postprocessing on the CV predictions of {best.name}")
        pairs = [CasePair(cid, best.predictions[cid], refs[cid]) for cid in common]
        rules = learn_postprocessing(pairs, {k: tuple(v) if isinstance(v, (list, tuple)) else (int(v),)
                                             for k, v in classes.items()},
                                     ignore_label=ds.spec.ignore_label, jobs=jobs, progress=progress)
        rules.save(out / POSTPROCESSING)
        if not rules.is_empty:
            folder = out / "cv" / f"{best.name}__postprocessed"
            folder.mkdir(parents=True, exist_ok=True)
            jobs_list = [(best.predictions[cid], folder / f"{cid}{ending}", rules.to_json()) for cid in common]
            list(imap_ordered(postprocess_job, jobs_list, jobs=jobs, desc="postprocess", progress=progress))
            post = Candidate(folder.name, best.members, {cid: folder / f"{cid}{ending}" for cid in common})
            evaluate(post, full=True)
            final = post.summary
    elif (out / POSTPROCESSING).is_file():
        (out / POSTPROCESSING).unlink()
    if final is best.summary:
        evaluate(best, full=True)
        final = best.summary
    assert final is not None
    quality = calibrate_quality(_cv_quality(wd, best.members, splits, common), case_errors(final, "dice"),
                                candidate=best.name)
    if quality is not None:
        quality.save(out / QUALITY_RULE)
    selection = Selection(metric, candidates, best, final, rules, out, quality=quality)
    write_json_atomic(out / "cv_summary.json", {
        "version": 1, "metric": metric, "cases": common,
        "candidates": [{"name": c.name, "members": [m.to_json() for m in c.members], "score": c.score,
                        "foreground_mean": c.summary.to_json()["foreground_mean"] if c.summary else None}
                       for c in candidates]})
    BestChoice(name=best.name, members=tuple(best.members), metric=metric, score=best.score, n_cases=len(common),
               postprocessing=POSTPROCESSING if rules is not None and not rules.is_empty else None,
               score_after_postprocessing=float(final.foreground_mean(metric)),
               predict_command=selection.predict_command(wd)).save(wd)
    return selection


def _cv_quality(wd: Path, members: Sequence[Member], splits: list, cases: Sequence[str]
                ) -> dict[str, dict[str, float | None]]:
    """Per CV case the quality scores its validation saved, averaged over the pipeline's configurations."""
    per_member = []
    for m in members:
        scores: dict[str, dict[str, Any]] = {}
        for f in m.folds:
            path = configuration_folder(wd, m.configuration) / f"fold_{f}" / "val" / QUALITY
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
