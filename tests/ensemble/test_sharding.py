"""Sharded prediction: fixed parts (--num-parts/--part-id) and claims (--claim) shared by processes writing to one
output folder; every case predicted exactly once, byte-identical to a single deterministic run, with one merged
prediction.json. The claim protocol itself is tested on its own, without a model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk

import autoseg
from autoseg.api import predict, train
from autoseg.cli import main as cli
from autoseg.ensemble.sharding import CLAIMS, ClaimBoard, Holder, claimed_cases, read_records, select_part
from autoseg.errors import PredictionInputError
from autoseg.inference.inputs import InputCase
from autoseg.inference.settings import InferenceSettings

N_CASES = 12
SETTINGS = {"device": "cpu", "deterministic": True, "fast": True}
FLAGS = ["--device", "cpu", "--deterministic", "--fast"]
TIMEOUT = 240  # seconds, per subprocess (a loaded 2-core machine; they take a few seconds)
ROOT = Path(autoseg.__file__).resolve().parents[1]
# `python -m autoseg`, with each prediction slowed down (so that processes overlap, and one can be killed mid-way)
# and, optionally, a start line: each process says it is ready, then waits for the `go` file
SLOW = """
import os, runpy, sys, time
from autoseg.ensemble import cases
delay = float(os.environ["AUTOSEG_TEST_DELAY"])
predict = cases._Stages.predict
def slow(self, pre):
    time.sleep(delay)
    return predict(self, pre)
cases._Stages.predict = slow
ready, go = os.environ.get("AUTOSEG_TEST_READY"), os.environ.get("AUTOSEG_TEST_GO")
if ready:
    open(f"{ready}.{os.getpid()}", "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
sys.argv[0] = "autoseg"
runpy.run_module("autoseg", run_name="__main__")
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory, planned_factory):
    """``(inputs, workdir, reference)``: a tiny trained 3d_fullres fold 0, 12 small cases (16^3 crops of a 20^3 test
    case at different offsets, 2 channels) and their outputs of one single-process deterministic run."""
    root = tmp_path_factory.mktemp("shard")
    ds, wd, _ = planned_factory(root, n_cases=4, n_test=1)
    train(ds.root, "3d_fullres", 0, workdir=wd, epochs=1, iters_per_epoch=2, val_iters=1, workers=0, device="cpu",
          progress=False)
    src = root / "in"
    src.mkdir()
    for ch in (0, 1):
        image = sitk.ReadImage(str(ds.root / "imagesTs" / f"test_000_{ch:04d}.nii.gz"))
        for i in range(N_CASES):
            x, y, z = i % 3, 2 * (i // 3 % 2), 3 * (i // 6)
            sitk.WriteImage(image[x:x + 16, y:y + 16, z:z + 16], str(src / f"case_{i:02d}_{ch:04d}.nii.gz"))
    ref = root / "reference"
    summary = predict(src, ref, workdir=wd, progress=False, **SETTINGS)
    assert len(summary.written) == N_CASES
    return src, wd, ref


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def _start(src: Path, out: Path, wd: Path, *flags: str, delay: float = 0.0, **env: str) -> subprocess.Popen:
    args = ["-q", "predict", "-i", str(src), "-o", str(out), "--workdir", str(wd), *FLAGS, *flags]
    return subprocess.Popen([sys.executable, "-c", SLOW, *args], env=_env(AUTOSEG_TEST_DELAY=str(delay), **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"predict ran over {TIMEOUT} s:\n{out}")
    assert proc.returncode == 0, out
    return out


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("case_*.nii.gz"))}


def _check_complete(out: Path, ref: Path) -> dict:
    """Every output there and byte-identical to the single run; no claim left; the merged prediction.json."""
    assert _outputs(out) == _outputs(ref) and len(_outputs(out)) == N_CASES
    assert not list((out / CLAIMS).glob("*")) if (out / CLAIMS).exists() else True
    merged = json.loads((out / "prediction.json").read_text())
    assert sorted(merged["cases"]) == [f"case_{i:02d}" for i in range(N_CASES)]
    return merged


def _written_by(out: Path) -> dict[str, set[str]]:
    """Per process record (run id): the cases it wrote."""
    return {r["run"]["run_id"]: set(r["cases"]) for r in read_records(out)}


def test_two_claiming_processes_share_the_cases_each_once_identical_to_one_run(model, tmp_path):
    src, wd, ref = model
    out, ready, go = tmp_path / "out", tmp_path / "ready", tmp_path / "go"
    procs = [_start(src, out, wd, "--claim", delay=0.3, AUTOSEG_TEST_READY=str(ready), AUTOSEG_TEST_GO=str(go))
             for _ in range(2)]
    deadline = time.monotonic() + TIMEOUT
    while len(list(tmp_path.glob("ready.*"))) < 2 and time.monotonic() < deadline and all(
            p.poll() is None for p in procs):
        time.sleep(0.02)
    go.touch()
    logs = [_wait(p) for p in procs]
    merged = _check_complete(out, ref)
    by = _written_by(out)
    assert len(by) == 2 and all(by.values()), (by, logs)  # both worked
    first, second = by.values()
    assert not first & second and len(first | second) == N_CASES  # none twice
    runs = merged["runs"]
    assert {r["pid"] for r in runs} == {p.pid for p in procs} and all(r["claim"] for r in runs)
    for run_id, cases in by.items():
        assert {runs[merged["cases"][c]["run"]]["run_id"] for c in cases} == {run_id}
        assert all(set(merged["cases"][c]["seconds"]) == {"read", "predict", "export"} for c in cases)
    assert sum("merged the processes' records" in log for log in logs) >= 1


def test_a_killed_process_is_taken_over_and_every_case_is_still_written_once(model, tmp_path):
    src, wd, ref = model
    out = tmp_path / "out"
    proc = _start(src, out, wd, "--claim", delay=0.6)
    deadline = time.monotonic() + TIMEOUT
    while len(_outputs(out)) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.25)  # mid-way through predicting the next case (each takes over 0.6 s), holding its claim
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)  # reaped: its pid no longer exists
    done = {p.stem.removesuffix(".nii"): p.stat().st_mtime_ns for p in out.glob("case_*.nii.gz")}
    held = [json.loads(p.read_text()) for p in (out / CLAIMS).glob("*.claim")]
    assert 3 <= len(done) < N_CASES and held and all(h["pid"] == proc.pid for h in held)

    log = _wait(_start(src, out, wd, "--claim"))  # restarted: the dead process's claims are taken over
    merged = _check_complete(out, ref)
    assert {p.stem.removesuffix(".nii"): p.stat().st_mtime_ns for p in out.glob("case_*.nii.gz")
            if p.stem.removesuffix(".nii") in done} == done  # finished outputs are not written again
    by = _written_by(out)
    killed = set().union(*(cases for run_id, cases in by.items() if f"-{proc.pid}-" in run_id))
    restarted = set().union(*(cases for run_id, cases in by.items() if f"-{proc.pid}-" not in run_id))
    assert restarted == {f"case_{i:02d}" for i in range(N_CASES)} - set(done)  # exactly the missing ones
    assert killed <= set(done) and {h["case"] for h in held} <= restarted  # its claims were taken over
    assert f"{len(done)} case(s) already predicted" in log and "merged" in log
    assert all(merged["runs"][merged["cases"][c]["run"]]["pid"] != proc.pid for c in restarted)


def test_three_parts_together_predict_every_case_once(model, tmp_path, capsys):
    src, wd, ref = model
    out = tmp_path / "out"
    for k in range(3):  # part 1 also claims its cases (claims work within a part)
        code = cli(["-q", "predict", "-i", str(src), "-o", str(out), "--workdir", str(wd), *FLAGS,
                    "--num-parts", "3", "--part-id", str(k), *(["--claim"] if k == 1 else [])])
        stdout = capsys.readouterr().out
        assert code == 0 and "4 case(s) predicted" in stdout
        assert ("merged the processes' records" in stdout) == (k == 2)  # the last part finds every case finished
    merged = _check_complete(out, ref)
    parts = {tuple(r["run"]["part"]): set(r["cases"]) for r in read_records(out)}
    assert parts == {(k, 3): {f"case_{i:02d}" for i in range(k, N_CASES, 3)} for k in range(3)}
    assert {r["run"]["part"][0]: r["run"]["claim"] for r in read_records(out)} == {0: False, 1: True, 2: False}
    assert [merged["runs"][merged["cases"][f"case_{i:02d}"]["run"]]["part"] for i in range(4)] == [
        [0, 3], [1, 3], [2, 3], [0, 3]]


def test_a_part_that_does_not_exist_is_refused_in_one_line(model, tmp_path, capsys):
    src, wd, _ = model
    code = cli(["-q", "predict", "-i", str(src), "-o", str(tmp_path / "out"), "--workdir", str(wd),
                "--num-parts", "3", "--part-id", "3"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--part-id 3" in err and "--num-parts 3" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    with pytest.raises(PredictionInputError, match="--part-id -1"):
        InferenceSettings(num_parts=2, part_id=-1)
    with pytest.raises(PredictionInputError, match="--num-parts 0"):
        InferenceSettings.create(num_parts=0)
    with pytest.raises(PredictionInputError, match="--claim and --overwrite"):
        InferenceSettings(claim=True, overwrite=True)


def _case(cid: str) -> InputCase:
    return InputCase(cid, (Path(f"{cid}_0000.nii.gz"),), ".nii.gz")


def test_parts_are_round_robin_over_sorted_case_ids():
    cases = [_case(f"c{i:02d}") for i in (7, 3, 9, 0, 1, 8, 2, 6, 5, 4)]
    parts = [[c.case_id for c in select_part(cases, 3, k)] for k in range(3)]
    assert parts == [["c00", "c03", "c06", "c09"], ["c01", "c04", "c07"], ["c02", "c05", "c08"]]
    assert select_part(cases[:2], 3, 2) == []
    with pytest.raises(PredictionInputError, match="--part-id 5 does not exist with --num-parts 3"):
        select_part(cases, 3, 5)


def _claim_file(folder: Path, name: str, host: str, pid: int, beat: float) -> Path:
    path = folder / CLAIMS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "claimed": beat, "heartbeat": beat}))
    os.utime(path, (beat, beat))
    return path


def test_claims_live_dead_by_heartbeat_dead_by_pid_and_the_takeover_race(tmp_path):
    me = Holder.current()
    a, b = ClaimBoard(tmp_path, 600, me), ClaimBoard(tmp_path, 600, Holder(me.host, me.pid, me.started, "other"))
    _claim_file(tmp_path, "live.claim", "elsewhere", 1, time.time())
    assert not a.acquire("live")  # another machine's fresh claim
    old = _claim_file(tmp_path, "quiet.claim", "elsewhere", 1, time.time() - 601)
    assert a.acquire("quiet") and not b.acquire("quiet")  # one taker wins (generation 1); the other sees it live
    assert (tmp_path / CLAIMS / "quiet.claim.1").is_file() and old.is_file()
    a.release("quiet", finished=True)
    assert not list((tmp_path / CLAIMS).glob("quiet.*"))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          timeout=TIMEOUT, check=True)
    _claim_file(tmp_path, "orphan.claim", socket.gethostname(), int(gone.stdout), time.time())
    _claim_file(tmp_path, "orphan.claim.4", socket.gethostname(), int(gone.stdout), time.time())
    assert b.acquire("orphan") and (tmp_path / CLAIMS / "orphan.claim.5").is_file()  # pid gone from this host
    b.release("orphan", finished=False)  # an error: only its own claim goes
    assert sorted(p.name for p in (tmp_path / CLAIMS).glob("orphan.*")) == ["orphan.claim", "orphan.claim.4"]


def test_heartbeat_keeps_a_claim_alive_and_leaving_removes_unfinished_claims(tmp_path):
    other = ClaimBoard(tmp_path, 1.0, Holder("elsewhere", 1, time.time(), "x"))
    with ClaimBoard(tmp_path, 1.0) as board:
        assert board.acquire("c")
        path = tmp_path / CLAIMS / "c.claim"
        time.sleep(2.5)  # longer than the timeout: only the heartbeat (every 0.2 s) keeps it alive
        assert not other.is_dead(path) and not other.acquire("c")
    assert not path.exists()  # left without finishing: the claim is removed
    assert other.acquire("c")


def test_claimed_cases_skip_finished_and_busy_cases_and_look_again(tmp_path):
    board = ClaimBoard(tmp_path, 600)
    finished = {"done"}
    _claim_file(tmp_path, "busy.claim", "elsewhere", 1, time.time())
    skipped, busy = [], []
    got = []
    for case in claimed_cases([_case(c) for c in ("a", "done", "busy", "b")], board, finished.__contains__,
                              skipped, busy):
        got.append(case.case_id)
        finished.add(case.case_id)
        board.release(case.case_id, finished=True)
    assert got == ["a", "b"] and skipped == ["done"] and busy == ["busy"]
