"""Average the probabilities of several predictions of the same cases (``autoseg ensemble``).

Each input folder holds, per case, ``<case><ending>`` (the segmentation, for its geometry) and ``<case>.npz``
(written by ``predict --save-probabilities`` or by validation with probabilities). The probabilities of
identically named cases are averaged and turned into labels the way the models do it (argmax, or regions above
0.5 painted in order); the result keeps the geometry of the first folder's segmentation.

    >>> ensemble_folders(["pred_3d", "pred_2d"], "pred_ensemble")     # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from autoseg.ensemble.models import apply_label_map
from autoseg.errors import EnsembleError
from autoseg.inference.export import (
    load_probabilities_npz,
    probabilities_path,
    probabilities_to_labels,
    save_probabilities_npz,
)
from autoseg.io.atomic import remove_stale_temporaries
from autoseg.io.image import SUPPORTED_ENDINGS, file_ending, read_header, write_label
from autoseg.parallel import imap_ordered


def segmentation_files(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Case id -> segmentation file of a prediction folder (files with a supported image ending)."""
    out = {}
    for p in sorted(Path(folder).iterdir()):
        ending = file_ending(p)
        if p.is_file() and ending in SUPPORTED_ENDINGS and not p.name.startswith("."):
            out[p.name[: -len(ending)]] = p
    return out


def average_case(npz_files: Sequence[Path], geometry_from: Path, output: Path, *, save_probabilities: bool = False,
                 label_map: Mapping[int, int] | None = None) -> Path:
    """Average one case's probabilities, write its segmentation (and the averaged ``.npz``) atomically.

    Raises:
        EnsembleError: the members disagree on the label layout or the array shape.
    """
    total, layout = None, None
    for f in npz_files:
        probs, lay = load_probabilities_npz(f)
        if total is None:
            total, layout = probs.astype(np.float32), lay
            continue
        if lay.class_values != layout.class_values or (lay.regions is None) != (layout.regions is None):
            raise EnsembleError(f"{f}: its classes {lay.class_values} differ from {npz_files[0]} "
                                f"({layout.class_values}); only predictions of the same labels can be averaged.")
        if probs.shape != total.shape:
            raise EnsembleError(f"{f}: probabilities of shape {probs.shape} do not match {npz_files[0]} "
                                f"{total.shape}; the predictions are of different images.")
        total += probs
    assert total is not None and layout is not None
    total /= len(npz_files)
    seg = apply_label_map(probabilities_to_labels(total, layout), label_map)
    remove_stale_temporaries(output)
    if save_probabilities:
        save_probabilities_npz(probabilities_path(output), total, layout)
    write_label(output, seg, read_header(geometry_from).geometry)
    return output


def _average_job(job: tuple[list[Path], Path, Path, bool, dict[int, int] | None]) -> Path:
    files, geometry_from, output, keep, label_map = job
    return average_case(files, geometry_from, output, save_probabilities=keep, label_map=label_map)


def ensemble_folders(inputs: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str], *,
                     cases: Sequence[str] | None = None, jobs: int = 1, progress: bool = True,
                     overwrite: bool = False, save_probabilities: bool = False,
                     label_map: Mapping[int, int] | None = None) -> list[Path]:
    """Average the probabilities of prediction folders case by case and write the segmentations.

    Args:
        inputs: two or more folders with ``<case>.npz`` next to ``<case><ending>``.
        output: folder for the ensembled segmentations (created; not one of the inputs).
        cases: case ids to ensemble (default: those of the first folder; every folder must have them).
        jobs: worker processes.
        progress: show a progress bar.
        overwrite: redo cases whose output exists.
        save_probabilities: also write the averaged ``<case>.npz``.
        label_map: relabel the output ``{old: new}``.

    Returns:
        The segmentation files written or kept.

    Raises:
        EnsembleError: fewer than two folders, a folder without probabilities, cases missing in some folder.
    """
    folders = [Path(p) for p in inputs]
    out = Path(output)
    if len(folders) < 2:
        raise EnsembleError("ensembling needs at least two prediction folders (-i A B ...).")
    for f in folders:
        if not f.is_dir():
            raise EnsembleError(f"{f}: not a folder; pass folders written by `autoseg predict --save-probabilities`.")
        if f.resolve() == out.resolve():
            raise EnsembleError(f"{out}: the output folder is one of the inputs; write the ensemble elsewhere (-o).")
    segs = [segmentation_files(f) for f in folders]
    wanted = list(cases) if cases is not None else sorted(segs[0])
    if not wanted:
        raise EnsembleError(f"{folders[0]}: no segmentation files; nothing to ensemble.")
    problems = []
    for f, found in zip(folders, segs, strict=True):
        lacking = [c for c in wanted if c not in found or not probabilities_path(found[c]).is_file()]
        if lacking:
            problems.append(f"{f}: no probabilities for {len(lacking)} case(s) ({', '.join(lacking[:5])}"
                            f"{', ...' if len(lacking) > 5 else ''})")
    if problems:
        raise EnsembleError("cannot ensemble:\n  " + "\n  ".join(problems) + "\nPredict with --save-probabilities "
                            "(or train with --save-probabilities) so that every folder has <case>.npz files.")
    out.mkdir(parents=True, exist_ok=True)
    jobs_list, done = [], []
    for c in wanted:
        first = segs[0][c]
        target = out / first.name
        if target.is_file() and not overwrite:
            done.append(target)
            continue
        jobs_list.append(([probabilities_path(s[c]) for s in segs], first, target, save_probabilities,
                          dict(label_map) if label_map else None))
    done += list(imap_ordered(_average_job, jobs_list, jobs=jobs, desc="ensemble", progress=progress,
                              label=lambda j: j[2].name))
    return sorted(done)
