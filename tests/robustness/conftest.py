"""Shared pieces of the robustness suites: a clean tiny dataset, a planned and trained work folder made from it
through the CLI, and helpers that run the CLI in-process and fingerprint folders (to prove nothing changed)."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest

from autoseg.cli import main
from autoseg.data.synthetic import make_synthetic_dataset

TRAIN_FAST = ["--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1", "--workers", "0", "--device", "cpu"]


class Cli:
    """Runs ``autoseg`` in-process and returns ``(exit status, stdout, stderr)``."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        status = main(["-q", *map(str, argv)])
        out, err = self.capsys.readouterr()
        return status, out, err


@pytest.fixture
def cli(capsys) -> Cli:
    return Cli(capsys)


def _snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (relative path -> hash): equal snapshots mean nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def unwrap_tables(text: str) -> str:
    """``text`` with every integrity-check table row on one line (cells re-joined across their wrapped lines),
    so a phrase can be searched for whatever the column widths."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        if i + 1 < len(lines) and lines[i].startswith("severity") and set(lines[i + 1]) <= {"-", " "}:
            spans = [(m.start(), m.end()) for m in re.finditer(r"-+", lines[i + 1])]
            i += 2
            rows: list[list[list[str]]] = []
            while i < len(lines) and not re.match(r"\d+ errors?, ", lines[i]):
                if not lines[i].strip():
                    i += 1
                    continue
                cells = [lines[i][a:b if k + 1 < len(spans) else None].strip() for k, (a, b) in enumerate(spans)]
                if cells[0] or not rows:
                    rows.append([[c] for c in cells])
                else:
                    for col, c in zip(rows[-1], cells):
                        col.append(c)
                i += 1
            out += ["  ".join(" ".join(filter(None, col)) for col in row) for row in rows]
            continue
        out.append(lines[i])
        i += 1
    return "\n".join(out)


def _assert_clear_error(status: int, err: str, *needles: str) -> None:
    """Exit 2, one ``autoseg ...: error:`` message holding every needle (file, problem, fix), no traceback."""
    assert status == 2, err
    assert "Traceback" not in err and "unexpected" not in err, err
    assert "error:" in err
    assert_mentions(err, *needles)


def assert_mentions(text: str, *needles: str) -> None:
    flat = unwrap_tables(text)
    for needle in needles:
        assert needle in flat, f"{needle!r} not in:\n{flat}"


@pytest.fixture
def snapshot():
    """``snapshot(folder)``: SHA-256 of every file under it (equal snapshots: nothing changed)."""
    return _snapshot


@pytest.fixture
def clear_error():
    """``clear_error(status, stderr, *needles)``: asserts exit 2, one message with every needle, no traceback."""
    return _assert_clear_error


@pytest.fixture
def mentions():
    """``mentions(text, *needles)``: asserts every needle is in ``text`` (check tables unwrapped)."""
    return assert_mentions


@pytest.fixture(scope="session")
def clean_dataset(tmp_path_factory) -> Path:
    """Three 2-channel 16^3 cases with a binary label (small enough that the plan has a 2-stage network)."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("clean") / "Dataset001_Clean", n_cases=3,
                                  shape=(16, 16, 16), n_channels=2, kind="binary", seed=3, shape_jitter=0)


@pytest.fixture(scope="session")
def clean_work(tmp_path_factory, clean_dataset) -> Path:
    """The clean dataset planned, preprocessed and trained (fold 0, one tiny epoch) through the CLI, and its
    training images predicted into ``<work>/../predicted``."""
    work = tmp_path_factory.mktemp("clean_work") / "work"
    assert main(["-q", "plan", str(clean_dataset), "--workdir", str(work), "--preset", "cpu", "-j", "1"]) == 0
    assert main(["-q", "train", str(clean_dataset), "3d_fullres", "0", "--workdir", str(work), *TRAIN_FAST]) == 0
    assert main(["-q", "predict", "-i", str(clean_dataset / "imagesTr"), "-o", str(work.parent / "predicted"),
                 "--workdir", str(work), "--device", "cpu", "--no-tta"]) == 0
    return work


@pytest.fixture
def copy_of(tmp_path):
    """Copy a folder into this test's tmp_path (keeping its name) and return the copy."""
    def copy(folder: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or folder.name)
        shutil.copytree(folder, dst)
        return dst
    return copy
