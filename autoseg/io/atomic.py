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

try:
    import fcntl
except ImportError:  # Windows: no advisory locks (temporaries are then closed at once, and never locked)
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``.

    The temporary name keeps the file's suffixes (``.nii.gz`` stays recognisable to writers that pick
    the format from the name). On error the temporary file is removed and ``path`` is left untouched.
    While the writer lives the temporary is locked, so :func:`remove_stale_temporaries` (run by another
    process) leaves it alone. An ``OSError`` of the write (disk full, read-only, permissions) names ``path``,
    never the temporary name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temporary_affixes(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    except OSError as err:  # its filename is a temporary name the user never sees
        raise _naming(err, path) from err
    if fcntl is not None:
        with contextlib.suppress(OSError):  # a file system without locks: the temporary just goes unprotected
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when the fd closes, or when this process dies
    else:
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes owner-only files; finished files get the usual permissions
            os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except OSError as err:
        if type(err).__module__ != "builtins" or err.errno is None or (
                err.filename is not None and str(err.filename) != tmp):
            raise  # an autoseg error, or one about another file: unchanged
        raise _naming(err, path) from err
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
        if fcntl is not None:
            os.close(fd)


def _naming(err: OSError, path: Path) -> OSError:
    """The same error (same type and errno) with ``path`` as its file name."""
    return OSError(err.errno, err.strerror or str(err), str(path))


def ensure_writable(folder: str | os.PathLike[str]) -> Path:
    """Create ``folder`` if needed and check that a file can be written in it: a cheap test before long work,
    so that a read-only folder, missing permissions or a full disk stop a run at its start, not at its end.

    Returns:
        The folder as a Path.

    Raises:
        OSError: the folder cannot be made or written (its ``filename`` is the folder; the CLI turns it into
            one line with the fix).

    Example:
        >>> ensure_writable(tmp_path / "out")  # doctest: +SKIP
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd, probe = tempfile.mkstemp(prefix=".autoseg-write-test.", dir=folder)
    except OSError as err:
        raise _naming(err, folder) from err
    try:
        os.write(fd, b"\0")  # a full disk refuses the first block, not the empty file
    except OSError as err:
        raise _naming(err, folder) from err
    finally:
        os.close(fd)
        os.unlink(probe)
    return folder


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temporary_affixes(path: Path) -> tuple[str, str]:
    return f".{path.name.split('.')[0]}.", "".join(path.suffixes) or ".tmp"


def remove_stale_temporaries(*paths: str | os.PathLike[str]) -> int:
    """Delete temporaries of ``paths`` left by killed writers (hidden ``.<stem>.<random><suffixes>`` files,
    the pattern :func:`atomic_path` uses); returns how many were removed.

    Each folder is listed once however many paths it holds. A temporary that a live writer still holds
    (locked by :func:`atomic_path`, in this process or another) is kept.
    """
    by_folder: dict[Path, set[tuple[str, str]]] = {}
    for path in map(Path, paths):
        by_folder.setdefault(path.parent, set()).add(_temporary_affixes(path))
    removed = 0
    for folder, affixes in by_folder.items():
        try:
            names = [e.name for e in os.scandir(folder) if e.name.startswith(".") and e.is_file()]
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            prefix = f".{name[1:].split('.')[0]}."
            if (prefix, name[len(prefix) + 8:]) in affixes and _RANDOM.fullmatch(name[len(prefix):len(prefix) + 8]) \
                    and not _in_use(folder / name):
                (folder / name).unlink(missing_ok=True)
                removed += 1
    return removed


_RANDOM = re.compile(r"[a-z0-9_]{8}")  # the random part of a name tempfile.mkstemp makes


def _in_use(tmp: Path) -> bool:
    """True when a live writer holds the lock :func:`atomic_path` takes on its temporary."""
    if fcntl is None:
        return False
    try:
        fd = os.open(tmp, os.O_RDWR)  # NFS emulates flock with write locks, which need a writable fd
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no locks on this file system: treat as stale, as before locks existed
        return False
    finally:
        os.close(fd)
    return False


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
