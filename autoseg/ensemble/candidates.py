"""The candidates ``find-best`` compares, and how they are scored on cross-validation.

A candidate is a trained configuration (its folds' validation predictions) or an ensemble of several (their
validation probabilities averaged into ``selection/cv/ensemble__a__b/``). :class:`CVScoring` scores every
candidate on the same CV cases against the reference labels and writes each one's ``summary.json`` and
``cases.csv`` to ``selection/cv/<candidate>/``; :func:`best_candidate` ranks them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoseg.ensemble.choice import Member
from autoseg.ensemble.ensembling import average_case
from autoseg.evaluation.evaluate import evaluate_pairs
from autoseg.evaluation.metrics import ClassSpec
from autoseg.evaluation.summary import EvaluationSummary
from autoseg.inference.export import probabilities_path
from autoseg.parallel import imap_ordered

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
class CVScoring:
    """The CV cases every candidate is scored on, their reference labels, and where candidates' files go.

    Attributes:
        cases: the case ids scored (those every configuration has a validation prediction for).
        refs: case id -> reference label file.
        classes: evaluation classes (name -> label or region).
        ignore_label: reference label left out of the scores.
        ending: file ending of the segmentations written.
        metric: the ranking metric.
        folder: ``selection/cv``, one subfolder per candidate.
        jobs: worker processes.
        progress: show progress bars.
        annotated: partially annotated cases: case id -> classes annotated (the others are not scored there).
    """

    cases: list[str]
    refs: dict[str, Path]
    classes: Mapping[str, ClassSpec]
    ignore_label: int | None
    ending: str
    metric: str
    folder: Path
    jobs: int = 1
    progress: bool = True
    annotated: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # partially annotated cases' classes

    def evaluate(self, cand: Candidate, full: bool = False) -> None:
        """Score ``cand`` and save its summary and cases table. Candidates are ranked on the metric alone (overlap
        metrics are ~10x faster than surface ones); the chosen pipeline gets every metric (``full``)."""
        pairs = [(cid, cand.predictions[cid], self.refs[cid]) for cid in self.cases]
        cand.summary = evaluate_pairs(pairs, self.classes, ignore_label=self.ignore_label, jobs=self.jobs,
                                      progress=self.progress, surface=full or self.metric in ("hd95", "assd", "nsd"),
                                      lesion_wise=full or self.metric.startswith("lesion"), annotated=self.annotated)
        cand.summary.save(self.folder / cand.name / "summary.json")
        cand.summary.write_csv(self.folder / cand.name / "cases.csv")
        cand.score = float(cand.summary.foreground_mean(self.metric))

    def write_candidate(self, name: str, members: list[Member], fn: Callable[[Any], Path],
                        job: Callable[[str, Path], Any], *, desc: str, label: Callable[[Any], str] = str) -> Candidate:
        """A candidate whose segmentations are computed into ``cv/<name>/<case><ending>``: ``fn`` runs in worker
        processes on ``job(case_id, destination)`` for every case."""
        folder = self.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        outputs = {cid: folder / f"{cid}{self.ending}" for cid in self.cases}
        list(imap_ordered(fn, [job(cid, dst) for cid, dst in outputs.items()], jobs=self.jobs, desc=desc,
                          progress=self.progress, label=label))
        return Candidate(name, members, outputs)


def _ensemble_job(job: tuple[list[Path], Path, Path]) -> Path:
    """Worker: average one case's probabilities (``.npz`` files) into a segmentation on the first one's grid."""
    npz, geometry_from, out = job
    return average_case(npz, geometry_from, out)


def ensemble_candidates(names: Sequence[str], folds: Mapping[str, Sequence[str]],
                        files: Mapping[str, Mapping[str, Path]], scoring: CVScoring,
                        note: Callable[[str], None]) -> list[Candidate]:
    """Every ensemble of two or more configurations, its CV predictions averaged from the members' probabilities.

    Args:
        names: the configurations.
        folds: configuration -> its CV folds.
        files: configuration -> case id -> validation segmentation (its probabilities lie next to it).
        scoring: the CV cases and the folder the averaged predictions go to.
        note: called with what is being computed.
    """
    out = []
    for size in range(2, len(names) + 1):
        for combo in itertools.combinations(names, size):
            name = "ensemble__" + "__".join(combo)
            note(f"ensembling {' + '.join(combo)} on {len(scoring.cases)} CV case(s)")
            out.append(scoring.write_candidate(
                name, [Member(c, tuple(folds[c])) for c in combo], _ensemble_job,
                lambda cid, dst, combo=combo: ([probabilities_path(files[c][cid]) for c in combo], files[combo[0]][cid],
                                               dst),
                desc=name, label=lambda j: j[2].name))
    return out


def best_candidate(candidates: Sequence[Candidate], metric: str) -> Candidate:
    """The best scored candidate on ``metric`` (unscored ones last; ties: fewer members first)."""
    lower = metric in LOWER_IS_BETTER
    return sorted(candidates, key=lambda c: ((c.score if lower else -c.score) if c.score == c.score else float("inf"),
                                             len(c.members)))[0]
