"""Partial annotations: which classes (or regions) were annotated in each case.

Datasets merged from sources with different label sets, or annotated in stages, hold cases in which some
classes were never drawn. Left as they are, those structures are learnt as background. ``dataset.json`` may say
per case which classes were annotated; a case it does not list is fully annotated::

    "annotated": {"case_007": ["liver"], "case_012": ["liver", "tumour"]}

or name a CSV file (relative to the dataset folder) with a ``case`` column and an ``annotated`` column listing
the class names separated by ``;``::

    "annotated": "annotated.csv"

    case,annotated
    case_007,liver
    case_012,liver;tumour

Names are keys of ``labels`` (classes, or regions for region datasets); background is always annotated. In
label (softmax) datasets, voxels of a class that was not annotated must be stored as background (0): training
then merges that class's probability into background for the case (the marginal loss) and the case's score for
the class is left out of cross-validation.
"""

from __future__ import annotations

import csv
import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from autoseg.errors import DatasetError
from autoseg.io.dataset import Dataset, DatasetSpec

#: the dataset.json key
ANNOTATED_KEY = "annotated"


def annotatable_names(labels: Mapping[str, Any]) -> list[str]:
    """The names a case may list as annotated: every label (or region) but background and ``ignore``."""
    return [k for k, v in labels.items() if k != "ignore" and tuple(v if isinstance(v, (list, tuple)) else [v]) != (0,)]


def _check_names(names: Any, case_id: str, valid: list[str], source: str) -> tuple[str, ...]:
    if isinstance(names, str):
        names = [n for n in names.replace(",", ";").split(";")]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise DatasetError(f"{source}: 'annotated' for case {case_id!r} must be a list of class names, found "
                           f"{names!r}.")
    out = tuple(n.strip() for n in names if n.strip())
    for n in out:
        if n not in valid:
            close = difflib.get_close_matches(n, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DatasetError(f"{source}: case {case_id!r} lists {n!r} as annotated, which is not a class in "
                               f"'labels'{hint}; use the names of 'labels': {', '.join(valid)}.")
    return out


def _read_csv(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"{path}: not found; dataset.json's 'annotated' names this CSV. Add it (columns "
                           "case,annotated) or list the cases in dataset.json instead.")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"case", "annotated"} <= set(rows[0]):
        raise DatasetError(f"{path}: needs the columns 'case' and 'annotated' (class names separated by ';'), "
                           f"found {list(rows[0])}.")
    return {str(r["case"]).strip(): r["annotated"] or "" for r in rows}


def read_annotations(spec: DatasetSpec, root: Path, case_ids: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The classes annotated in each partially annotated case (cases not listed are fully annotated).

    Args:
        spec: the parsed dataset.json.
        root: the dataset folder (a CSV file is looked up there).
        case_ids: the dataset's training cases.

    Returns:
        case id -> names annotated, for the cases dataset.json (or its CSV) lists; empty without the key.

    Raises:
        DatasetError: the key or CSV is malformed, names an unknown case or class (with the closest name).
    """
    value = spec.raw.get(ANNOTATED_KEY)
    if value is None:
        return {}
    source = str(root / "dataset.json")
    if isinstance(value, str):
        source, value = str(root / value), _read_csv(root / value)
    if not isinstance(value, dict):
        raise DatasetError(f"{source}: 'annotated' must map case ids to lists of class names (or name a CSV "
                           f"file), found {type(value).__name__}.")
    valid, known = annotatable_names(spec.labels), set(case_ids)
    out = {}
    for cid, names in value.items():
        if cid not in known:
            close = difflib.get_close_matches(str(cid), sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DatasetError(f"{source}: 'annotated' lists case {cid!r}, which is not a training case{hint}; "
                               "correct the case id or remove the entry.")
        out[str(cid)] = _check_names(names, cid, valid, source)
    return out


def dataset_annotations(dataset: Dataset) -> dict[str, tuple[str, ...]]:
    """:func:`read_annotations` of a loaded dataset."""
    return read_annotations(dataset.spec, dataset.root, [c.case_id for c in dataset.cases])


def annotated_outputs(labels: Mapping[str, Any], names: Sequence[str]) -> tuple[bool, ...]:
    """Which network outputs were annotated in a case that lists ``names``.

    Label datasets: one entry per label value ``0..max`` (background always True). Region datasets: one entry
    per region, in the order of ``labels``.

    Example:
        >>> annotated_outputs({"background": 0, "liver": 1, "tumour": 2}, ["liver"])
        (True, True, False)
    """
    entries = {k: tuple(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
               for k, v in labels.items() if k != "ignore"}
    chosen = set(names)
    if any(len(v) > 1 for v in entries.values()):  # regions: one output per region
        return tuple(k in chosen for k, v in entries.items() if v != (0,))
    out = [False] * (max(v[0] for v in entries.values()) + 1)
    out[0] = True
    for k, v in entries.items():
        out[v[0]] = out[v[0]] or k in chosen
    return tuple(out)


def coverage(labels: Mapping[str, Any], annotations: Mapping[str, Sequence[str]], n_cases: int) -> dict[str, int]:
    """Per class (or region): in how many of the ``n_cases`` cases it was annotated."""
    return {n: n_cases - sum(1 for names in annotations.values() if n not in names) for n in annotatable_names(labels)}
