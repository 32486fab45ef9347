"""The result of the dataset integrity check: a list of problems, shown as one table.

:class:`Problem` is one row (severity, case, file, what is wrong, how to fix it); :class:`CheckReport`
collects them, prints them as an aligned plain-text table (errors first) and turns errors into one
:class:`~autoseg.errors.DatasetIntegrityError` holding the whole table.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoseg.errors import DatasetIntegrityError

ERROR = "error"
WARNING = "warning"

#: Widest a column may grow in the table before its text is wrapped (file paths are shortened instead).
_CASE_WIDTH = 24
_FILE_WIDTH = 40
_PROBLEM_WIDTH = 64
_FIX_WIDTH = 56


@dataclass(frozen=True)
class Problem:
    """One problem found by the integrity check.

    ``kind`` is a short, stable code (``missing_label``, ``label_values``, ``geometry``, ...) for programs;
    ``message`` says what is wrong with the values found, ``fix`` how to repair it.
    """

    severity: str  # "error" | "warning"
    kind: str
    case_id: str | None
    path: Path | None
    message: str
    fix: str

    @property
    def is_error(self) -> bool:
        return self.severity == ERROR


def error(kind: str, case_id: str | None, path: Path | None, message: str, fix: str) -> Problem:
    """An error: the dataset cannot be planned or trained until it is fixed."""
    return Problem(ERROR, kind, case_id, path, message, fix)


def warning(kind: str, case_id: str | None, path: Path | None, message: str, fix: str) -> Problem:
    """A warning: worth a look, but the dataset can be used as it is."""
    return Problem(WARNING, kind, case_id, path, message, fix)


def problem_text(exc: Exception | str, path: Path) -> str:
    """An error's text without a leading ``path:`` (the table's file column names the file)."""
    text = str(exc).strip() or type(exc).__name__
    return text[len(str(path)) + 2:] if text.startswith(f"{path}: ") else text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@dataclass
class CheckReport:
    """Every problem the integrity check found in one dataset.

    Attributes:
        dataset: the dataset folder (file paths in the table are shown relative to it).
        n_cases: number of training cases checked.
        problems: all problems, in the order found (dataset-level first, then case by case).
        coverage: for a partially annotated dataset (dataset.json ``annotated``), per class or region the number
            of cases in which it was annotated; None otherwise.
    """

    dataset: str
    n_cases: int
    problems: list[Problem] = field(default_factory=list)
    coverage: dict[str, int] | None = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.is_error]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if not p.is_error]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    def relative_path(self, path: Path | None) -> str:
        """``path`` relative to the dataset folder when it lies inside it, ``-`` for no path."""
        if path is None:
            return "-"
        try:
            return Path(path).relative_to(self.dataset).as_posix() or "."
        except ValueError:
            return str(path)

    def summary(self) -> str:
        """One line: ``N errors, M warnings in K cases``."""
        return (f"{_plural(len(self.errors), 'error')}, {_plural(len(self.warnings), 'warning')} in "
                f"{_plural(self.n_cases, 'case')}")

    def format_table(self, max_rows: int = 200) -> str:
        """The problems as an aligned plain-text table, errors first, then a one-line summary.

        Args:
            max_rows: most problems shown; the table says how many were left out.

        Returns:
            The table (several lines, no trailing newline).
        """
        ordered = self.errors + self.warnings
        if not ordered:
            return "\n".join([f"no problems found in {self.dataset}", *self.coverage_lines(), self.summary()])
        shown = ordered[:max(max_rows, 0)]
        head = ("severity", "case", "file", "problem", "fix")
        rows = [(p.severity, p.case_id or "-", _shorten(self.relative_path(p.path), _FILE_WIDTH), p.message, p.fix)
                for p in shown]
        widths = [max(len(head[0]), *(len(r[0]) for r in rows)),
                  min(_CASE_WIDTH, max(len(head[1]), *(len(r[1]) for r in rows))),
                  max(len(head[2]), *(len(r[2]) for r in rows)),
                  min(_PROBLEM_WIDTH, max(len(head[3]), *(len(r[3]) for r in rows))),
                  min(_FIX_WIDTH, max(len(head[4]), *(len(r[4]) for r in rows)))]
        lines = [_row(head, widths), "  ".join("-" * w for w in widths)]
        previous = None
        for (sev, *rest), problem in zip(rows, shown, strict=True):
            if previous is not None and problem.severity != previous:
                lines.append("")
            previous = problem.severity
            lines.append(_row((sev, *rest), widths))
        left_out = ordered[len(shown):]
        if left_out:
            n_err = sum(p.is_error for p in left_out)
            lines.append(f"... {_plural(len(left_out), 'more problem')} not shown ({_plural(n_err, 'error')}, "
                         f"{_plural(len(left_out) - n_err, 'warning')}); `autoseg check --json FILE` lists them all")
        lines += self.coverage_lines()
        lines.append(self.summary())
        return "\n".join(lines)

    def coverage_lines(self) -> list[str]:
        """``annotation coverage: NAME k/n cases, ...`` for a partially annotated dataset, else nothing."""
        if self.coverage is None:
            return []
        parts = [f"{name} {k}/{self.n_cases}" for name, k in self.coverage.items()]
        return [f"annotation coverage (cases annotated per class): {', '.join(parts)}"]

    def raise_for_errors(self) -> None:
        """Raise when the report holds errors.

        Raises:
            DatasetIntegrityError: with the full table in its message and this report as ``report``.
        """
        if self.errors:
            raise DatasetIntegrityError(
                f"{self.dataset}: the dataset integrity check found {_plural(len(self.errors), 'error')}; fix "
                f"them and run `autoseg check` again.\n{self.format_table()}", report=self)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary (paths relative to the dataset folder)."""
        return {
            "dataset": self.dataset, "n_cases": self.n_cases, "ok": self.ok,
            "n_errors": len(self.errors), "n_warnings": len(self.warnings),
            "problems": [{"severity": p.severity, "kind": p.kind, "case": p.case_id,
                          "file": None if p.path is None else self.relative_path(p.path),
                          "message": p.message, "fix": p.fix} for p in self.problems],
            **({"coverage": dict(self.coverage)} if self.coverage is not None else {}),
        }


def _shorten(text: str, width: int) -> str:
    """Keep the end of a long path (the file name matters most)."""
    return text if len(text) <= width else "..." + text[-(width - 3):]


def _row(cells: tuple[str, ...], widths: list[int]) -> str:
    """One table row; long cells wrap onto continuation lines inside their column."""
    wrapped = [textwrap.wrap(c, w, break_on_hyphens=False) or [""] for c, w in zip(cells, widths, strict=True)]
    height = max(len(w) for w in wrapped)
    out = []
    for i in range(height):
        parts = [(w[i] if i < len(w) else "").ljust(width) for w, width in zip(wrapped, widths, strict=True)]
        out.append("  ".join(parts).rstrip())
    return "\n".join(out)
