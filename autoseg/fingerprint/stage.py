"""The fingerprint stage: check a dataset, compute its fingerprint and save it in the work folder."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

from autoseg.fingerprint.extract import analyze_dataset, dataset_signature
from autoseg.fingerprint.model import DatasetFingerprint
from autoseg.io.atomic import ensure_writable, write_json_atomic
from autoseg.io.check import CheckReport
from autoseg.io.workdir import DatasetLike, as_dataset, workdir_for

#: work-folder file with the local signature (file names, sizes, times) the saved fingerprint was computed from
FINGERPRINT_CACHE = "fingerprint.cache.json"


def fingerprint(dataset: DatasetLike, *, workdir: str | os.PathLike[str] | None = None, jobs: int = 1,
                progress: bool = True, strict_geometry: bool = False, allow_geometry_mismatch: bool = False,
                reuse: bool = True,
                on_report: Callable[[CheckReport], None] | None = None) -> DatasetFingerprint:
    """Check the dataset and compute its fingerprint, saved as ``<workdir>/fingerprint.json``.

    A saved fingerprint is reused when the dataset's files are unchanged (same names, sizes and
    modification times, recorded in ``<workdir>/fingerprint.cache.json``) and ``reuse`` is True.
    ``fingerprint.json`` itself holds no times or paths, so a copy of the dataset gives the same file.

    Args:
        dataset: dataset folder or a loaded :class:`Dataset`.
        workdir: work folder (see :func:`workdir_for`).
        jobs: worker processes.
        progress: show a progress bar.
        strict_geometry: origin/direction mismatches inside a case are errors.
        allow_geometry_mismatch: mismatches that move voxels by more than half their size are warnings, not errors.
        reuse: reuse a saved fingerprint of unchanged files.
        on_report: called with the integrity report (e.g. to print its warnings).

    Returns:
        The fingerprint.

    Raises:
        DatasetError: the dataset folder or dataset.json is unusable.
        DatasetIntegrityError: the integrity check found errors (the message holds the table).
    """
    ds = as_dataset(dataset)
    out = workdir_for(ds, workdir) / "fingerprint.json"
    cache = out.with_name(FINGERPRINT_CACHE)
    signature = dataset_signature(ds)
    if reuse and out.is_file():
        try:
            saved = DatasetFingerprint.load(out)
            # work folders from before the cache file kept the local signature in fingerprint.json
            key = json.loads(cache.read_text(encoding="utf-8"))["files"] if cache.is_file() else saved.dataset_signature
        except Exception:  # noqa: BLE001 - an unreadable cache is recomputed
            saved = key = None
        if saved is not None and key == signature:
            from autoseg.io.check_report import CheckReport
            from autoseg.io.check_values import check_dataset_level

            # the case files are unchanged; files around them (stray, undeclared channels) may not be
            report = CheckReport(dataset=str(ds.root), n_cases=len(ds.cases), problems=check_dataset_level(ds))
            if on_report is not None:
                on_report(report)
            report.raise_for_errors()
            return saved
    ensure_writable(out.parent)  # a read-only or full work folder fails now, not after the analysis
    report, fp = analyze_dataset(ds, jobs=jobs, progress=progress, strict_geometry=strict_geometry,
                                 allow_geometry_mismatch=allow_geometry_mismatch)
    if on_report is not None:
        on_report(report)
    report.raise_for_errors()
    assert fp is not None
    fp = dataclasses.replace(fp, dataset_signature=dataset_signature(ds, times=False))  # no times: reproducible
    fp.save(out)
    write_json_atomic(cache, {"files": signature})
    return fp
