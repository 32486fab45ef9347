"""A failure in a worker process surfaces in the main process with the worker's own traceback and the item (case,
batch) it was working on; a worker that dies without a word (os._exit, SIGKILL as the out-of-memory killer sends)
is named with how it ended; the main process stops promptly, leaves no child process running and no half-written
file behind.

Failures are real: spawned workers import the jobs of ``failing_jobs`` by name, preprocessed files disappear,
input files are truncated, outputs are blocked, and processes are killed from outside.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import failing_jobs
import numpy as np
import pytest

from autoseg.errors import ImageReadError
from autoseg.io.dataset import load_dataset
from autoseg.io.image import read_label
from autoseg.parallel import WorkerError, imap_ordered
from autoseg.planner.plans import Plans
from autoseg.training.batch_stream import BatchStream
from autoseg.training.dataloader import CaseStore, PatchLoader
from autoseg.training.run import train_fold
from autoseg.training.settings import TrainSettings

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="lists child processes from /proc")


def _children(pid: int | None = None) -> set[int]:
    """Running (not zombie) child processes of ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry))
    return found


def _wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture
def no_child_left():
    """Fails the test if a process it started is still running 10 s after it ended."""
    resource_tracker.ensure_running()  # started once per process and kept: not a leftover
    before = _children()
    yield
    assert _wait_until(lambda: not (_children() - before), 10), f"left running: {_children() - before}"


def _within(seconds: float, fn: Callable[[], Any]) -> BaseException | None:
    """Run ``fn`` and return what it raised (None if nothing); fail if it takes longer than ``seconds`` (a hang)."""
    raised: list[BaseException | None] = [None]

    def target() -> None:
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            raised[0] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still running after {seconds} s: the main process hangs on a failed worker")
    return raised[0]


def _no_temporaries(folder: Path) -> None:
    assert not [p.name for p in folder.rglob(".*") if p.is_file()], "a half-written temporary file was left"


# ---- the process pool (preprocessing, fingerprint, evaluation, ...) -----------------------------------------------

@pytest.mark.parametrize("job, needles", [
    (failing_jobs.double_or_raise, ["item 3 failed in a worker", "failing_jobs.py", "in double_or_raise",
                                    "ValueError: intensity overflow in item 3"]),
    (failing_jobs.double_or_exit, ["processing item 3 exited with status 3"]),
    (failing_jobs.double_or_sigkill, ["processing item 3 was killed by SIGKILL", "out-of-memory"]),
    (failing_jobs.double_or_unpicklable, ["item 3: the item or its result could not be passed"]),
], ids=["exception", "exit", "sigkill", "unpicklable-result"])
def test_a_failing_pool_worker_names_the_item_and_how_it_failed(no_child_left, job, needles):
    got: list[int] = []

    def run() -> None:
        for value in imap_ordered(job, range(8), jobs=2, label=lambda i: f"item {i}", progress=False):
            got.append(value)

    err = _within(60, run)
    assert isinstance(err, WorkerError), err
    for needle in needles:
        assert needle in str(err), str(err)
    # results come in order up to the failure; a worker's death also ends the items running beside it
    assert got == [0, 2, 4] if job in (failing_jobs.double_or_raise, failing_jobs.double_or_unpicklable) else \
        got == [0, 2, 4][:len(got)]


def test_an_autoseg_error_in_a_pool_worker_keeps_its_message_and_the_worker_traceback(no_child_left):
    err = _within(60, lambda: list(imap_ordered(failing_jobs.double_or_autoseg_error, range(6), jobs=2,
                                                label=lambda i: f"case_{i}", progress=False)))
    assert isinstance(err, ImageReadError) and str(err) == "case_3_0000.nii.gz: the file is truncated. Re-copy it."
    note = "\n".join(getattr(err, "__notes__", []))
    assert "raised in a worker process while processing case_3" in note and "double_or_autoseg_error" in note


def test_preprocessing_a_truncated_case_with_two_processes(cli, copy_of, clean_dataset, tmp_path, no_child_left):
    ds, work = copy_of(clean_dataset), tmp_path / "work"
    assert cli("plan", ds, "--workdir", work, "--preset", "cpu", "--preprocess", "none", "-j", "1")[0] == 0
    image = ds / "imagesTr" / "case_001_0001.nii.gz"
    image.write_bytes(image.read_bytes()[:300])
    status, _, err = cli("preprocess", ds, "3d_fullres", "--workdir", work, "-j", "2")
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(image) in err and "truncated" in err
    status, _, err = cli("--debug", "preprocess", ds, "3d_fullres", "--workdir", work, "-j", "2", "--overwrite")
    assert "raised in a worker process while processing case case_001" in err and "in read_image" in err
    folder = work / "preprocessed" / "3d_fullres"
    assert (folder / "case_000.json").is_file() and not (folder / "case_001.json").exists()  # never "complete"
    _no_temporaries(folder)


# ---- training data loading and augmentation ---------------------------------------------------------------------

def _stream(tiny_brats, transform, workers: int) -> BatchStream:
    ds, wd, plans = tiny_brats
    store = CaseStore(wd / "preprocessed" / plans.configuration("3d_fullres").data_identifier,
                      [c.case_id for c in ds.cases])
    loader = PatchLoader(store, patch_size=(16, 16, 16), final_patch_size=(16, 16, 16), batch_size=2, seed=0)
    return BatchStream(loader, transform, workers=workers)


@pytest.mark.parametrize("transform, ending", [(failing_jobs.exit_transform, "exited with status 5"),
                                               (failing_jobs.sigkill_transform, "was killed by SIGKILL")])
def test_an_augmentation_worker_that_dies_is_named(tiny_brats, no_child_left, transform, ending):
    stream = _stream(tiny_brats, transform, workers=2)
    try:
        err = _within(60, lambda: next(stream))
    finally:
        stream.close()
    assert isinstance(err, WorkerError), err
    assert f"worker process 1 of 2 {ending}" in str(err) and "building batch 0" in str(err)
    assert "--workers" in str(err)


def test_a_preprocessed_case_that_disappears_names_the_case(copy_of, clean_work, clean_dataset, no_child_left):
    work = copy_of(clean_work)
    folder = work / "preprocessed" / "3d_fullres"
    for data in folder.glob("case_???.npy"):
        data.unlink()  # e.g. a clean-up job removed them after preprocessing
    settings = TrainSettings(epochs=1, iters_per_epoch=2, val_iters=1, workers=2, device="cpu", progress=False,
                             validate=False)
    err = _within(120, lambda: train_fold(load_dataset(clean_dataset), Plans.load(work / "plans.json"),
                                          "3d_fullres", 1, work, settings=settings))
    assert isinstance(err, WorkerError), err
    case = re.search(r"reading case (case_\d{3})", str(err))
    assert case, str(err)
    assert f"{case[1]}.npy" in str(err) and "FileNotFoundError" in str(err) and "dataloader.py" in str(err)
    fold = work / "models" / "3d_fullres" / "fold_1"
    assert not list(fold.glob("checkpoint_*"))
    _no_temporaries(fold)


def _spawned(pid: int) -> set[int]:
    return {c for c in _children(pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()}


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["worker", "main"])
def test_killing_a_training_process_from_outside(copy_of, clean_work, clean_dataset, victim):
    """The out-of-memory killer takes an augmentation worker (clear error, exit 2) or the main process (the
    workers end by themselves instead of running on as orphans)."""
    work = copy_of(clean_work)
    cmd = [sys.executable, "-m", "autoseg", "-q", "train", str(clean_dataset), "3d_fullres", "1", "--workdir",
           str(work), "--epochs", "50", "--iters-per-epoch", "50", "--val-iters", "1", "--workers", "2",
           "--device", "cpu", "--no-validation", "-j", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_until(lambda: len(_spawned(proc.pid)) >= 2, 120), "the workers did not start"
        workers = _spawned(proc.pid)
        time.sleep(1.0)  # let them produce batches
        os.kill(max(workers) if victim == "worker" else proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if victim == "worker":
        assert proc.returncode == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert "was killed by SIGKILL" in err and "--workers" in err
    assert _wait_until(lambda: not any(Path(f"/proc/{p}").exists() and _children_state(p) != "Z" for p in workers),
                       15), "worker processes kept running"
    _no_temporaries(work / "models" / "3d_fullres" / "fold_1")


def _children_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


# ---- prediction: the export thread ------------------------------------------------------------------------------

def test_an_export_that_fails_names_the_case_and_keeps_finished_outputs(cli, copy_of, clean_work, clean_dataset,
                                                                        tmp_path):
    work, out = copy_of(clean_work), tmp_path / "out"
    (out / "case_001.nii.gz").mkdir(parents=True)  # the output name is taken by a folder
    (out / "case_001.nii.gz" / "notes.txt").write_text("keep me")
    status, _, err = cli("predict", "-i", clean_dataset / "imagesTr", "-o", out, "--workdir", work, "--device", "cpu",
                         "--no-tta")
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(out / "case_001.nii.gz") in err
    assert (out / "case_001.nii.gz" / "notes.txt").read_text() == "keep me"
    finished = sorted(p for p in out.glob("*.nii.gz") if p.is_file())
    assert [p.name for p in finished][:1] == ["case_000.nii.gz"]
    assert all(np.isin(read_label(p).array, [0, 1]).all() for p in finished)  # complete, readable files only
    _no_temporaries(out)
