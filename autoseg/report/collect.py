"""Read what a work folder holds for the report, never failing on a bad file.

Each reader returns what it could read plus notes: a missing file is simply absent (the section then says
which command makes it), a malformed one becomes a note naming the file and the problem. Every listing is
sorted, so the same folder always gives the same report.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoseg.errors import AutosegError, FileFormatError
from autoseg.io.atomic import read_json

#: exceptions a reader turns into a note (a malformed file, an object of the wrong shape)
PARSE_ERRORS = (AutosegError, AttributeError, KeyError, TypeError, ValueError, OSError)


@dataclass
class Loaded:
    """One object read from a file of the work folder.

    Attributes:
        value: the parsed object, or None when missing or unreadable.
        note: why it could not be read (None when it was read, or is simply missing).
    """

    value: Any = None
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.value is not None


def rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it (shorter, and the same on every machine), else as is."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def load(path: Path, root: Path, fix: str, parse: Callable[[Any], Any] | None = None) -> Loaded:
    """Read the JSON file ``path`` and optionally ``parse`` it; problems become a note ending in ``fix``."""
    if not path.is_file():
        return Loaded()
    try:
        data = read_json(path, FileFormatError, fix)
        return Loaded(parse(data) if parse is not None else data)
    except PARSE_ERRORS as err:
        text = str(err) if isinstance(err, AutosegError) else f"{type(err).__name__}: {err}"
        text = text.replace(str(path), rel(path, root))
        if not text.startswith(rel(path, root)):
            text = f"{rel(path, root)}: cannot be used ({text}). {fix}"
        return Loaded(None, text)


def fold_key(name: str) -> tuple[int, int | str]:
    """Sort key of ``fold_<k>`` folders: numeric folds in order, then named ones (``all``)."""
    k = name.removeprefix("fold_")
    return (0, int(k)) if k.isdigit() else (1, k)


def number(value: Any) -> float:
    """A JSON number as float (None, text and booleans as NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


# ------------------------------------------------------------------------------------------------ training


@dataclass
class FoldRun:
    """One trained (or training) fold: its log, state, validation Dice and quality scores.

    Attributes:
        configuration: the configuration trained.
        fold: the fold name (``0``, ``1``, ..., ``all``).
        folder: ``models/<configuration>/fold_<k>``.
        records: the epoch records of ``log.jsonl``, in epoch order.
        finished: ``checkpoint_final.pt`` exists.
        has_latest: ``checkpoint_latest.pt`` exists (training can resume).
        classes: class names of the validation summary.
        val_cases: case -> class -> validation Dice (NaN where undefined).
        quality: case -> score name -> value (``val/quality.json``).
        notes: problems met while reading.
    """

    configuration: str
    fold: str
    folder: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    has_latest: bool = False
    classes: list[str] = field(default_factory=list)
    val_cases: dict[str, dict[str, float]] = field(default_factory=dict)
    quality: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def series(self, key: str) -> list[float]:
        """Values of ``key`` per epoch record (NaN where missing)."""
        return [number(r.get(key)) for r in self.records]


def read_log(path: Path, root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Epoch records of a ``log.jsonl`` (lines that are not JSON objects with an epoch are skipped and counted)."""
    if not path.is_file():
        return [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        return [], [f"{rel(path, root)}: cannot be read ({err})."]
    records, bad = {}, 0
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("epoch"), int) and not isinstance(rec["epoch"], bool):
            records[rec["epoch"]] = rec  # a resumed run rewrites epochs: the last record of an epoch wins
        else:
            bad += 1
    notes = [f"{rel(path, root)}: {bad} line(s) skipped (not an epoch record; a crash can tear the last line)."] \
        if bad else []
    return [records[e] for e in sorted(records)], notes


def _val_summary(data: Any) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Classes and case -> class -> Dice of a fold's ``val/summary.json``."""
    cases = data["cases"]
    if not isinstance(cases, dict):
        raise TypeError("'cases' is not an object")
    per_case = {str(c): {str(k): number(v) for k, v in vals.items()} for c, vals in sorted(cases.items())}
    classes = [str(c) for c in data.get("classes", [])] or sorted({k for v in per_case.values() for k in v})
    return classes, per_case


def _quality(data: Any) -> dict[str, dict[str, float]]:
    cases = data["cases"]
    return {str(c): {str(k): number(v) for k, v in vals.items()} for c, vals in sorted(cases.items())}


def read_runs(workdir: Path) -> list[FoldRun]:
    """Every ``models/<configuration>/fold_<k>`` folder, sorted by configuration then fold."""
    runs = []
    models = workdir / "models"
    for cfg in sorted(p for p in models.iterdir() if p.is_dir()) if models.is_dir() else []:
        for folder in sorted((p for p in cfg.glob("fold_*") if p.is_dir()), key=lambda p: fold_key(p.name)):
            run = FoldRun(cfg.name, folder.name.removeprefix("fold_"), folder,
                          finished=(folder / "checkpoint_final.pt").is_file(),
                          has_latest=(folder / "checkpoint_latest.pt").is_file())
            run.records, run.notes = read_log(folder / "log.jsonl", workdir)
            fix = f"Rerun `autoseg train DATASET {cfg.name} {run.fold} --validate-only` to rewrite it."
            val = load(folder / "val" / "summary.json", workdir, fix, _val_summary)
            if val.ok:
                run.classes, run.val_cases = val.value
            quality = load(folder / "val" / "quality.json", workdir, fix, _quality)
            run.quality = quality.value or {}
            run.notes += [n for n in (val.note, quality.note) if n]
            runs.append(run)
    return runs


# ------------------------------------------------------------------------------------------- quality tables


@dataclass
class CsvTable:
    """A CSV file found in the work folder (e.g. a ``quality.csv`` written by ``autoseg predict``)."""

    path: str
    head: list[str]
    rows: list[list[str]]
    note: str | None = None


def find_quality_tables(workdir: Path, *, max_depth: int = 4, max_files: int = 8) -> list[CsvTable]:
    """``quality.csv`` files under the work folder (not in ``preprocessed/``), shallowest first."""
    import csv

    found: list[Path] = []
    level = [workdir]
    for _ in range(max_depth + 1):
        found += sorted(p / "quality.csv" for p in level if (p / "quality.csv").is_file())
        level = sorted(c for p in level for c in _subfolders(p) if c.name != "preprocessed")
    tables = []
    for path in found[:max_files]:
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.reader(fh))
            tables.append(CsvTable(rel(path, workdir), rows[0] if rows else [], rows[1:]))
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            tables.append(CsvTable(rel(path, workdir), [], [], f"{rel(path, workdir)}: cannot be read ({err})."))
    return tables


def _subfolders(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------- datasets


def dataset_folder(workdir: Path, override: Path | None) -> tuple[Path | None, str | None]:
    """The dataset folder the images come from: ``override``, else the one ``source.json`` names.

    Returns:
        The folder (None when unknown or missing) and a note when it was named but cannot be found.
    """
    if override is not None:
        return override, None
    src = load(workdir / "source.json", workdir, "Pass --dataset to name the dataset folder.")
    value = src.value.get("dataset") if isinstance(src.value, dict) else None
    if not isinstance(value, str):
        return None, src.note or "source.json does not name the dataset folder: pass --dataset to show images."
    path = Path(value)
    if not path.is_dir():
        return None, f"the dataset folder {value} named in source.json does not exist here: pass --dataset."
    return path, None


_SAFE_ID = re.compile(r"^[^/\\\0]+$")


def safe_case_id(case_id: str) -> bool:
    """True for a case id that is a plain file name (ids come from files and become paths)."""
    return bool(_SAFE_ID.match(case_id)) and case_id not in (".", "..")
