"""The dataset integrity check behind ``autoseg check`` (also run by ``autoseg plan``).

Every problem is collected and reported at once, as one table, instead of stopping at the first: missing or
unreadable files, geometry that differs between a case's channels and its label, undeclared label values,
NaN/inf voxels, wrong dimensionality, empty labels, duplicates and ``dataset.json`` mistakes. Each problem
names the case, the file, what is wrong (with the values) and how to fix it. Errors stop planning; warnings
are shown but do not.

Each case is checked by :func:`~autoseg.io.check_case.check_case` (in worker processes); this module loads the
dataset and adds what only the whole dataset shows: mixed dimensionality, duplicate cases, classes found in no
case and partial-annotation mistakes.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from autoseg.errors import DatasetError
from autoseg.io.annotations import ANNOTATED_KEY, coverage, dataset_annotations
from autoseg.io.check_case import CaseCheck, check_case
from autoseg.io.check_report import CheckReport, Problem, error, problem_text, warning
from autoseg.io.check_values import check_dataset_level, label_names
from autoseg.io.dataset import CaseFiles, Dataset, DatasetSpec, load_dataset, read_dataset_json
from autoseg.parallel import imap_ordered

__all__ = ["CheckReport", "Problem", "assemble_report", "check_dataset"]


def assemble_report(dataset: Dataset, case_checks: Sequence[CaseCheck]) -> CheckReport:
    """Combine per-case checks with the dataset-level problems, mixed dimensionality, duplicate cases and
    classes that appear in no case.

    Args:
        dataset: the dataset the cases belong to.
        case_checks: the results of :func:`~autoseg.io.check_case.check_case` (their ``data`` is not used).

    Returns:
        The report; problems are in dataset-level, then case, then cross-case order.
    """
    probs = check_dataset_level(dataset)
    for c in case_checks:
        probs.extend(c.problems)
    dims = Counter(c.ndim for c in case_checks if c.ndim is not None)
    if len(dims) > 1:
        common = dims.most_common(1)[0][0]
        for c in case_checks:
            if c.ndim is not None and c.ndim != common:
                probs.append(error("dimensionality", c.case_id, None, f"the case is {c.ndim}D while "
                                   f"{dims[common]} of {sum(dims.values())} cases are {common}D",
                                   f"convert the case to {common}D, or remove it"))
    first: dict[str, str] = {}
    for c in case_checks:
        if c.image_hash is None:
            continue
        if c.image_hash in first:
            probs.append(warning("duplicate", c.case_id, None, f"its images are identical to case "
                                 f"{first[c.image_hash]}'s", "remove one copy: duplicates leak between "
                                 "cross-validation folds and inflate the validation scores"))
        else:
            first[c.image_hash] = c.case_id
    read = [c.labels_present for c in case_checks if c.labels_present is not None]
    fg = set(dataset.spec.foreground_labels)
    if read and fg and not any(fg.intersection(present) for present in read):
        probs.append(error("all_background", None, dataset.root / "labelsTr", f"every label map read ({len(read)}) "
                           "holds no foreground label: there is nothing to learn",
                           "check the label export (structures must be stored as values > 0, as declared in "
                           "dataset.json 'labels'), then plan again"))
    elif read:
        found = set().union(*read)
        names = label_names(dataset.spec)
        for v in dataset.spec.foreground_labels:
            if v not in found:
                probs.append(warning("absent_class", None, dataset.root / "dataset.json", f"class {names[v]} "
                                     f"(label {v}) is absent from every case ({len(read)} label maps read)",
                                     "check the label export; a class without voxels cannot be learnt (remove it "
                                     "from 'labels' if it is unused)"))
    report = CheckReport(dataset=str(dataset.root), n_cases=len(case_checks), problems=probs)
    _check_annotations(dataset, case_checks, report)
    return report


def _check_annotations(dataset: Dataset, case_checks: Sequence[CaseCheck], report: CheckReport) -> None:
    """Partial annotations (dataset.json ``annotated``): a malformed entry is an error; so is a label map holding
    voxels of a class it says was not annotated (label datasets; they must be background). Sets the coverage."""
    if ANNOTATED_KEY not in dataset.spec.raw:
        return
    json_path = dataset.root / "dataset.json"
    try:
        annotations = dataset_annotations(dataset)
    except DatasetError as err:
        report.problems.append(error("annotated", None, json_path, problem_text(err, json_path),
                                     "correct the 'annotated' entry (or its CSV) as the message says"))
        return
    report.coverage = coverage(dataset.spec.labels, annotations, len(dataset.cases))
    if dataset.spec.has_regions:
        return
    values = {k: v for k, v in dataset.spec.labels.items() if isinstance(v, int) and v != 0 and k != "ignore"}
    labels = {c.case_id: c for c in dataset.cases}
    for check in case_checks:
        names = annotations.get(check.case_id)
        if names is None or check.labels_present is None:
            continue
        drawn = [k for k, v in values.items() if k not in names and v in check.labels_present]
        if drawn:
            report.problems.append(error("annotated", check.case_id, labels[check.case_id].label,
                                         f"the label map holds class(es) {drawn}, which dataset.json 'annotated' "
                                         f"says were not annotated in this case (it lists {list(names)})",
                                         "add the class(es) to the case's 'annotated' list"))


def _check_job(job: tuple[CaseFiles, DatasetSpec, bool, bool, bool]) -> CaseCheck:
    case, spec, strict, allow, scan = job
    return check_case(case, spec, strict_geometry=strict, allow_geometry_mismatch=allow, scan_nifti_nan=scan)


def _load(root: Path) -> tuple[Dataset | None, list[Problem]]:
    """Load the dataset; a broken folder or dataset.json becomes one error problem instead of an exception."""
    json_path = root / "dataset.json"
    if not root.is_dir():
        return None, [error("layout", None, root, f"dataset folder {root} not found",
                            "pass the folder that holds dataset.json, imagesTr/ and labelsTr/")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            read_dataset_json(json_path)
            dataset = load_dataset(root)
        except DatasetError as err:
            kind = "dataset_json" if str(err).startswith(str(json_path)) else "layout"
            where = json_path if kind == "dataset_json" else root
            return None, [error(kind, None, where, problem_text(err, where),
                                "correct dataset.json / the folder as the message says, then check again")]
    notes = list(dict.fromkeys(str(w.message) for w in caught))
    return dataset, [warning("dataset_json", None, json_path, problem_text(m, json_path), "update dataset.json")
                     for m in notes]


def check_dataset(dataset_or_path: Dataset | str | Path, *, jobs: int = 1, progress: bool = True,
                  strict_geometry: bool = False, allow_geometry_mismatch: bool = False,
                  scan_nifti_nan: bool = True) -> CheckReport:
    """Check a whole dataset and report every problem at once.

    Args:
        dataset_or_path: a loaded dataset or its folder.
        jobs: worker processes (spawn-safe; only small results cross processes).
        progress: show a progress bar.
        strict_geometry: every origin/direction mismatch inside a case is an error, even one under half a voxel.
        allow_geometry_mismatch: mismatches that move voxels by more than half their size are warnings, not errors.
        scan_nifti_nan: also find NaN/inf in float NIfTI files (see :func:`~autoseg.io.check_case.check_case`).

    Returns:
        The report. A folder or dataset.json that cannot be loaded gives a report with one error; a bad
        dataset never raises (call ``report.raise_for_errors()`` for that).

    Raises:
        WorkerError: a worker process died (e.g. killed for running out of memory).

    Example:
        >>> report = check_dataset("Dataset001_BrainTumour", jobs=4)  # doctest: +SKIP
        >>> print(report.format_table())  # doctest: +SKIP
    """
    notes: list[Problem] = []
    if isinstance(dataset_or_path, Dataset):
        dataset = dataset_or_path
    else:
        loaded, notes = _load(Path(dataset_or_path))
        if loaded is None:
            return CheckReport(str(Path(dataset_or_path)), 0, notes)
        dataset = loaded
    jobs_in = [(c, dataset.spec, strict_geometry, allow_geometry_mismatch, scan_nifti_nan) for c in dataset.cases]
    checks = list(imap_ordered(_check_job, jobs_in, jobs=jobs, desc="check", progress=progress,
                               label=lambda j: f"case {j[0].case_id}"))
    report = assemble_report(dataset, checks)
    report.problems[:0] = notes
    return report
