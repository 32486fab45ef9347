"""Patch sampling from preprocessed cases, and the background augmentation stream.

Sampling (per batch of ``B``): cases are drawn uniformly with replacement; the last ``round(B * 0.33)``
samples are forced to contain foreground. A forced sample picks a label uniformly among the labels present
in the case (class-aware: a rare class is drawn as often as a common one), then, with probability 1/2, a
connected component of that label uniformly (lesion-aware: a 20-voxel metastasis is drawn as often as the
large lesion next to it) or else a voxel uniformly, and centres the patch there. Data outside the image are
padded with 0 and labels with ``-1``.

Randomness: batch ``k`` of a stream is a pure function of ``(seed, k)``, whatever the number of worker
processes, so ``--resume`` from epoch ``e`` continues with exactly the batches an uninterrupted run sees.

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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from queue import Empty, Full
from typing import Any

import numpy as np
from batchgenerators.dataloading.data_loader import SlimDataLoaderBase

from autoseg.parallel import WorkerError, describe_exit
from autoseg.plugins.channels import ChannelStack
from autoseg.preprocessing.cropping import OUTSIDE
from autoseg.preprocessing.preprocess import case_paths
from autoseg.preprocessing.storage import load_case_array, set_read_threads

OVERSAMPLE_FOREGROUND = 0.33
ERROR_KEY = "__worker_error__"


class CaseStore:
    """Memory-mapped access to preprocessed cases (opened lazily, once per process); ``extra_folders`` hold
    channel plugins' ``<case>.npy``, appended after the image channels.

    Each case is opened in the format it is stored in (``.npy`` memory maps, or Blosc2 NDArrays whose slices
    decompress only the blocks a patch touches; :func:`~autoseg.preprocessing.storage.load_case_array`): both give
    the same arrays, so a dataset trains identically from either.
    """

    def __init__(self, folder: str | Path, case_ids: Sequence[str], *, prev_folder: str | Path | None = None,
                 extra_folders: Sequence[str | Path] = ()) -> None:
        self.folder = Path(folder)
        self.case_ids = tuple(case_ids)
        self.prev_folder = Path(prev_folder) if prev_folder is not None else None
        self.extra_folders = tuple(Path(f) for f in extra_folders)
        self._open: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = {}

    def get(self, case_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """``(data, seg, fg_locations, prev_seg or None)`` of a case; data and seg are sliced lazily."""
        if case_id not in self._open:
            p = case_paths(self.folder, case_id)  # the format the case is stored in
            prev = None
            if self.prev_folder is not None:
                prev = load_case_array(self.prev_folder / f"{case_id}_prev.npy")
            data = load_case_array(p["data"])
            if self.extra_folders:
                data = ChannelStack([data, *(load_case_array(f / f"{case_id}.npy") for f in self.extra_folders)])
            self._open[case_id] = (data, load_case_array(p["seg"]), load_case_array(p["fg"], mmap=False), prev)
        return self._open[case_id]

    def __getstate__(self) -> dict[str, Any]:  # memmaps are reopened in each worker
        return {**self.__dict__, "_open": {}}


def _crop_padded(arr: np.ndarray, lo: Sequence[int], size: Sequence[int], fill: float) -> np.ndarray:
    """``arr[:, lo:lo+size]`` over the trailing axes, padded with ``fill`` where the box leaves the array."""
    spatial = arr.shape[1:]
    src = tuple(slice(max(0, a), min(s, a + n)) for a, n, s in zip(lo, size, spatial, strict=True))
    out = np.full((arr.shape[0], *size), fill, dtype=arr.dtype)
    dst = tuple(slice(sl.start - a, sl.stop - a) for sl, a in zip(src, lo, strict=True))
    out[(slice(None),) + dst] = arr[(slice(None),) + src]
    return out


class PatchLoader(SlimDataLoaderBase):
    """Infinite stream of batches ``{"data": (B, C, *patch), "seg": (B, 1|2, *patch), "keys": [...]}``.

    For a 2D configuration on volumes, a sample is a random slice along axis 0 (the slice of the chosen
    foreground voxel when forced).

    Args:
        store: the preprocessed cases.
        patch_size: patch to extract (the augmentation's initial, larger patch).
        final_patch_size: the patch after augmentation; windows may reach ``(patch - final) / 2`` outside
            the image so that the final patch can sit at the image border.
        batch_size: samples per batch.
        seed: stream seed.
        start: index of the first batch (resume).
        oversample: fraction of forced-foreground samples per batch.
        threads: number of worker processes reading from copies of this loader (1 for none).
        annotated: for partially annotated datasets, per case which network outputs were annotated
            (:func:`~autoseg.io.annotations.annotated_outputs`); the batch then carries them as ``"annotated"``
            (bool ``(B, K)``). None: no such key.
    """

    def __init__(self, store: CaseStore, *, patch_size: Sequence[int], final_patch_size: Sequence[int],
                 batch_size: int, seed: int, start: int = 0, oversample: float = OVERSAMPLE_FOREGROUND,
                 threads: int = 1, annotated: Mapping[str, Sequence[bool]] | None = None) -> None:
        super().__init__(store, batch_size, max(1, threads))
        self.store = store
        self.patch_size = tuple(int(p) for p in patch_size)
        self.final_patch_size = tuple(int(p) for p in final_patch_size)
        self.seed = int(seed)
        self.start = int(start)
        self.oversample = oversample
        self.annotated = dict(annotated) if annotated else None
        self._count = 0

    def batch_index(self) -> int:
        """Global index of the next batch this copy produces (copies interleave round-robin)."""
        return self.start + self._count * self.number_of_threads_in_multithreaded + self.thread_id

    def generate_train_batch(self) -> dict[str, Any]:
        k = self.batch_index()
        self._count += 1
        keys: list[str] = []
        try:
            rng = np.random.default_rng([self.seed, k])
            n_forced = round(self.batch_size * self.oversample)
            data, segs = [], []
            for j in range(self.batch_size):
                cid = self.store.case_ids[int(rng.integers(len(self.store.case_ids)))]
                keys.append(cid)
                d, s = self._sample(cid, rng, forced=j >= self.batch_size - n_forced)
                data.append(d)
                segs.append(s)
            batch = {"data": np.stack(data), "seg": np.stack(segs), "keys": keys, "batch_index": k, "seed": self.seed}
            if self.annotated is not None:
                batch["annotated"] = np.array([self.annotated[c] for c in keys], dtype=bool)
            return batch
        except Exception:  # noqa: BLE001 - sent to the main process with its traceback
            return {ERROR_KEY: traceback.format_exc(), "keys": keys, "case": keys[-1] if keys else None}

    def _sample(self, cid: str, rng: np.random.Generator, *, forced: bool) -> tuple[np.ndarray, np.ndarray]:
        data, seg, fg, prev = self.store.get(cid)
        two_d = len(self.patch_size) == data.ndim - 2
        spatial = data.shape[1:]
        center = _pick_foreground(fg, rng) if forced else None
        if two_d:
            z = int(center[0]) if center is not None else int(rng.integers(spatial[0]))
            data, seg = data[:, z], seg[:, z]
            prev = prev[:, z] if prev is not None else None
            center = center[1:] if center is not None else None
            spatial = spatial[1:]
        lo = []
        for ax, (s, p, fp) in enumerate(zip(spatial, self.patch_size, self.final_patch_size, strict=True)):
            need = max(0, p - fp) + max(0, fp - s)  # context margin + padding of a too-small image
            low, high = -(need // 2), s + need // 2 + need % 2 - p
            high = max(high, low)
            if center is not None:
                lo.append(int(np.clip(int(center[ax]) - p // 2, low, high)))
            else:
                lo.append(int(rng.integers(low, high + 1)))
        d = _crop_padded(data, lo, self.patch_size, 0).astype(np.float32, copy=False)
        s = _crop_padded(seg, lo, self.patch_size, OUTSIDE).astype(np.int16, copy=False)
        if prev is not None:
            s = np.concatenate([s, _crop_padded(prev, lo, self.patch_size, 0).astype(np.int16, copy=False)])
        return d, s


def _pick_foreground(fg: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """A stored foreground location: label uniformly, then a component (p 1/2) or a voxel uniformly."""
    if fg.shape[0] == 0:
        return None
    labels = np.unique(fg[:, 0])
    rows = fg[fg[:, 0] == labels[rng.integers(labels.size)]]
    if rng.random() < 0.5:
        comps = np.unique(rows[:, 1])
        rows = rows[rows[:, 1] == comps[rng.integers(comps.size)]]
    return rows[rng.integers(rows.shape[0]), 2:]


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


class CompactBatch:
    """Worker-side step of the on-device augmentation: the cropped batch with labels as int8 (when they fit), so
    that a quarter of the bytes of int16 cross the pipe; everything else passes through."""

    def __call__(self, **batch: Any) -> dict[str, Any]:
        seg = batch["seg"]
        if seg.size and -128 <= int(seg.min()) and int(seg.max()) <= 127:
            batch["seg"] = seg.astype(np.int8)
        return batch


def _to_device(x: Any, device: Any, pin: bool) -> Any:
    """Arrays and tensors (also inside lists) as tensors on ``device`` (pinned first when ``pin``)."""
    import torch

    if isinstance(x, (list, tuple)):
        return [_to_device(v, device, pin) for v in x]
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        return x
    if pin and x.device.type == "cpu":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


class DeviceFeeder:
    """Iterator that keeps ``ahead`` batches of ``stream`` ready on ``device``, in order, from a background thread.

    The thread receives each batch, pins it (CUDA), copies its arrays and tensors to the device and applies
    ``transform`` there (e.g. a :class:`~autoseg.training.batch_augment.BatchAugmenter`), while the main thread
    trains on the previous one. An error of the stream or the transform is raised by ``next`` in order. The thread
    starts at the first ``next`` (so it inherits that thread's signal mask) and :meth:`close` ends it and closes
    ``stream``. A stream without worker processes (``workers == 0``) is read in the calling thread: its transforms
    seed numpy's global generator, which two threads cannot share.
    """

    def __init__(self, stream: Any, device: Any, *, transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 ahead: int = 2) -> None:
        self.stream, self.device, self.transform = stream, device, transform
        self.ahead = max(1, int(ahead))
        self._queue: Any = None
        self._thread: Any = None
        self._stop: Any = None

    def __iter__(self) -> DeviceFeeder:
        return self

    def _make(self) -> dict[str, Any]:
        pin = getattr(self.device, "type", str(self.device)) == "cuda"
        batch = {k: _to_device(v, self.device, pin) for k, v in next(self.stream).items()}
        return self.transform(batch) if self.transform is not None else batch

    def _fill(self, queue: Any, stop: Any) -> None:
        while not stop.is_set():
            try:
                item: Any = self._make()
            except BaseException as err:  # noqa: BLE001 - handed to the main thread
                item = err
            while not stop.is_set():
                try:
                    queue.put(item, timeout=0.1)
                    break
                except Full:
                    continue
            if isinstance(item, BaseException):
                return

    def __next__(self) -> dict[str, Any]:
        import queue as queue_mod
        import threading

        if getattr(self.stream, "workers", 1) == 0:
            return self._make()  # batches built in this process seed numpy's global generator: never two at once
        if self._thread is None:
            self._queue, self._stop = queue_mod.Queue(maxsize=self.ahead), threading.Event()
            self._thread = threading.Thread(target=self._fill, args=(self._queue, self._stop), daemon=True,
                                            name="autoseg-device-feeder")
            self._thread.start()
        while True:
            try:
                item = self._queue.get(timeout=0.5)
                break
            except Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise WorkerError("the batch feeder thread ended without a batch or an error") from None
        if isinstance(item, BaseException):
            self._thread.join()
            self._thread = None
            raise item
        return item

    def close(self) -> None:
        """Stop the thread and close the stream (idempotent)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(30)
            self._thread = None
        if hasattr(self.stream, "close"):
            self.stream.close()
