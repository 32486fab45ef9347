"""Preemption (SLURM sends SIGTERM, or SIGUSR1 with --signal, before it kills a job): training finishes the iteration
under way, saves checkpoint_latest.pt at the point reached, exits with status 75, and --resume continues exactly: the
same log.jsonl losses and the same weights as a run never interrupted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import autoseg.training.run as run_module
from autoseg.api import train
from autoseg.errors import TrainingInterrupted
from autoseg.networks.checkpoint import FINAL, LATEST, load_checkpoint
from autoseg.training.preemption import PreemptionSignals

posix = pytest.mark.skipif(not hasattr(signal, "SIGUSR1") or not hasattr(os, "killpg"), reason="POSIX signals")
FAST = {"epochs": 3, "iters_per_epoch": 4, "val_iters": 2, "workers": 0, "device": "cpu", "progress": False,
        "validate": False, "deterministic": True, "save_every": 10}
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def planned(tmp_path_factory, planned_factory):
    """A planned, preprocessed tiny dataset and an uninterrupted reference run of fold 0: (dataset, workdir, ref)."""
    ds, wd, _ = planned_factory(tmp_path_factory.mktemp("preempt"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = Path(shutil.copytree(wd, wd.parent / "ref"))
        train(ds.root, "3d_fullres", 0, workdir=ref, **FAST)
        yield ds, wd, _fold(ref)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference run; two threads on a shared 2-core machine are slower
    yield
    torch.set_num_threads(before)


def _fold(wd: Path) -> Path:
    return wd / "models" / "3d_fullres" / "fold_0"


def _records(folder: Path) -> list[dict]:
    """log.jsonl without the timings."""
    rows = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("epoch_time", "train_time", "data_wait")} for r in rows]


class _SignalAt:
    """A batch stream that sends ``sig`` to this process while its ``at``-th batch (from 0) is being handed over."""

    def __init__(self, stream, at: int, sig: int) -> None:
        self.stream, self.at, self.sig, self.n = stream, at, sig, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.n == self.at:
            os.kill(os.getpid(), self.sig)
        self.n += 1
        return next(self.stream)

    def close(self) -> None:
        self.stream.close()


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_checkpoint(a / FINAL)["network"], load_checkpoint(b / FINAL)["network"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@posix
@pytest.mark.parametrize(("signame", "stream", "at", "where"), [
    ("SIGTERM", 0, 5, (1, 2)),  # training batch 5 = epoch 1, iteration 1: stops after it, at iteration 2
    ("SIGUSR1", 1, 2, (1, 4)),  # epoch 1's first validation batch: validation stops, training of epoch 1 is done
])
def test_a_signal_stops_inside_the_epoch_and_resume_continues_exactly(planned, tmp_path, monkeypatch, signame,
                                                                       stream, at, where):
    ds, wd, ref = planned
    sig = getattr(signal, signame)
    work = Path(shutil.copytree(wd, tmp_path / "work"))
    real = run_module.batch_streams

    def streams(*args, **kwargs):
        pair = list(real(*args, **kwargs))
        pair[stream] = _SignalAt(pair[stream], at, sig)
        return tuple(pair)

    monkeypatch.setattr(run_module, "batch_streams", streams)
    handler_before = signal.getsignal(sig)
    with pytest.raises(TrainingInterrupted, match="--resume") as got:
        train(ds.root, "3d_fullres", 0, workdir=work, **FAST)
    monkeypatch.setattr(run_module, "batch_streams", real)
    assert signal.getsignal(sig) is handler_before, "the previous handler was not restored"
    err = got.value
    assert err.exit_code == 75 and err.signal == sig and (err.epoch, err.iteration) == where
    assert signame in str(err) and str(_fold(work) / LATEST) in str(err)
    ckpt = load_checkpoint(_fold(work) / LATEST)
    assert (ckpt["epoch"], ckpt["iteration"], len(ckpt["train_losses"])) == (*where, where[1])
    assert len(_records(_fold(work))) == 1, "epoch 0 logged, epoch 1 not"

    train(ds.root, "3d_fullres", 0, workdir=work, resume=True, **FAST)
    assert _records(_fold(work)) == _records(ref), "the resumed run's losses differ from the uninterrupted run's"
    assert _same_weights(_fold(work), ref)
    assert not (_fold(work) / LATEST).exists()


@posix
def test_a_signal_after_the_last_training_step_keeps_the_final_checkpoint(planned, tmp_path, monkeypatch):
    ds, wd, ref = planned
    work = Path(shutil.copytree(wd, tmp_path / "work"))
    real = run_module.batch_streams
    last_val_batch = FAST["epochs"] * FAST["val_iters"] - 1

    def streams(*args, **kwargs):  # SIGTERM during the last epoch's last validation batch
        train_stream, val_stream = real(*args, **kwargs)
        return train_stream, _SignalAt(val_stream, last_val_batch, signal.SIGTERM)

    monkeypatch.setattr(run_module, "batch_streams", streams)
    with pytest.raises(TrainingInterrupted, match="after its last epoch, before the final validation") as got:
        train(ds.root, "3d_fullres", 0, workdir=work, **{**FAST, "validate": True})
    assert got.value.checkpoint == _fold(work) / FINAL and not (_fold(work) / LATEST).exists()
    assert _records(_fold(work)) == _records(ref) and _same_weights(_fold(work), ref)
    assert not (_fold(work) / "val" / "summary.json").exists(), "the final validation ran after the signal"


def test_resume_takes_the_furthest_checkpoint(tmp_path):
    """A preempted extension of a finished run: checkpoint_latest.pt lies inside the final checkpoint's last epoch."""
    folder = tmp_path / "fold_0"
    folder.mkdir()
    torch.save({"network": {}, "epoch": 3}, folder / FINAL)
    torch.save({"network": {}, "epoch": 3, "iteration": 2, "train_losses": [0.5, 0.25]}, folder / LATEST)
    assert run_module._checkpoint_to_resume(folder, True)["iteration"] == 2
    torch.save({"network": {}, "epoch": 2, "iteration": 7, "train_losses": [0.5] * 7}, folder / LATEST)
    assert "iteration" not in run_module._checkpoint_to_resume(folder, True)


def test_handlers_are_installed_only_inside_and_restored():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *a: seen.append(a[0]))
    try:
        with PreemptionSignals() as signals:
            assert signal.SIGTERM in signals.installed
            signal.raise_signal(signal.SIGTERM)
            assert signals.received == signal.SIGTERM and seen == []
        signal.raise_signal(signal.SIGTERM)
        assert seen == [signal.SIGTERM], "the handler in place before was not restored"
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_preemption_signals_install_nothing_outside_the_main_thread():
    import threading

    out = {}

    def body():
        with PreemptionSignals() as signals:
            out["installed"] = signals.installed

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert out["installed"] == []


def _cli(args: list[object], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "autoseg", "-q", *map(str, args)], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@posix
def test_sigterm_to_the_process_group_exits_75_and_resume_gives_the_uninterrupted_losses(planned, tmp_path):
    """As SLURM does: SIGTERM to every process of the job (data-loading workers included) after the first epoch."""
    ds, wd, ref = planned
    work = Path(shutil.copytree(wd, tmp_path / "work"))
    def args(workers: int) -> list[object]:
        return ["train", ds.root, "3d_fullres", "0", "--workdir", work, "--epochs", FAST["epochs"], "--iters-per-epoch",
                FAST["iters_per_epoch"], "--val-iters", FAST["val_iters"], "--workers", workers, "--device", "cpu",
                "--deterministic", "--no-validation", "--save-every", FAST["save_every"]]

    log = _fold(work) / "log.jsonl"
    proc = _cli(args(1), start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and not (log.is_file() and log.read_text().count("\n") >= 1):
            assert time.monotonic() < deadline, "the first epoch never ended"
            time.sleep(0.01)
        sent = time.monotonic()  # while epoch 0 is written, or early in epoch 1 (epoch 0 starts the workers)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        stopped_in = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 75, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoseg train: training of") and "--resume" in lines[0], err
    assert "SIGTERM" in lines[0] and "exit status 75" in lines[0]
    assert stopped_in < 30, f"took {stopped_in:.1f} s to stop"
    assert load_checkpoint(_fold(work) / LATEST)["epoch"] == 1 and not (_fold(work) / FINAL).exists()

    # batch k is the same for any number of workers: resume in-process (faster), as the reference ran
    resumed = _cli([*args(0), "--resume"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert _records(_fold(work)) == _records(ref), "the resumed run's losses differ from the uninterrupted run's"
    assert _same_weights(_fold(work), ref)
