"""Patch sampling from preprocessed cases: :class:`CaseStore` reads them (memory-mapped), :class:`PatchLoader`
draws the batches.

Sampling (per batch of ``B``): cases are drawn uniformly with replacement; the last ``round(B * 0.33)``
samples are forced to contain foreground. A forced sample picks a label uniformly among the labels present
in the case (class-aware: a rare class is drawn as often as a common one), then, with probability 1/2, a
connected component of that label uniformly (lesion-aware: a 20-voxel metastasis is drawn as often as the
large lesion next to it) or else a voxel uniformly, and centres the patch there. Data outside the image are
padded with 0 and labels with ``-1``.

Randomness: batch ``k`` of a stream is a pure function of ``(seed, k)``, whatever the number of worker
processes, so ``--resume`` from epoch ``e`` continues with exactly the batches an uninterrupted run sees. A failure
to read a case becomes a batch holding :data:`ERROR_KEY` (the traceback), which the worker processes of
:mod:`autoseg.training.batch_stream` hand to the main process; :mod:`autoseg.training.feeding` moves the batches
onto the training device.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from batchgenerators.dataloading.data_loader import SlimDataLoaderBase

from autoseg.plugins.channels import ChannelStack
from autoseg.preprocessing.cropping import OUTSIDE
from autoseg.preprocessing.preprocess import case_paths
from autoseg.preprocessing.storage import load_case_array

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
