"""Module-level jobs and transforms that fail in worker processes on purpose (spawned workers import them by name;
a monkeypatch would not reach them)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from autoseg.errors import ImageReadError

BAD = 3  # the item that fails


def double_or_raise(item: int) -> int:
    if item == BAD:
        raise ValueError(f"intensity overflow in item {item}")
    time.sleep(0.05)
    return 2 * item


def double_or_exit(item: int) -> int:
    if item == BAD:
        os._exit(3)  # a library calling exit: no exception, no traceback
    time.sleep(0.3)
    return 2 * item


def double_or_sigkill(item: int) -> int:
    if item == BAD:
        os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does
    time.sleep(0.3)
    return 2 * item


def double_or_autoseg_error(item: int) -> int:
    if item == BAD:
        raise ImageReadError(f"case_{item}_0000.nii.gz: the file is truncated. Re-copy it.")
    return 2 * item


def double_or_unpicklable(item: int) -> Any:
    return (lambda: item) if item == BAD else 2 * item


def exit_transform(**batch: Any) -> dict[str, Any]:
    os._exit(5)


def sigkill_transform(**batch: Any) -> dict[str, Any]:
    os.kill(os.getpid(), signal.SIGKILL)
    return batch
