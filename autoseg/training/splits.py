"""Cross-validation splits: make them reproducibly, save them, load and check a user's own file.

The file format is nnU-Net's ``splits_final.json``: a JSON list with one ``{"train": [...], "val": [...]}``
object per fold, so a file prepared for nnU-Net can be copied to ``<workdir>/splits.json`` unchanged.
Without a file, cases are shuffled with a seeded generator and dealt into ``n_folds`` folds (5 by default,
seed 12345, like nnU-Net); with a case -> patient/group table, whole groups are dealt so that no patient
is ever in both the training and the validation set of a fold.

This module does not import torch.
"""

from __future__ import annotations

import csv
import difflib
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.errors import SplitsError
from autoseg.io.atomic import read_json, write_json_atomic

__all__ = [
    "SPLITS_FILE", "Fold", "SplitsError", "fold_cases", "get_splits", "load_splits", "make_splits",
    "read_groups", "save_splits",
]

#: name of the splits file inside a working directory
SPLITS_FILE = "splits.json"
DEFAULT_N_FOLDS = 5
DEFAULT_SEED = 12345
_SHOW = 5  # how many offending ids an error message lists


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold.

    Attributes:
        train: case ids the network trains on (sorted).
        val: case ids it is validated on (sorted).
    """

    train: tuple[str, ...]
    val: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """nnU-Net's per-fold form ``{"train": [...], "val": [...]}``."""
        return {"train": list(self.train), "val": list(self.val)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Fold:
        """Inverse of :meth:`to_json` (no checks; :func:`load_splits` checks files)."""
        return cls(train=tuple(str(c) for c in d["train"]), val=tuple(str(c) for c in d["val"]))


def _preview(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in list(ids)[:_SHOW])
    return shown + (f" and {len(ids) - _SHOW} more" if len(ids) > _SHOW else "")


def _duplicates(ids: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    dup: set[str] = set()
    for i in ids:
        (dup if i in seen else seen).add(i)
    return sorted(dup)


def _folds_from_assignment(ids: Sequence[str], fold_of: Mapping[str, int], n_folds: int) -> list[Fold]:
    folds = []
    for k in range(n_folds):
        val = tuple(sorted(c for c in ids if fold_of[c] == k))
        train = tuple(sorted(c for c in ids if fold_of[c] != k))
        folds.append(Fold(train=train, val=val))
    return folds


def make_splits(case_ids: Sequence[str], *, n_folds: int = DEFAULT_N_FOLDS, seed: int = DEFAULT_SEED,
                groups: Mapping[str, str] | None = None) -> list[Fold]:
    """Shuffled K-fold split of the cases, reproducible from ``seed``.

    The ids are sorted first, so the result depends only on the set of ids, ``n_folds``, ``seed`` and
    ``groups``, never on the input order. Without groups the validation folds differ in size by at most one
    case. With groups (case id -> patient id) whole groups are dealt, largest first (ties broken by the
    seeded generator), each to the fold that currently has the fewest cases.

    Args:
        case_ids: the dataset's case identifiers (unique).
        n_folds: number of folds (>= 2).
        seed: seed of ``numpy.random.default_rng``.
        groups: optional case id -> group id; every case must have one. Entries for other ids are ignored.

    Returns:
        ``n_folds`` folds; every case is in exactly one validation fold and trains in all the others.

    Raises:
        SplitsError: fewer than 2 folds, duplicated ids, fewer cases (or groups) than folds, or cases
            missing from ``groups``.

    Example:
        >>> folds = make_splits([f"case_{i}" for i in range(10)], n_folds=5)
        >>> [len(f.val) for f in folds]
        [2, 2, 2, 2, 2]
    """
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise SplitsError(f"n_folds={n_folds!r}: cross-validation needs at least 2 folds. Use n_folds >= 2 "
                          "(5 is the default), or fold 'all' to train on every case.")
    ids = [str(c) for c in case_ids]
    dup = _duplicates(ids)
    if dup:
        raise SplitsError(f"case ids are duplicated: {_preview(dup)}. Every case must be listed once; "
                          "check the dataset for cases with the same identifier.")
    ids.sort()
    rng = np.random.default_rng(seed)
    if groups is None:
        if len(ids) < n_folds:
            fewer = f", use n_folds={len(ids)} or fewer folds" if len(ids) >= 2 else ""
            raise SplitsError(f"{n_folds}-fold cross-validation needs at least {n_folds} cases, but the dataset "
                              f"has {len(ids)}. Train fold 'all' (one model on every case: `autoseg train DATASET "
                              f"CONFIG all`){fewer}, or add cases.")
        order = rng.permutation(len(ids))
        sizes = [len(ids) // n_folds + (1 if k < len(ids) % n_folds else 0) for k in range(n_folds)]
        fold_of: dict[str, int] = {}
        start = 0
        for k, size in enumerate(sizes):
            for j in order[start:start + size]:
                fold_of[ids[j]] = k
            start += size
        return _folds_from_assignment(ids, fold_of, n_folds)

    missing = [c for c in ids if c not in groups]
    if missing:
        raise SplitsError(f"{len(missing)} case(s) have no group: {_preview(missing)}. Add a row "
                          "'case,group' for each of them to the groups table (a case alone may be its own group).")
    members: dict[str, list[str]] = {}
    for c in ids:
        members.setdefault(str(groups[c]), []).append(c)
    names = sorted(members)
    if len(names) < n_folds:
        raise SplitsError(f"{n_folds}-fold cross-validation needs at least {n_folds} groups (patients), but the "
                          f"cases belong to {len(names)}. Use n_folds={max(len(names), 2)} or fewer folds.")
    tie_rank = rng.permutation(len(names))
    dealing = sorted(range(len(names)), key=lambda g: (-len(members[names[g]]), tie_rank[g]))
    counts = [0] * n_folds
    fold_of = {}
    for g in dealing:
        k = min(range(n_folds), key=lambda f: (counts[f], f))
        counts[k] += len(members[names[g]])
        for c in members[names[g]]:
            fold_of[c] = k
    return _folds_from_assignment(ids, fold_of, n_folds)


def save_splits(path: str | os.PathLike[str], folds: Sequence[Fold]) -> None:
    """Write folds to ``path`` atomically in nnU-Net's ``splits_final.json`` format.

    Args:
        path: destination file (its folder is created).
        folds: the folds to write.

    Example:
        >>> save_splits(tmp_path / "splits.json", make_splits(["a", "b"], n_folds=2))  # doctest: +SKIP
    """
    write_json_atomic(path, [f.to_json() for f in folds])


def _check_ids(path: Path, where: str, ids: Any) -> list[str]:
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise SplitsError(f"{path}: {where} must be a list of case id strings, got {type(ids).__name__}. "
                          'Write each fold as {"train": ["case_a", ...], "val": ["case_b", ...]}.')
    dup = _duplicates(ids)
    if dup:
        raise SplitsError(f"{path}: {where} lists case ids more than once: {_preview(dup)}. "
                          "List each case once per fold.")
    return ids


def load_splits(path: str | os.PathLike[str], *, case_ids: Sequence[str] | None = None) -> list[Fold]:
    """Read and check a splits file (nnU-Net's ``splits_final.json`` format; any number of folds).

    Args:
        path: the JSON file, a list of ``{"train": [...], "val": [...]}`` objects.
        case_ids: the dataset's case ids; when given, every id in the file must be one of them, and a
            warning is issued for dataset cases that are in no validation fold.

    Returns:
        The folds, ids sorted within each list.

    Raises:
        SplitsError: the file is missing or not JSON, is not a non-empty list of objects with ``train`` and
            ``val`` lists of strings, lists an id twice in one list, puts a case in both train and val of
            one fold, or names cases that are not in the dataset.

    Example:
        >>> folds = load_splits("work/splits.json", case_ids=["a", "b", "c"])  # doctest: +SKIP
    """
    path = Path(path)
    fix = (f"Delete {path.name} to have autoseg make a new split, or fix it: it must be a JSON list of "
           '{"train": [...], "val": [...]} objects, one per fold.')
    raw = read_json(path, SplitsError, fix)
    if not isinstance(raw, list) or not raw:
        raise SplitsError(f"{path}: expected a non-empty JSON list of folds, got "
                          f"{'an empty list' if raw == [] else type(raw).__name__}. {fix}")
    folds = []
    for k, entry in enumerate(raw):
        if not isinstance(entry, dict) or "train" not in entry or "val" not in entry:
            got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise SplitsError(f"{path}: fold {k} must be an object with keys 'train' and 'val', got {got}. {fix}")
        train = _check_ids(path, f"fold {k} 'train'", entry["train"])
        val = _check_ids(path, f"fold {k} 'val'", entry["val"])
        both = sorted(set(train) & set(val))
        if both:
            raise SplitsError(f"{path}: fold {k} has {len(both)} case(s) in both 'train' and 'val': "
                              f"{_preview(both)}. A case must not be validated on a fold it trains on; "
                              "remove it from one of the two lists.")
        folds.append(Fold(train=tuple(sorted(train)), val=tuple(sorted(val))))
    if case_ids is not None:
        known = {str(c) for c in case_ids}
        used = {c for f in folds for c in (*f.train, *f.val)}
        unknown = sorted(used - known)
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            hint = f" (did you mean {close[0]!r} for {unknown[0]!r}?)" if close else ""
            raise SplitsError(f"{path}: {len(unknown)} case id(s) are not in the dataset: {_preview(unknown)}"
                              f"{hint}. Use the dataset's case identifiers (file names without the "
                              f"_0000 channel suffix and extension), or delete {path.name} to make a new split.")
        never = sorted(known - {c for f in folds for c in f.val})
        if never:
            warnings.warn(f"{path}: {len(never)} dataset case(s) are in no validation fold: {_preview(never)}. "
                          "Cross-validation results will not cover them.", stacklevel=2)
    return folds


def read_groups(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a case -> group (e.g. patient) table from a CSV or TSV file with a ``case,group`` header.

    Args:
        path: ``.csv`` (comma-separated) or ``.tsv``/``.tab`` (tab-separated) file. Other columns are ignored.

    Returns:
        case id -> group id.

    Raises:
        SplitsError: unreadable file, unknown extension, missing ``case``/``group`` columns, empty values,
            or a case listed twice with different groups.

    Example:
        >>> read_groups("patients.csv")  # doctest: +SKIP
        {'scan_01': 'patient_A', 'scan_02': 'patient_A', 'scan_03': 'patient_B'}
    """
    path = Path(path)
    suffix = path.suffix.lower()
    delimiter = {".csv": ",", ".tsv": "\t", ".tab": "\t"}.get(suffix)
    if delimiter is None:
        raise SplitsError(f"{path}: unknown groups table format {suffix or '(no extension)'!r}. Save it as "
                          ".csv (comma-separated) or .tsv (tab-separated) with a header row 'case,group'.")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh, delimiter=delimiter))
            header = [h.strip() for h in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SplitsError(f"{path}: cannot read the groups table ({err}). Check the path and that it is a "
                          "UTF-8 text file with a header row 'case,group'.") from err
    if not rows:
        raise SplitsError(f"{path}: the groups table has no rows. It needs a header row 'case,group' and one row "
                          "per case.")
    missing = [c for c in ("case", "group") if c not in header]
    if missing:
        raise SplitsError(f"{path}: missing column(s) {missing}; the header has {header}. The first row must "
                          f"name the columns, e.g. 'case{delimiter}group'.")
    out: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        clean = {(k or "").strip(): (v or "").strip() for k, v in row.items() if isinstance(v, str) or v is None}
        case, group = clean.get("case", ""), clean.get("group", "")
        if not case or not group:
            raise SplitsError(f"{path}: line {line} has an empty case or group. Fill in both columns.")
        if out.get(case, group) != group:
            raise SplitsError(f"{path}: case {case!r} is listed with groups {out[case]!r} and {group!r}. "
                              "A case belongs to exactly one group; keep one row for it.")
        out[case] = group
    return out


def get_splits(workdir: str | os.PathLike[str], case_ids: Sequence[str], *, n_folds: int = DEFAULT_N_FOLDS,
               seed: int = DEFAULT_SEED, groups: Mapping[str, str] | str | os.PathLike[str] | None = None,
               ) -> list[Fold]:
    """Splits of a working directory: load ``<workdir>/splits.json`` if present, else make and save it.

    An existing file wins (it may be the user's own); ``n_folds``, ``seed`` and ``groups`` are only used when
    a new split is made. A dataset of 2 to ``n_folds - 1`` cases gets one fold per case (leave-one-out).

    Args:
        workdir: the dataset's working directory.
        case_ids: the dataset's case ids (used to check an existing file).
        n_folds: folds of a new split.
        seed: seed of a new split.
        groups: case -> group mapping, or the path of a CSV/TSV table read with :func:`read_groups`.

    Returns:
        The folds.

    Raises:
        SplitsError: see :func:`make_splits`, :func:`load_splits` and :func:`read_groups`.

    Example:
        >>> folds = get_splits("autoseg_work/Dataset001", ["a", "b", "c", "d", "e"])  # doctest: +SKIP
    """
    path = Path(workdir) / SPLITS_FILE
    if groups is not None and not isinstance(groups, Mapping):
        groups = read_groups(groups)
    if path.exists():
        folds = load_splits(path, case_ids=case_ids)
        if groups is not None:
            _check_groups_respected(path, folds, groups)
        return folds
    if groups is None and 2 <= len(case_ids) < n_folds:
        n_folds = len(case_ids)  # a tiny dataset: leave-one-out instead of refusing
    folds = make_splits(case_ids, n_folds=n_folds, seed=seed, groups=groups)
    save_splits(path, folds)
    return folds


def fold_cases(folds: Sequence[Fold], fold: int | str) -> Fold:
    """The train/val cases of one fold, or of ``"all"`` (train on every case, validate on the same cases).

    Args:
        folds: the folds (from :func:`get_splits`).
        fold: a fold index ``0 .. len(folds)-1`` (a digit string is accepted), or ``"all"``.

    Returns:
        The fold; for ``"all"``, ``Fold(train=every case, val=every case)`` as in nnU-Net.

    Raises:
        SplitsError: the fold is not a valid index nor ``"all"``.

    Example:
        >>> folds = make_splits(["a", "b", "c"], n_folds=3)
        >>> fold_cases(folds, "all").train
        ('a', 'b', 'c')
    """
    if isinstance(fold, str):
        if fold.strip().lower() == "all":
            every = tuple(sorted({c for f in folds for c in (*f.train, *f.val)}))
            return Fold(train=every, val=every)
        if fold.strip().isdigit():
            fold = int(fold.strip())
    if isinstance(fold, (int, np.integer)) and not isinstance(fold, bool) and 0 <= fold < len(folds):
        return folds[int(fold)]
    raise SplitsError(f"fold {fold!r} does not exist: the split has {len(folds)} fold(s). Use one of "
                      f"{list(range(len(folds)))} or 'all' (train on every case).")


def _check_groups_respected(path: Path, folds: Sequence[Fold], groups: Mapping[str, str]) -> None:
    """Raise when an existing split puts cases of one group on both sides of a fold (leakage)."""
    for k, fold in enumerate(folds):
        val_groups = {groups[c] for c in fold.val if c in groups}
        leaked = sorted({groups[c] for c in fold.train if groups.get(c) in val_groups})
        if leaked:
            raise SplitsError(f"{path}: fold {k} has cases of group(s) {', '.join(leaked[:5])} in both train and "
                              "val, which leaks information between them. Delete the file to have autoseg make "
                              "group-safe splits, or fix it by hand.")
