"""JSON and text files: atomic writes (temporary file in the same folder, then rename) and checked reads."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``.

    The temporary name keeps the file's suffixes (``.nii.gz`` stays recognisable to writers that pick
    the format from the name). On error the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temporary_affixes(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes owner-only files; finished files get the usual permissions
            os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temporary_affixes(path: Path) -> tuple[str, str]:
    return f".{path.name.split('.')[0]}.", "".join(path.suffixes) or ".tmp"


def remove_stale_temporaries(path: str | os.PathLike[str]) -> int:
    """Delete temporaries of ``path`` left by a killed writer (hidden ``.<stem>.<random><suffixes>`` files,
    the pattern :func:`atomic_path` uses); returns how many were removed."""
    path = Path(path)
    prefix, suffix = _temporary_affixes(path)
    pattern = re.compile(re.escape(prefix) + r"[a-z0-9_]{8}" + re.escape(suffix) + "$")
    removed = 0
    for p in path.parent.glob(f"{prefix}*") if path.parent.is_dir() else ():
        if pattern.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically; key order is kept."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike[str], error: type[Exception], fix: str) -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file raises ``error`` naming the file and ``fix``."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise error(f"{path}: not found, so it cannot be read. {fix}") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path}: cannot be read, not valid JSON ({err}). {fix}") from err
