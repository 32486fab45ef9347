"""Crash safety: a run killed at any moment (SIGKILL, as the out-of-memory killer or a lost node does) and rerun
ends with exactly what an uninterrupted run writes, and nothing half-written is ever taken for a finished file.

A kill moment is "after the n-th unit of work (a preprocessed case, an epoch, a prediction) appeared, plus a delay
within one unit's measured time", n and the delay drawn from a seeded RNG, so the kills land inside the stage
however fast the machine is. A kill takes the whole process group, or only the main process (as the out-of-memory
killer does), and then its spawned workers must end by themselves. No process of a run may outlive it.
(Disk-full and read-only folders: test_write_errors.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from autoseg.api import preprocess, train
from autoseg.data.synthetic import make_synthetic_dataset
from autoseg.io.atomic import atomic_path
from autoseg.networks.checkpoint import FINAL, LATEST, load_checkpoint

posix = pytest.mark.skipif(not hasattr(os, "killpg"), reason="kills a process group (POSIX)")
AUTOSEG = [sys.executable, "-m", "autoseg", "-q"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process: steadier timing on a shared CPU
STALE = ".{}.k1ll3d00{}"  # a temporary as atomic_path names it: ".<stem>.<8 random chars><suffixes>"


@contextlib.contextmanager
def one_thread():
    """torch on one thread in this process: two threads on a shared 2-core machine can be 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones included: a leftover temporary is a difference) -> its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still lives (zombies waiting for their reaper do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for d in proc.iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if d.name.isdigit() and int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def launch(args: list[object], started: Callable[[], bool], kill_after: float | None = None, *,
           whole_group: bool = True) -> tuple[float, float, bool]:
    """Run ``autoseg -q ARGS`` in its own session. Without ``kill_after`` it must succeed; with it, it is SIGKILLed
    that many seconds after ``started()`` first holds: its whole process group, or only the main process.

    Returns:
        (seconds until ``started()`` held, seconds in all, whether the kill interrupted it).
    """
    with tempfile.TemporaryFile() as log:
        t0 = time.monotonic()
        proc = subprocess.Popen([*AUTOSEG, *map(str, args)], env=ENV, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        t_started = None
        try:
            while proc.poll() is None:
                now = time.monotonic() - t0
                assert now < 300, "autoseg ran for 5 minutes"
                if t_started is None and started():
                    t_started = now
                if t_started is not None and kill_after is not None and now >= t_started + kill_after:
                    (os.killpg if whole_group else os.kill)(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.002)
            proc.wait()
            total = time.monotonic() - t0
            deadline = time.monotonic() + 20
            while _group_alive(proc.pid):  # workers end with the main process, even when it was killed alone
                assert time.monotonic() < deadline, f"processes of autoseg {args[0]} outlived its main process"
                time.sleep(0.05)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever a failed check left behind
            proc.wait()
        log.seek(0)
        output = log.read().decode(errors="replace")
    if kill_after is None:
        assert proc.returncode == 0, output
        assert t_started is not None or started(), f"{args}: the start marker never appeared"
    return (t_started if t_started is not None else total), total, proc.returncode == -signal.SIGKILL


def finish(args: list[object]) -> None:
    """Rerun to completion."""
    res = subprocess.run([*AUTOSEG, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def count(folder: Path, pattern: str) -> int:
    """Finished files matching ``pattern`` in ``folder`` (temporaries, hidden, are not counted)."""
    return sum(not p.name.startswith(".") for p in folder.glob(pattern)) if folder.is_dir() else 0


def cut(path: Path, keep: float = 0.5) -> None:
    """Truncate a file to a fraction of its length (what a crash before the disk synced can leave)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ---- preprocessing ------------------------------------------------------------------------------------------
@posix
@pytest.mark.slow
def test_plan_killed_at_random_moments_reruns_to_the_same_files(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "Dataset008_Kill", n_cases=10, shape=(40, 40, 40), n_channels=2,
                                kind="brats", regions=True, seed=1)

    def plan(wd: Path, jobs: int = 1) -> list[object]:
        return ["plan", ds, "--workdir", wd, "--preset", "cpu", "-j", jobs]

    def cases_done(wd: Path, n: int) -> Callable[[], bool]:
        return lambda: count(wd / "preprocessed" / "3d_fullres", "*.json") >= n

    ref = tmp_path / "ref"
    t_case, total, _ = launch(plan(ref), cases_done(ref, 1))
    expected, per_case = tree(ref / "preprocessed"), (total - t_case) / 9
    # kill just after the fingerprint; after case 1-4 of one process; after case 4-7 of two workers, killing only
    # the main process (as the out-of-memory killer does): its workers must then end by themselves
    rng = random.Random(1)
    moments = [(lambda wd: (lambda: (wd / "fingerprint.json").is_file()), 1, rng.uniform(0, 0.5)),
               (lambda wd, n=rng.randint(1, 4): cases_done(wd, n), 1, rng.uniform(0, per_case)),
               (lambda wd, n=rng.randint(4, 7): cases_done(wd, n), 2, rng.uniform(0, per_case / 2))]
    interrupted = []
    for k, (marker, jobs, delay) in enumerate(moments):
        wd = tmp_path / f"run{k}"
        _, _, killed = launch(plan(wd, jobs), marker(wd), kill_after=delay, whole_group=jobs == 1)
        interrupted.append(killed and count(wd / "preprocessed" / "3d_fullres", "*.json") < 10)
        finish(plan(wd))
        assert tree(wd / "preprocessed") == expected, f"kill {k} left other preprocessed files (or temporaries)"
        for name in ("fingerprint.json", "plans.json"):
            assert (wd / name).read_bytes() == (ref / name).read_bytes()
    assert sum(interrupted) >= 2, f"the kills did not land inside preprocessing: {interrupted}"


def test_preprocessing_redoes_cut_cases_and_removes_stale_temporaries(copy_of, clean_work, clean_dataset):
    wd = copy_of(clean_work)
    folder = wd / "preprocessed" / "3d_fullres"
    before = tree(folder)
    cases = sorted(p.stem for p in folder.glob("*.json"))
    cut(folder / f"{cases[0]}.npy")  # the properties say "complete", the array is cut short
    (folder / f"{cases[1]}_seg.npy").write_bytes(b"")
    stale = folder / STALE.format(cases[2], ".npy")
    stale.write_bytes(b"half a case")
    with pytest.raises(InterruptedError), atomic_path(folder / f"{cases[2]}_fg.npy") as live:
        live.write_bytes(b"being written")  # a live writer's temporary (as of another process) is kept
        summary = preprocess(clean_dataset, ["3d_fullres"], workdir=wd, progress=False)["3d_fullres"]
        assert live.exists(), "a temporary still being written was deleted"
        raise InterruptedError("that writer stops: its file is never renamed into place")
    assert sorted(summary.processed) == cases[:2] and sorted(summary.reused) == cases[2:]
    assert tree(folder) == before  # redone byte for byte; the stale temporary is gone


# ---- training -----------------------------------------------------------------------------------------------
def _fold(wd: Path) -> Path:
    return wd / "models" / "3d_fullres" / "fold_0"


def _epochs_logged(wd: Path) -> list[tuple[int, float]]:
    lines = (_fold(wd) / "log.jsonl").read_text().splitlines()
    return [(r["epoch"], r["train_loss"]) for r in map(json.loads, lines)]


@posix
@pytest.mark.slow
def test_train_killed_at_random_moments_resumes_to_the_same_model(tmp_path, planned_factory):
    ds, base, _ = planned_factory(tmp_path / "base")

    def args(wd: Path) -> list[object]:
        return ["train", ds.root, "3d_fullres", "0", "--workdir", wd, "--epochs", 6, "--iters-per-epoch", 2,
                "--val-iters", 1, "--workers", 0, "--device", "cpu", "--save-every", 2, "--deterministic", "--resume"]

    def epochs_done(wd: Path, n: int) -> Callable[[], bool]:
        log = _fold(wd) / "log.jsonl"
        return lambda: log.is_file() and log.read_text().count("\n") >= n

    ref = shutil.copytree(base, tmp_path / "ref")
    t_log, total, _ = launch(args(ref), epochs_done(ref, 0))
    expected, weights = tree(_fold(ref)), load_checkpoint(_fold(ref) / FINAL)["network"]
    per_epoch = (total - t_log) / 7  # six epochs and the final validation
    rng = random.Random(2)
    interrupted = []
    for k, n in enumerate((rng.randint(0, 2), rng.randint(3, 5))):  # kill inside epoch n (or the validation)
        wd = shutil.copytree(base, tmp_path / f"run{k}")
        _, _, killed = launch(args(wd), epochs_done(wd, n), kill_after=rng.uniform(0, per_epoch))
        interrupted.append(killed)
        finish(args(wd))
        assert _epochs_logged(wd) == _epochs_logged(ref), f"kill {k} (epoch {n}): each epoch once, same losses"
        ckpt = load_checkpoint(_fold(wd) / FINAL)
        assert ckpt["epoch"] == 6
        assert all(torch.equal(ckpt["network"][name], w) for name, w in weights.items()), "resumed to other weights"
        got = tree(_fold(wd))
        assert sorted(got) == sorted(expected), "files differ (a stale checkpoint_latest or temporary?)"
        for name in (n for n in expected if n.startswith("val/")):
            assert got[name] == expected[name], f"{name} differs after the resumed run"
    assert any(interrupted), "no kill landed inside the run"


def test_training_rerun_refuses_a_cut_checkpoint_and_removes_stale_temporaries(copy_of, clean_work, clean_dataset,
                                                                               cli, clear_error):
    wd = copy_of(clean_work)
    fold = _fold(wd)
    stale = fold / STALE.format("checkpoint_latest", ".pt")
    stale.write_bytes(b"half a checkpoint")
    shutil.copy(fold / FINAL, fold / LATEST)
    cut(fold / LATEST)  # a checkpoint cut short is never resumed from
    args = ["train", clean_dataset, "3d_fullres", "0", "--workdir", wd, "--epochs", "2", "--iters-per-epoch", "1",
            "--val-iters", "1", "--workers", "0", "--device", "cpu", "--no-validation", "--resume"]
    clear_error(*cli(*args)[::2], str(fold / LATEST))
    (fold / LATEST).unlink()
    status, out, err = cli(*args)
    assert status == 0, err
    assert not stale.exists(), "the temporary of a killed run was left behind"
    assert [e for e, _ in _epochs_logged(wd)] == [0, 1] and load_checkpoint(fold / FINAL)["epoch"] == 2


# ---- prediction ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def predict_setup(tmp_path_factory, planned_factory):
    """A tiny trained fold and four test images: (dataset, workdir)."""
    ds, wd, _ = planned_factory(tmp_path_factory.mktemp("predict_kill"), n_test=4, shape=(32, 32, 32))
    with one_thread():
        train(ds.root, "3d_fullres", 0, workdir=wd, epochs=1, iters_per_epoch=2, val_iters=1, workers=0,
              device="cpu", progress=False, validate=False)
    return ds, wd


def _predict_args(ds, wd: Path, out: Path) -> list[object]:
    return ["predict", "-i", ds.root / "imagesTs", "-o", out, "--workdir", wd, "--device", "cpu", "--no-drift-check"]


def _images(out: Path) -> dict[str, bytes]:
    return {k: v for k, v in tree(out).items() if k != "prediction.json"}  # the record holds timings


@posix
@pytest.mark.slow
def test_predict_killed_at_random_moments_reruns_to_the_same_files(tmp_path, predict_setup):
    ds, wd = predict_setup
    ref = tmp_path / "ref"
    t_first, total, _ = launch(_predict_args(ds, wd, ref), lambda: count(ref, "*.nii.gz") >= 1)
    expected, per_case = _images(ref), (total - t_first) / 3
    assert len(expected) == 4
    rng = random.Random(3)
    interrupted = []
    for k, n in enumerate((1, rng.randint(2, 3))):  # kill while case n+1 is predicted or written
        out = tmp_path / f"run{k}"
        _, _, killed = launch(_predict_args(ds, wd, out), lambda out=out, n=n: count(out, "*.nii.gz") >= n,
                              kill_after=rng.uniform(0, per_case))
        interrupted.append(killed and count(out, "*.nii.gz") < 4)
        finish(_predict_args(ds, wd, out))
        assert _images(out) == expected, f"kill {k} (after {n} cases): outputs differ from an uninterrupted run"
    assert any(interrupted), "no kill landed inside prediction"


def test_predict_redoes_cut_outputs_and_removes_stale_temporaries(tmp_path, predict_setup, cli):
    ds, wd = predict_setup
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert cli(*_predict_args(ds, wd, ref))[0] == 0
    shutil.copytree(ref, out)
    names = sorted(p.name for p in out.glob("*.nii.gz"))
    cut(out / names[0])  # gzip stream cut in the middle
    (out / names[1]).write_bytes(b"")  # what a machine crash before the disk synced can leave
    cut(out / names[2], keep=0.1)  # only its beginning
    stale = out / STALE.format(names[3].split(".")[0], ".nii.gz")
    stale.write_bytes(b"half an image")
    status, stdout, err = cli(*_predict_args(ds, wd, out))
    assert status == 0, err
    assert "1 case(s) already predicted" in stdout and "3 case(s) predicted" in stdout, stdout
    assert _images(out) == _images(ref)
