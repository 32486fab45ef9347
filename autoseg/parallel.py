"""A spawn-safe process pool over cases that shows the worker's own traceback.

Workers are started with the ``spawn`` method on every platform (Linux, macOS, Windows behave the same;
no fork of a process that holds threads or a torch runtime). Results come back in input order. A worker
exception is re-raised in the main process as :class:`WorkerError` naming the item it was processing and
carrying the worker's formatted traceback; remaining work is cancelled. A worker that dies without reporting (killed
by the out-of-memory killer, a crash in native code, a library calling ``exit``) is named with the item it was
processing and how it ended (signal or exit status).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from tqdm import tqdm

from autoseg.errors import AutosegError, WorkerError, describe_os_error

T = TypeVar("T")
R = TypeVar("R")


#: in a worker process: per item index, the pid of the worker processing it (0: not running); set by _init_worker
_RUNNING: Any = None


def _init_worker(running: Any) -> None:
    global _RUNNING
    _RUNNING = running
    _exit_with_parent()


def _exit_with_parent() -> None:
    """End this worker when the main process dies (killed by the out-of-memory killer, say): an orphaned pool
    worker would otherwise wait for work forever, holding its memory."""
    parent = mp.parent_process()
    if parent is not None:
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), name="autoseg-parent-watch", daemon=True).start()


def _call(fn: Callable[[T], R], item: T) -> tuple[bool, Any]:
    try:
        return True, fn(item)
    except AutosegError as err:
        return False, (err, None)
    except OSError as err:
        if describe_os_error(err) is not None:  # disk full, read-only, permissions: re-raised as is, not a bug report
            return False, (err, None)
        return False, (None, f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
    except BaseException as err:  # noqa: BLE001 - everything must reach the parent with its traceback
        return False, (None, f"{type(err).__name__}: {err}\n{traceback.format_exc()}")


def _call_in_worker(fn: Callable[[T], R], item: T, index: int) -> tuple[bool, Any]:
    """:func:`_call` in a pool process: records which item this process works on, and keeps the traceback of an
    :class:`AutosegError` (shown with ``--debug``)."""
    _RUNNING[index] = os.getpid()
    try:
        ok, value = _call(fn, item)
        if not ok and value[0] is not None:
            value = (value[0], "".join(traceback.format_exception(value[0])))
        return ok, value
    finally:
        _RUNNING[index] = 0


def imap_ordered(fn: Callable[[T], R], items: Iterable[T], *, jobs: int = 1, desc: str = "",
                 label: Callable[[T], str] = str, progress: bool = True,
                 max_in_flight: int | None = None) -> Iterator[R]:
    """Apply ``fn`` to every item, ``jobs`` processes at a time, yielding results in input order.

    At most ``max_in_flight`` items (default ``2 * jobs``) are submitted at once, so memory stays bounded
    by a few items even for a large dataset. ``fn`` must be a module-level function (picklable).

    Raises:
        AutosegError: an :class:`AutosegError` raised by ``fn`` is re-raised unchanged.
        WorkerError: any other exception, with the item's label and the worker's traceback; a worker that died,
            with the item it was processing and its signal or exit status.
    """
    items = list(items)
    bar = tqdm(total=len(items), desc=desc, disable=not progress or not items, leave=False)
    try:
        if jobs <= 1 or len(items) <= 1:
            for it in items:
                yield _unwrap(_call(fn, it), label(it))
                bar.update()
            return
        limit = max_in_flight or 2 * jobs
        ctx = mp.get_context("spawn")
        running = ctx.Array("i", len(items), lock=False)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(running,)) as pool:
            pending: dict[int, Any] = {}
            done: dict[int, tuple[bool, Any]] = {}
            procs: dict[int, Any] = {}  # pid -> process, kept to read exit codes after a worker died
            nxt_submit = nxt_yield = 0
            try:
                while nxt_yield < len(items):
                    while nxt_submit < len(items) and len(pending) + len(done) < limit:
                        pending[nxt_submit] = pool.submit(_call_in_worker, fn, items[nxt_submit], nxt_submit)
                        procs.update(getattr(pool, "_processes", None) or {})
                        nxt_submit += 1
                    if nxt_yield not in done:
                        finished, _ = wait(pending.values(), return_when=FIRST_COMPLETED)
                        for i in [i for i, f in pending.items() if f in finished]:
                            try:
                                done[i] = pending.pop(i).result()
                            except BrokenProcessPool as err:
                                pool.shutdown(wait=True)  # every worker has ended: exit codes are known
                                raise WorkerError(_death_message(running, procs, items, label)) from err
                            except Exception as err:  # noqa: BLE001 - e.g. an item or result that cannot be pickled
                                fail = WorkerError(
                                    f"processing {label(items[i])}: the item or its result could not be passed "
                                    f"between processes ({type(err).__name__}: {err}). Rerun with -j 1; if it still "
                                    "fails, this is a bug in autoseg.")
                                fail.__cause__ = err
                                done[i] = (False, (fail, None))  # raised in turn, after the items before it
                            bar.update()
                    while nxt_yield in done:
                        yield _unwrap(done.pop(nxt_yield), label(items[nxt_yield]))
                        nxt_yield += 1
            except BaseException:
                for f in pending.values():
                    f.cancel()
                raise
    finally:
        bar.close()


def describe_exit(code: int | None) -> str:
    """How a process ended, from its exit code: ``was killed by SIGKILL (...)`` or ``exited with status N ...``."""
    if code is None:
        return "ended"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = " (most often the system's out-of-memory killer)" if -code == getattr(signal, "SIGKILL", 9) else ""
        return f"was killed by {name}{why}"
    return f"exited with status {code} without reporting an error (native code or a library called exit)"


def _death_message(running: Any, procs: dict[int, Any], items: list[Any], label: Callable[[Any], str]) -> str:
    """Which item(s) a dead pool worker was processing and how it ended (SIGTERM marks the workers the pool
    stopped itself after the death)."""
    active = {i: pid for i, pid in enumerate(running) if pid}
    codes = {pid: p.exitcode for pid, p in procs.items()}
    dead = {i: codes.get(pid) for i, pid in active.items()
            if codes.get(pid) is not None and codes.get(pid) != -signal.SIGTERM}
    if len(dead) == 1:
        (i, code), = dead.items()
        what = f"the worker process processing {label(items[i])} {describe_exit(code)}"
    elif active:
        what = ("a worker process died while processing one of " + ", ".join(label(items[i]) for i in sorted(active))
                + " (they ran at the same time)")
    else:
        what = "a worker process died before it took an item (it could not start, or was killed)"
    return (f"{what}. Finished items are kept. Rerun with fewer processes (-j 1), which uses less memory; if it "
            "still fails, check that case's files.")


def _unwrap(res: tuple[bool, Any], item_label: str) -> Any:
    ok, value = res
    if ok:
        return value
    err, tb = value
    if err is not None:
        if tb:
            err.add_note(f"raised in a worker process while processing {item_label}:\n{tb}")
        raise err
    raise WorkerError(f"processing {item_label} failed in a worker process:\n{tb}")
