"""Feeding the training device: the worker-side :class:`CompactBatch` (fewer bytes through the worker pipes) and
:class:`DeviceFeeder`, a thread that receives the next batches, pins them, copies them to the device and augments
them there, ahead of the step."""

from __future__ import annotations

from collections.abc import Callable
from queue import Empty, Full
from typing import Any

import numpy as np

from autoseg.parallel import WorkerError


class CompactBatch:
    """Worker-side step of the on-device augmentation: the cropped batch with labels as int8 (when they fit), so
    that a quarter of the bytes of int16 cross the pipe, and with ``half_images`` the images as float16 (half the
    bytes; :meth:`for_step` says when); everything else passes through.

    float16 keeps 11 significant bits: on z-scored images (|x| < 8 for all but outliers) the error is at most
    2**-11 of the value, under 0.002, less than what float16 or bfloat16 autocast rounds the network's input to.
    Images with a value beyond float16's range (65504) stay float32. The augmentation on the device computes in
    float32 again.
    """

    def __init__(self, *, half_images: bool = False) -> None:
        self.half_images = half_images

    @classmethod
    def for_step(cls, device_type: str, amp: bool) -> CompactBatch:
        """The compaction for a training step: float16 images only for a CUDA device that trains with autocast."""
        return cls(half_images=device_type == "cuda" and amp)

    def __call__(self, **batch: Any) -> dict[str, Any]:
        seg, data = batch["seg"], batch["data"]
        if seg.size and -128 <= int(seg.min()) and int(seg.max()) <= 127:
            batch["seg"] = seg.astype(np.int8)
        if self.half_images and data.size and float(np.abs(data).max()) <= float(np.finfo(np.float16).max):
            batch["data"] = data.astype(np.float16)
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
