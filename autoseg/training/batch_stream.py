"""The background augmentation stream: worker processes that build batches of a :class:`~autoseg.training.dataloader.
PatchLoader` and apply the workers' transform (CPU augmentation, or only :class:`~autoseg.training.feeding.
CompactBatch` when the augmentation runs on the training device).

Worker processes are started with ``spawn`` (the same on Linux, macOS and Windows; no fork of a process that
holds torch threads) and each sends its batches through its own pipe, read round-robin, so the order never
depends on timing. Worker failures: an exception in the loader or a transform is sent back with its traceback
and raised in the main process as :class:`~autoseg.parallel.WorkerError` naming the case being read (or the
cases of the batch), instead of batchgenerators' generic "One or more background workers are no longer alive".
A worker that dies without reporting (out-of-memory killer, crash in native code) is named with its signal or
exit status. Workers end when the stream is closed, and by themselves when the main process is gone.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from autoseg.parallel import WorkerError, describe_exit
from autoseg.preprocessing.storage import set_read_threads
from autoseg.training.dataloader import ERROR_KEY, PatchLoader


class GuardedTransform:
    """Applies a transform with ``np.random`` seeded from the batch index, passing errors on as data."""

    def __init__(self, transform: Callable[..., dict[str, Any]]) -> None:
        self.transform = transform

    def __call__(self, **batch: Any) -> dict[str, Any]:
        if ERROR_KEY in batch:
            return batch
        try:
            np.random.seed(np.random.SeedSequence([batch["seed"], batch["batch_index"], 1]).generate_state(1)[0])
            return self.transform(**batch)
        except Exception:  # noqa: BLE001
            return {ERROR_KEY: traceback.format_exc(), "keys": batch.get("keys", [])}


def _produce(loader: PatchLoader, transform: GuardedTransform, worker: int, conn: Any, stop: Any,
             parent: int) -> None:
    """Worker process: send batches ``worker``, ``worker + n``, ... of the stream until told to stop, until the
    main process stops reading (closed pipe) or until the main process is gone."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # one BLAS thread per worker, as in batchgenerators
    set_read_threads(1)  # and one Blosc2 decompression thread
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    loader.set_thread_id(worker)
    try:
        while not stop.is_set() and os.getppid() == parent:
            batch = transform(**loader.generate_train_batch())
            try:
                conn.send(batch)
            except (BrokenPipeError, EOFError, ConnectionResetError):
                return
            except Exception:  # noqa: BLE001 - e.g. a batch that cannot be pickled
                conn.send({ERROR_KEY: traceback.format_exc(), "keys": list(batch.get("keys", []))})
    except (KeyboardInterrupt, BrokenPipeError, EOFError, ConnectionResetError):
        return  # Ctrl-C reaches every process of the group; the main process reports it


class BatchStream:
    """Iterator over augmented batches, computed by ``workers`` background processes (0 = in this process).

    Batch ``k`` comes from worker ``k % workers`` and batches are read in order, so the stream is the same for
    any number of workers. Processes start at the first batch and end with :meth:`close`. Each worker holds one
    finished batch while it waits to hand it over (``cached`` is accepted for compatibility and not used).
    """

    def __init__(self, loader: PatchLoader, transform: Callable[..., dict[str, Any]], *, workers: int,
                 pin_memory: bool = False, cached: int = 2) -> None:
        self._guarded = GuardedTransform(transform)
        self._loader = loader
        self.workers = max(0, int(workers))
        self.pin_memory = pin_memory
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        self._stop: Any = None
        self._taken = 0

    def __iter__(self) -> BatchStream:
        return self

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._loader.start += self._taken  # a restart after close() continues the stream where it stopped
        self._taken = 0
        self._loader.number_of_threads_in_multithreaded = self.workers
        self._stop = ctx.Event()
        for k in range(self.workers):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_produce, name=f"autoseg-batches-{k}", daemon=True,
                               args=(self._loader, self._guarded, k, writer, self._stop, os.getpid()))
            proc.start()
            writer.close()  # only the worker writes: its death closes the pipe
            self._conns.append(reader)
            self._procs.append(proc)

    def _receive(self) -> dict[str, Any]:
        if not self._procs:
            self._start()
        k = self._taken % self.workers
        conn, proc = self._conns[k], self._procs[k]
        try:
            while not conn.poll(0.2):
                if not proc.is_alive() and not conn.poll(0.5):
                    raise EOFError
            batch = conn.recv()
        except (EOFError, OSError) as err:
            proc.join(5)
            raise WorkerError(f"the data-loading worker process {k + 1} of {self.workers} "
                              f"{describe_exit(proc.exitcode)} "
                              f"while building batch {self._loader.start + self._taken}, without reporting an error. "
                              "Use fewer workers (--workers) or a smaller batch; --workers 0 builds the batches in the "
                              "main process.") from err
        self._taken += 1
        if self.pin_memory:
            from batchgenerators.dataloading.nondet_multi_threaded_augmenter import (
                pin_memory_of_all_eligible_items_in_dict,
            )

            batch = pin_memory_of_all_eligible_items_in_dict(batch)
        return batch

    def __next__(self) -> dict[str, Any]:
        if self.workers == 0:
            batch = self._guarded(**self._loader.generate_train_batch())
        else:
            batch = self._receive()
        if ERROR_KEY in batch:
            self.close()
            cases = ", ".join(batch.get("keys", [])) or "(no case chosen yet)"
            where = f"reading case {batch['case']} (batch cases: {cases})" if batch.get("case") else f"cases: {cases}"
            raise WorkerError(f"building a training batch failed ({where}); the worker's traceback:\n"
                              f"{batch[ERROR_KEY]}")
        return batch

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        if self._stop is not None:
            self._stop.set()
        for conn in self._conns:
            conn.close()  # a worker waiting to send gets a broken pipe and ends
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        self._conns, self._procs, self._stop = [], [], None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit multiprocessing may already be gone
            pass
