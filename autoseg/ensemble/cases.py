"""Predict many cases from files: reading, prediction and export overlap, with bounded memory.

Three stages run at once on consecutive cases: a reader thread loads and preprocesses case ``i + 1`` while
the network predicts case ``i``, and a writer thread exports case ``i - 1`` (resampling back to the input
grid, writing the file). At most one case waits in each stage, so memory is bounded by about three cases
however many are predicted: one preprocessed input, one set of logits on the preprocessed grid, and the
export of one case (about two full-resolution volumes, see :func:`export_segmentation`). Every file is
written under a temporary name and renamed when complete, so an interrupted run leaves only finished
outputs, and a rerun skips them (``overwrite`` redoes them).

Several processes may share one output folder (parts and claims, :mod:`autoseg.ensemble.sharding`): each then keeps
its own record, and the one that finds every case finished merges them into ``prediction.json``.
"""

from __future__ import annotations

import contextlib
import os
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from autoseg.ensemble.models import ModelEnsemble, map_path
from autoseg.ensemble.sharding import ClaimBoard, Holder, RunRecord, Sharing, claimed_cases, merge_records
from autoseg.evaluation.quality_rule import QualityRule, quality_row, write_quality_table
from autoseg.inference.export import probabilities_path, probability_image_path
from autoseg.inference.inputs import InputCase, PredictionInputError
from autoseg.inference.predictor import Predictor
from autoseg.io.atomic import remove_stale_temporaries, write_json_atomic
from autoseg.io.dicom_seg import Algorithm, segments_from_labels, write_dicom_seg
from autoseg.io.image import SUPPORTED_ENDINGS, Geometry, file_ending, is_complete_image
from autoseg.plugins.labels import DerivedLabels, body_mask
from autoseg.preprocessing.preprocess import PreprocessedArrays

#: record of the settings and timings, written next to the predictions
RECORD = "prediction.json"
#: subfolder of the output with the uncertainty maps
UNCERTAINTY_DIR = "uncertainty"
#: subfolder of the output with the probability images
PROBABILITIES_DIR = "probabilities"
#: ``(case_id, images (C, *spatial), geometry, missing channels) -> findings`` (one message each)
DriftCheck = Callable[[str, np.ndarray, Geometry, Sequence[int]], Sequence[str]]


@dataclass
class PredictionSummary:
    """What a prediction run did.

    Attributes:
        outputs: case id -> segmentation file, for every case (written now or before).
        written: cases predicted in this run.
        skipped: cases whose output existed already (not redone without ``overwrite``).
        warnings: input warnings (e.g. spacing far from the training range).
        seconds: per written case, seconds spent reading, predicting and exporting.
        quality_table: the quality table written (with uncertainty or drift checks), else None.
        flagged: cases of this run flagged in the quality table.
        busy: with claims, cases other live processes were predicting when this one stopped looking.
        merged: with parts or claims, ``prediction.json`` when this process found every case finished and merged
            the processes' records into it; else None.
    """

    outputs: dict[str, Path] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    quality_table: Path | None = None
    flagged: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    merged: Path | None = None


def output_paths(cases: Sequence[InputCase], output: str | os.PathLike[str]) -> dict[str, Path]:
    """Where each case's segmentation goes: ``OUTPUT/<case><input ending>``; ``output`` may also name the file
    itself when there is one case (its ending chooses the format)."""
    out = Path(output)
    if len(cases) == 1 and file_ending(out) in SUPPORTED_ENDINGS and not out.is_dir():
        return {cases[0].case_id: out}
    if out.exists() and not out.is_dir():
        raise PredictionInputError(f"{out}: this file is in the way of the output folder; give a folder with -o (a "
                                   "file name is only taken for a single case, with an image ending like .nii.gz).")
    return {c.case_id: out / f"{c.case_id}{c.ending}" for c in cases}


@dataclass(frozen=True)
class Extras:
    """Outputs besides the segmentation and ``.npz``: probability images named ``probability_names`` (per output,
    in ``OUTPUT/probabilities/``), and a DICOM-SEG ``OUTPUT/<case>.dcm`` recording ``dicom_seg`` as its algorithm."""

    probability_names: tuple[str, ...] = ()
    dicom_seg: Algorithm | None = None

    def paths(self, seg_path: Path) -> list[Path]:
        """The extra files of the segmentation ``seg_path``."""
        out = [probability_image_path(seg_path.parent / PROBABILITIES_DIR, seg_path, n) for n in self.probability_names]
        return out + ([dicom_seg_path(seg_path)] if self.dicom_seg is not None else [])


def dicom_seg_path(seg_path: Path) -> Path:
    """``<case>.dcm`` next to ``<case><ending>``."""
    return seg_path.with_name(seg_path.name[: -len(file_ending(seg_path))] + ".dcm")


def is_finished(seg_path: Path, save_probabilities: bool, uncertainty: bool = False, extras: Extras = Extras()
                ) -> bool:
    """An output counts as finished when its files are whole. Files appear only when complete (the
    probabilities and uncertainty maps are written before the segmentation, the DICOM-SEG after it); one cut
    short anyway (a machine crash before the disk synced, a copy that stopped) is redone, not skipped."""
    return is_complete_image(seg_path) and (
        not save_probabilities or zipfile.is_zipfile(probabilities_path(seg_path))) and (
        not uncertainty or is_complete_image(map_path(seg_path.parent / UNCERTAINTY_DIR, seg_path, "entropy"))) and all(
        p.is_file() and p.stat().st_size > 0 for p in extras.paths(seg_path))


def predict_cases(model: ModelEnsemble | Predictor, cases: Sequence[InputCase], output: str | os.PathLike[str], *,
                  overwrite: bool = False, save_probabilities: bool = False, progress: bool = True,
                  record: dict[str, Any] | None = None, uncertainty: bool = False,
                  drift_check: DriftCheck | None = None, quality_rule: QualityRule | None = None,
                  on_warning: Callable[[str], None] | None = None, sharing: Sharing | None = None,
                  extras: Extras = Extras()) -> PredictionSummary:
    """Predict ``cases`` and write one segmentation per case in its input's format and geometry.

    Args:
        model: the loaded model(s) (a single :class:`Predictor` or a :class:`ModelEnsemble`)
        cases: from :func:`autoseg.inference.inputs.collect_cases`.
        output: output folder (created), or a file name when there is one case.
        overwrite: redo cases whose output exists.
        save_probabilities: also write ``<case>.npz`` (float16 ``probabilities`` in file layout, ``class_values``).
        progress: show a progress bar.
        record: settings saved in ``prediction.json`` in the output folder (with per-case timings).
        uncertainty: also write entropy and disagreement maps to ``OUTPUT/uncertainty/`` and quality scores to
            the quality table (:mod:`autoseg.inference.uncertainty`).
        drift_check: ``(case_id, images, geometry, missing) -> findings`` comparing an input with the training data;
            findings become warnings and flags in the quality table.
        quality_rule: the threshold learnt by ``find-best``; cases at or below it are flagged.
        on_warning: called with each drift finding as it is found (they are also in ``summary.warnings``).
        sharing: other processes write to the same output folder (``cases`` are this process's part, claimed one by
            one with ``sharing.claim``): this process's record goes to ``prediction.runs/``, and ``prediction.json``
            and the quality table are written by whichever process finds every case finished.
        extras: probability images and DICOM-SEG files to write besides (:class:`Extras`).

    The quality table (``quality.csv``/``quality.json``) is written when ``uncertainty`` or ``drift_check`` is on.

    Returns:
        The summary; errors propagate (a failed case stops the run, finished files are kept).
    """
    model = model if isinstance(model, ModelEnsemble) else ModelEnsemble([model])
    paths = output_paths(sharing.everyone if sharing is not None else cases, output)
    summary, todo = _prepare_outputs(cases, paths, overwrite, save_probabilities, uncertainty, clean=sharing is None,
                                     extras=extras)
    stages = _Stages(model, paths, save_probabilities, uncertainty, drift_check, quality_rule, extras)
    single_file = len(paths) == 1 and file_ending(Path(output)) in SUPPORTED_ENDINGS
    if sharing is not None:
        _run_shared(stages, todo, summary, sharing, Path(output).parent if single_file else Path(output),
                    record or {}, progress, on_warning)
        return summary
    _run_stages(stages, todo, len(todo), summary, progress, on_warning)
    if stages.rows:
        table = write_quality_table(Path(output).parent if single_file else Path(output), list(stages.rows.values()))
        summary.quality_table = table
        summary.flagged = [cid for cid, r in stages.rows.items() if r["flagged"]]
    if record is not None and not single_file:
        _save_record(Path(output) / RECORD, record, summary)
    return summary


def _prepare_outputs(cases: Sequence[InputCase], paths: dict[str, Path], overwrite: bool, save_probabilities: bool,
                     uncertainty: bool, clean: bool = True, extras: Extras = Extras()
                     ) -> tuple[PredictionSummary, list[InputCase]]:
    """The summary with the finished cases skipped, and the cases to predict. Creates the output folders and, with
    ``clean``, removes what a killed run was writing (hidden temporaries; a live writer's are locked and kept).
    Processes sharing a folder leave that to the merge (:func:`_run_shared`): on a file system without locks (some
    cluster mounts) another live process's temporaries would look stale."""
    summary = PredictionSummary(outputs={c.case_id: paths[c.case_id] for c in cases})
    todo = []
    for c in cases:
        if not overwrite and is_finished(paths[c.case_id], save_probabilities, uncertainty, extras):
            summary.skipped.append(c.case_id)
        else:
            todo.append(c)
    for p in {p.parent for p in paths.values()}:
        p.mkdir(parents=True, exist_ok=True)
    if clean:
        _remove_temporaries(paths)
    return summary, todo


def _remove_temporaries(paths: dict[str, Path]) -> None:
    remove_stale_temporaries(*paths.values(), *(probabilities_path(p) for p in paths.values()))  # one listing/folder


@dataclass
class _Stages:
    """The read, predict and export stages of a run, and what they hand on per case: drift findings (read ->
    the run's warnings), body masks for labels plugins (read -> export) and quality-table rows (export)."""

    model: ModelEnsemble
    paths: dict[str, Path]
    save_probabilities: bool
    uncertainty: bool
    drift_check: DriftCheck | None
    quality_rule: QualityRule | None
    extras: Extras = field(default_factory=Extras)
    drift: dict[str, list[str]] = field(default_factory=dict)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    bodies: dict[str, np.ndarray] = field(default_factory=dict)
    derived: DerivedLabels | None = field(init=False)  # labels plugins: OUTPUT/<output>/<case> per segmentation
    #: called by the export thread with a case id and its export seconds as soon as its files are complete
    on_written: Callable[[str, float], None] | None = None

    def __post_init__(self) -> None:
        self.derived = DerivedLabels.from_plans(self.model.plans)

    def load(self, case: InputCase) -> tuple[list[PreprocessedArrays], float]:
        """Read and preprocess a case (checking it for drift); also the seconds it took."""
        t0 = time.perf_counter()
        images, geometry = case.read()
        if self.drift_check is not None:
            self.drift[case.case_id] = list(self.drift_check(case.case_id, images, geometry, case.missing))
        if self.derived is not None and self.derived.needs_body:
            self.bodies[case.case_id] = body_mask(images, case.missing)
        pre = self.model.preprocess(images, geometry, case.missing)
        return pre, time.perf_counter() - t0

    def predict(self, pre: list[PreprocessedArrays]) -> tuple[Any, Any, float]:
        """The logits (per member), the members' outputs when uncertainty is on (else None), and the seconds."""
        t0 = time.perf_counter()
        outputs = self.model.member_outputs(pre) if self.uncertainty else None
        logits = [o.logits for o in outputs] if outputs is not None else self.model.logits(pre)
        return logits, outputs, time.perf_counter() - t0

    def write(self, case: InputCase, logits: Any, props: Any, outputs: Any) -> float:
        """Export a case's segmentation (and probabilities, maps, derived labels, quality row); the seconds."""
        t0 = time.perf_counter()
        target = self.paths[case.case_id]
        seg, scores = self.model.write(target, logits, props, save_probabilities=self.save_probabilities,
                                       outputs=outputs, maps_dir=target.parent / UNCERTAINTY_DIR,
                                       probabilities_dir=target.parent / PROBABILITIES_DIR
                                       if self.extras.probability_names else None)
        if self.extras.dicom_seg is not None:  # the first present channel's series gave the geometry
            mapping = self.model.label_map or {}  # segments carry the values written (after --map-labels)
            segments = [(name, tuple(mapping.get(v, v) for v in values))
                        for name, values in segments_from_labels(self.model.plans.labels)]
            write_dicom_seg(dicom_seg_path(target), seg, case.images[0], segments, self.extras.dicom_seg)
        if self.derived is not None:
            self.derived.write(target, seg, props[0].geometry, self.bodies.pop(case.case_id, None))
        if self.uncertainty or self.drift_check is not None:
            self.rows[case.case_id] = quality_row(case.case_id, scores, self.drift.get(case.case_id, []),
                                                  self.quality_rule)
        seconds = time.perf_counter() - t0
        if self.on_written is not None:
            self.on_written(case.case_id, seconds)
        return seconds


def _run_stages(stages: _Stages, todo: Iterable[InputCase], total: int, summary: PredictionSummary, progress: bool,
                on_warning: Callable[[str], None] | None) -> None:
    """Read case ``i + 1`` and export case ``i - 1`` in threads while case ``i`` is predicted, at most one case
    waiting per stage; drift findings become warnings as each case comes up for prediction. ``todo`` is taken one
    case at a time, as the reader is ready for it (claims are made then); ``total`` is at most how many it gives."""
    bar = tqdm(total=total, desc="predict", unit="case", disable=not progress or not total)
    reader, writer = ThreadPoolExecutor(1, "autoseg-read"), ThreadPoolExecutor(1, "autoseg-export")
    exporting: tuple[str, Future[float]] | None = None
    queue = iter(todo)
    try:
        case = next(queue, None)
        upcoming = reader.submit(stages.load, case) if case is not None else None
        while case is not None:
            assert upcoming is not None
            pre, t_read = upcoming.result()
            following = next(queue, None)
            upcoming = reader.submit(stages.load, following) if following is not None else None
            for note in stages.drift.get(case.case_id, []):
                summary.warnings.append(note)
                if on_warning is not None:
                    on_warning(note)
            logits, outputs, t_pred = stages.predict(pre)
            props = [p.properties for p in pre]
            del pre
            if exporting is not None:
                _finish(exporting, summary, bar)
            summary.seconds[case.case_id] = {"read": round(t_read, 3), "predict": round(t_pred, 3)}
            exporting = (case.case_id, writer.submit(stages.write, case, logits, props, outputs))
            del logits, outputs
            case = following
        if exporting is not None:
            _finish(exporting, summary, bar)
    finally:
        bar.close()
        reader.shutdown(wait=False, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)  # a running export completes (atomically) or fails


def _finish(exporting: tuple[str, Future[float]], summary: PredictionSummary, bar: tqdm) -> None:
    """Wait for a case's export and count it as written."""
    cid, fut = exporting
    summary.seconds[cid]["export"] = round(fut.result(), 3)
    summary.written.append(cid)
    bar.update()


def _run_shared(stages: _Stages, todo: list[InputCase], summary: PredictionSummary, sharing: Sharing, folder: Path,
                record: dict[str, Any], progress: bool, on_warning: Callable[[str], None] | None) -> None:
    """Predict this process's share with others writing to ``folder``: claim each case first (``sharing.claim``),
    note each finished case in this process's record, and merge every record into ``prediction.json`` (and every
    quality row into the quality table) when every case of every part is finished."""
    def finished(cid: str) -> bool:
        return is_finished(stages.paths[cid], stages.save_probabilities, stages.uncertainty, stages.extras)

    holder = Holder.current()
    log = RunRecord(folder, {**record, **sharing.describe()}, holder)
    board = ClaimBoard(folder, sharing.claim_timeout, holder) if sharing.claim else None

    def written(cid: str, export: float) -> None:
        """In the export thread as soon as the files are complete (not after the next case is predicted), so that a
        process killed meanwhile leaves no claim on a finished case, nor a finished case out of its record."""
        log.add(cid, {**summary.seconds[cid], "export": round(export, 3)}, stages.rows.get(cid))
        if board is not None:
            board.release(cid, finished=True)

    stages.on_written = written
    with board if board is not None else contextlib.nullcontext():
        queue = todo if board is None else claimed_cases(todo, board, finished, summary.skipped, summary.busy)
        _run_stages(stages, queue, len(todo), summary, progress, on_warning)
    summary.flagged = [cid for cid, r in stages.rows.items() if r["flagged"]]
    if all(finished(cid) for cid in stages.paths):  # nobody writes any more: what killed processes left can go
        _remove_temporaries(stages.paths)
        summary.merged, rows = merge_records(folder, folder / RECORD, list(stages.paths))
        if rows:
            summary.quality_table = write_quality_table(folder, rows)


def _save_record(path: Path, record: dict[str, Any], summary: PredictionSummary) -> None:
    """``{"runs": [settings, ...], "cases": {case: {"run": index, "seconds": {...}}}}``, merged with earlier runs
    into the same folder (each case points at the settings it was last predicted with)."""
    import json

    old: dict[str, Any] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
    runs = list(old.get("runs", [])) if isinstance(old.get("runs"), list) else []
    if record not in runs:
        runs.append(record)
    cases = dict(old.get("cases", {})) if isinstance(old.get("cases"), dict) else {}
    for cid in summary.written:
        cases[cid] = {"run": runs.index(record), "seconds": summary.seconds[cid]}
    write_json_atomic(path, {"runs": runs, "cases": dict(sorted(cases.items()))})
