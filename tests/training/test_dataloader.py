"""Patch sampling and the background batch stream."""

from __future__ import annotations

import numpy as np
import pytest

from autoseg.parallel import WorkerError
from autoseg.training.batch_stream import BatchStream
from autoseg.training.dataloader import CaseStore, PatchLoader


def _store(tiny_brats, config="3d_fullres"):
    ds, wd, plans = tiny_brats
    return CaseStore(wd / "preprocessed" / plans.configuration(config).data_identifier,
                     [c.case_id for c in ds.cases])


def test_forced_samples_contain_foreground_and_batches_are_reproducible(tiny_brats):
    store = _store(tiny_brats)
    loader = PatchLoader(store, patch_size=(16, 16, 16), final_patch_size=(16, 16, 16), batch_size=3, seed=7)
    batches = [loader.generate_train_batch() for _ in range(10)]
    assert all(b["data"].shape == (3, 2, 16, 16, 16) and b["seg"].shape == (3, 1, 16, 16, 16) for b in batches)
    assert all((b["seg"][-1] > 0).any() for b in batches)  # round(3 * 0.33) = 1 forced sample, the last
    again = PatchLoader(store, patch_size=(16, 16, 16), final_patch_size=(16, 16, 16), batch_size=3, seed=7, start=4)
    assert np.array_equal(again.generate_train_batch()["data"], batches[4]["data"])  # resume mid-stream


def test_two_worker_copies_interleave_to_the_same_stream(tiny_brats):
    store = _store(tiny_brats)
    kw = dict(patch_size=(16, 16, 16), final_patch_size=(16, 16, 16), batch_size=2, seed=3)
    single = PatchLoader(store, **kw)
    ref = [single.generate_train_batch()["keys"] for _ in range(4)]
    copies = [PatchLoader(store, threads=2, **kw) for _ in range(2)]
    for t, c in enumerate(copies):
        c.set_thread_id(t)
    got = [copies[i % 2].generate_train_batch()["keys"] for i in range(4)]
    assert got == ref


def test_2d_loader_samples_slices(tiny_brats):
    store = _store(tiny_brats, "2d")
    loader = PatchLoader(store, patch_size=(16, 16), final_patch_size=(16, 16), batch_size=2, seed=0)
    assert loader.generate_train_batch()["data"].shape == (2, 2, 16, 16)


def _broken_transform(**batch):
    raise ValueError("brightness factor exploded")


@pytest.mark.parametrize("workers", [0, 1])
def test_a_failing_worker_shows_its_own_traceback_and_the_cases(tiny_brats, workers):
    store = _store(tiny_brats)
    loader = PatchLoader(store, patch_size=(16, 16, 16), final_patch_size=(16, 16, 16), batch_size=2, seed=0)
    stream = BatchStream(loader, _broken_transform, workers=workers)
    try:
        with pytest.raises(WorkerError) as info:
            next(stream)
    finally:
        stream.close()
    msg = str(info.value)
    assert "brightness factor exploded" in msg and "_broken_transform" in msg and "case_" in msg
