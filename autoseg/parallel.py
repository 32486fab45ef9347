"""A spawn-safe process pool over cases that shows the worker's own traceback.

Workers are started with the ``spawn`` method on every platform (Linux, macOS, Windows behave the same;
no fork of a process that holds threads or a torch runtime). Results come back in input order. A worker
exception is re-raised in the main process as :class:`WorkerError` naming the item it was processing and
carrying the worker's formatted traceback; remaining work is cancelled.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from tqdm import tqdm

from autoseg.errors import AutosegError

T = TypeVar("T")
R = TypeVar("R")


class WorkerError(AutosegError, RuntimeError):
    """A worker failed on one item; the message holds the item and the worker's traceback."""


def _call(fn: Callable[[T], R], item: T) -> tuple[bool, Any]:
    try:
        return True, fn(item)
    except AutosegError as err:
        return False, (err, None)
    except BaseException as err:  # noqa: BLE001 - everything must reach the parent with its traceback
        return False, (None, f"{type(err).__name__}: {err}\n{traceback.format_exc()}")


def imap_ordered(fn: Callable[[T], R], items: Iterable[T], *, jobs: int = 1, desc: str = "",
                 label: Callable[[T], str] = str, progress: bool = True,
                 max_in_flight: int | None = None) -> Iterator[R]:
    """Apply ``fn`` to every item, ``jobs`` processes at a time, yielding results in input order.

    At most ``max_in_flight`` items (default ``2 * jobs``) are submitted at once, so memory stays bounded
    by a few items even for a large dataset. ``fn`` must be a module-level function (picklable).

    Raises:
        AutosegError: an :class:`AutosegError` raised by ``fn`` is re-raised unchanged.
        WorkerError: any other exception, with the item's label and the worker's traceback.
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
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            pending: dict[int, Any] = {}
            done: dict[int, tuple[bool, Any]] = {}
            nxt_submit = nxt_yield = 0
            try:
                while nxt_yield < len(items):
                    while nxt_submit < len(items) and len(pending) + len(done) < limit:
                        pending[nxt_submit] = pool.submit(_call, fn, items[nxt_submit])
                        nxt_submit += 1
                    if nxt_yield not in done:
                        finished, _ = wait(pending.values(), return_when=FIRST_COMPLETED)
                        for i in [i for i, f in pending.items() if f in finished]:
                            try:
                                done[i] = pending.pop(i).result()
                            except BrokenProcessPool as err:
                                raise WorkerError(
                                    f"a worker process died while processing {label(items[i])} (it was killed, "
                                    "most often for running out of memory, or could not start). Rerun with fewer "
                                    "processes (-j 1); if it still fails, check that case's files.") from err
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


def _unwrap(res: tuple[bool, Any], item_label: str) -> Any:
    ok, value = res
    if ok:
        return value
    err, tb = value
    if err is not None:
        raise err
    raise WorkerError(f"processing {item_label} failed in a worker process:\n{tb}")
