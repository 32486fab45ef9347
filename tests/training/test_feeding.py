"""Keeping the device fed: the feeding thread, compact batches, worker sizing, the step's options."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from autoseg.errors import TrainingConfigError, WorkerError
from autoseg.training import settings as settings_module
from autoseg.training.feeding import CompactBatch, DeviceFeeder
from autoseg.training.loop import LOSS_READ_EVERY, TrainingLoop, _read_losses
from autoseg.training.optim import sgd
from autoseg.training.progress import TrainingLog
from autoseg.training.settings import TrainSettings


class _Stream:
    def __init__(self, n, fail_at=None):
        self.k, self.n, self.fail_at, self.closed = 0, n, fail_at, False

    def __next__(self):
        if self.k == self.fail_at:
            raise WorkerError("broken case")
        self.k += 1
        return {"data": np.full((1, 1, 2, 2), self.k, np.float32), "seg": np.zeros((1, 1, 2, 2), np.int16),
                "keys": [f"case{self.k}"]}

    def close(self):
        self.closed = True


def test_the_feeder_keeps_order_passes_errors_and_closes_the_stream():
    stream = _Stream(10, fail_at=5)
    feeder = DeviceFeeder(stream, torch.device("cpu"), transform=lambda b: {**b, "data": b["data"] * 2}, ahead=3)
    got = [float(next(feeder)["data"].max()) for _ in range(5)]
    assert got == [2.0, 4.0, 6.0, 8.0, 10.0]
    with pytest.raises(WorkerError, match="broken case"):
        next(feeder)
    feeder.close()
    assert stream.closed
    compact = CompactBatch()(data=np.zeros(1, np.float32), seg=np.array([-1, 3], np.int16))
    assert compact["seg"].dtype == np.int8 and compact["data"].dtype == np.float32


def test_float16_images_cross_the_pipe_only_for_cuda_autocast_and_are_exact_enough():
    assert CompactBatch.for_step("cuda", amp=True).half_images
    assert not CompactBatch.for_step("cuda", amp=False).half_images
    assert not CompactBatch.for_step("cpu", amp=True).half_images  # the CPU keeps float32
    rng = np.random.default_rng(0)
    zscored = rng.standard_normal((2, 4, 24, 24, 24)).astype(np.float32)  # max |x| about 5
    seg = np.zeros((2, 1, 24, 24, 24), np.int16)
    half = CompactBatch(half_images=True)(data=zscored.copy(), seg=seg)["data"]
    assert half.dtype == np.float16 and half.nbytes == zscored.nbytes // 2
    error = np.abs(half.astype(np.float32) - zscored)
    assert error.max() <= 2**-11 * np.abs(zscored).max()  # 11 significant bits (0.0019 here, |x| <= 4.7)
    assert (error <= 2**-11 * np.abs(zscored) + 2**-25).all() and error.max() < 2.5e-3  # 2**-25: subnormals
    huge = np.full((1, 1, 2, 2, 2), 1e5, np.float32)  # beyond float16's range: stays float32
    assert CompactBatch(half_images=True)(data=huge, seg=seg[:1, :, :2, :2, :2])["data"].dtype == np.float32


def test_workers_are_sized_from_cores_and_free_memory(monkeypatch):
    monkeypatch.setattr(settings_module.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(settings_module, "_free_memory_bytes", lambda: 64 * 2**30)
    assert TrainSettings().resolved_workers("cuda") == 8 and TrainSettings().resolved_workers("cpu") == 8
    monkeypatch.setattr(settings_module, "_free_memory_bytes", lambda: 5 * 2**30)
    assert TrainSettings().resolved_workers("cuda") == 2
    monkeypatch.setattr(settings_module, "_free_memory_bytes", lambda: 2**29)
    assert TrainSettings().resolved_workers("cpu") == 1
    assert TrainSettings(workers=3).resolved_workers("cpu") == 3
    assert settings_module._free_memory_bytes() > 0


def test_step_options_are_checked_and_safe_on_the_cpu(tmp_path):
    with pytest.raises(TrainingConfigError, match="amp_dtype"):
        TrainSettings(amp_dtype="float8")
    net = torch.nn.Conv3d(1, 1, 1)
    with torch.no_grad():
        net.weight.fill_(1.0)
        net.bias.fill_(0.0)
    opt = sgd(net.parameters(), lr=0.01, momentum=0.5)
    assert not opt.defaults.get("fused")  # fused only when every parameter is on CUDA
    loop = TrainingLoop(net, lambda out, t: (out - t).square().mean(), folder=tmp_path, device=torch.device("cpu"),
                        regions=False, ignore_label=None, amp=True, initial_lr=0.01, weight_decay=0.0, momentum=0.5,
                        grad_clip=1.0, optimizer=opt, amp_dtype=torch.bfloat16)
    assert loop.scaler is None
    batch = {"data": torch.ones(1, 1, 2, 2, 2), "target": torch.zeros(1, 1, 2, 2, 2)}
    losses: list[float] = []
    pending = [loop._step(batch) for _ in range(LOSS_READ_EVERY)]
    _read_losses(pending, losses)
    assert not pending and len(losses) == LOSS_READ_EVERY and losses == sorted(losses, reverse=True)
    assert 0 < loop.train_step(batch) < losses[-1]


def test_the_epoch_log_says_how_long_the_steps_waited_for_data(tmp_path):
    net = torch.nn.Conv3d(1, 1, 1)
    loop = TrainingLoop(net, lambda out, t: (out - t).square().mean(), folder=tmp_path, device=torch.device("cpu"),
                        regions=False, ignore_label=None, amp=False, initial_lr=0.01, weight_decay=0.0, momentum=0.5,
                        grad_clip=1.0)

    def slow():  # a loader 4x slower than nothing: every batch keeps the step waiting 40 ms
        while True:
            time.sleep(0.04)
            yield {"data": torch.ones(1, 1, 2, 2, 2), "target": torch.zeros(1, 1, 2, 2, 2)}

    log = TrainingLog(tmp_path / "log.jsonl")
    loop.run(slow(), iter(()), epochs=1, iters_per_epoch=5, val_iters=0, save_every=1, log=log, progress=False)
    (record,) = log.records
    assert 5 * 0.04 <= record["data_wait"] <= record["train_time"] <= record["epoch_time"]
    assert record["data_wait"] / record["train_time"] > 0.5  # the share train_pipeline.py reports
