"""Sharing one prediction between processes and machines that write to the same output folder.

Two ways, which combine (claims then run within a part):

**Parts** (``--num-parts N --part-id K``): a fixed split, decided before anything runs. The cases are sorted by id
and case ``i`` of that order goes to part ``i % N`` (round robin, so that cases named in acquisition order spread
evenly over the parts); part ``K`` predicts only its cases. Every part must run for every case to be predicted.

**Claims** (``--claim``): dynamic sharing between any number of processes on any number of machines. Claim files
live in ``OUT/.claims/``; generation 0 of a case's claim is ``<case>.claim``, a takeover is ``<case>.claim.<g>``:

1. A process skips a case whose output is finished; otherwise it lists the case's claim files and looks at the
   highest generation ``g``. None: it creates ``<case>.claim`` with ``os.open(O_CREAT | O_EXCL)``. A live one: the
   case is busy, it moves on.
2. A claim is dead when its heartbeat (the larger of its ``heartbeat`` field and the file's modification time) is
   older than ``claim_timeout``, or when it was made on this host by a process id that no longer exists.
3. A dead claim ``g`` is taken over by creating generation ``g + 1``, again with ``O_EXCL``: of processes racing
   for it exactly one succeeds, the others see a live claim when they look again. Claims are never renamed or
   overwritten by anyone but their holder, so a live claim can never be removed by a taker.
4. After creating a claim the process looks at the output again (another may have finished it just before) and
   lets go if it is finished. While working it rewrites its claims (``host``, ``pid``, ``claimed``, ``heartbeat``)
   every ``min(claim_timeout / 5, 60)`` seconds.
5. When the output is complete the holder removes every generation of the case's claim (any claim made after
   that finds the output finished, step 4); a process that stops on an error removes only its own claims. The
   merge (below) sweeps away what is left (claims of processes killed just after finishing a case).

The takeover relies on ``O_EXCL`` being atomic on the shared file system (local disks, NFS v3 and later, Lustre,
GPFS). A holder that stalls longer than the timeout (a suspended job) may be taken over while still alive; both then
predict the case and, outputs being written atomically, the file is whole and the same either way. Clocks of the
machines must agree to well within the timeout. A process id reused on the same host keeps a dead holder's claim
looking alive until its heartbeat runs out.

**Records**: each sharing process keeps its own record, ``OUT/prediction.runs/<host>-<pid>-<start>-<token>.json``
(its settings, host, pid, part; per case the seconds spent), rewritten as soon as each of its cases is finished. The
process that finds every case (of all parts) finished merges the records into ``OUT/prediction.json``:
``{"runs": [...], "cases": {case: {"run": index, "seconds": {...}}}}`` as a single run writes it, each run naming its
host, pid, start, part and whether it claimed (a case finished by a process killed before it noted it: ``"run":
null``), and the quality rows of every record into the quality table. Processes that finish within milliseconds of
each other may both merge, and the one writing last may have read the other's record just before its last case was
noted; rerunning the same command (everything is skipped) merges again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoseg.inference.inputs import InputCase
from autoseg.inference.settings import DEFAULT_CLAIM_TIMEOUT, InferenceSettings, check_part
from autoseg.io.atomic import write_json_atomic

#: subfolder of the output with the claim files
CLAIMS = ".claims"
#: subfolder of the output with one record per sharing process
RUNS = "prediction.runs"
#: longest pause between two heartbeats, in seconds
HEARTBEAT_MAX = 60.0
_CLAIM = ".claim"


def select_part(cases: Sequence[InputCase], num_parts: int, part_id: int) -> list[InputCase]:
    """The cases of part ``part_id`` of ``num_parts``: case ``i`` of the cases sorted by id goes to part
    ``i % num_parts``. Every case is in exactly one part; a part may be empty (more parts than cases).

    Raises:
        PredictionInputError: no such part (one line naming ``--part-id`` and ``--num-parts``).
    """
    check_part(num_parts, part_id)
    ordered = sorted(cases, key=lambda c: c.case_id)
    return [c for i, c in enumerate(ordered) if i % num_parts == part_id]


@dataclass(frozen=True)
class Sharing:
    """How this process shares a prediction with others writing to the same output folder.

    Attributes:
        everyone: the cases of every part (the merged record waits for all of them).
        num_parts, part_id: the fixed split (``1, 0``: none).
        claim: claim each case before predicting it (:class:`ClaimBoard`).
        claim_timeout: seconds without a heartbeat after which a claim is taken over.
    """

    everyone: tuple[InputCase, ...]
    num_parts: int = 1
    part_id: int = 0
    claim: bool = False
    claim_timeout: float = DEFAULT_CLAIM_TIMEOUT

    @classmethod
    def from_settings(cls, everyone: Sequence[InputCase], settings: InferenceSettings) -> Sharing | None:
        """The sharing the settings ask for, or None when the process has the output folder to itself."""
        if not settings.shared:
            return None
        return cls(tuple(everyone), settings.num_parts, settings.part_id, settings.claim, settings.claim_timeout)

    def describe(self) -> dict[str, Any]:
        """What the process's record says about its share."""
        return {"part": [self.part_id, self.num_parts] if self.num_parts > 1 else None, "claim": self.claim}


@dataclass(frozen=True)
class Holder:
    """Who holds a claim or wrote a record: this host and process, since when, and a random token."""

    host: str
    pid: int
    started: float
    token: str

    @classmethod
    def current(cls) -> Holder:
        """This process, now."""
        return cls(socket.gethostname(), os.getpid(), time.time(), secrets.token_hex(4))

    @property
    def name(self) -> str:
        """``<host>-<pid>-<UTC start>-<token>``, safe as a file name and unique (runs of one process differ)."""
        host = re.sub(r"[^A-Za-z0-9._-]+", "_", self.host).strip("._") or "host"
        return f"{host}-{self.pid}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(self.started))}-{self.token}"

    def describe(self) -> dict[str, Any]:
        """Host, process id, start time (UTC, ISO 8601, milliseconds) and the run's :attr:`name`."""
        return {"host": self.host, "pid": self.pid, "started": _iso(self.started), "run_id": self.name}


def _iso(t: float) -> str:
    """UTC, ISO 8601, to the millisecond (records are ordered by it)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (True when that cannot be known, e.g. on Windows)."""
    if os.name == "nt" or pid <= 0:  # os.kill would end the process on Windows; pid 0 is the process group
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


class ClaimBoard:
    """The claims of one process in ``OUT/.claims/`` (the protocol is in the module docstring). Use it as a context
    manager: the heartbeat runs inside, and claims still held on leaving (an error) are removed."""

    def __init__(self, output_folder: str | os.PathLike[str], timeout: float = DEFAULT_CLAIM_TIMEOUT,
                 holder: Holder | None = None) -> None:
        self.folder = Path(output_folder) / CLAIMS
        self.timeout = float(timeout)
        self.holder = holder or Holder.current()
        self._held: dict[str, tuple[Path, float]] = {}
        self._lock = threading.Lock()  # claims are rewritten (heartbeat) and removed under it, never both at once
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> ClaimBoard:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="autoseg-claims", daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        for case_id in list(self._held):
            self.release(case_id, finished=False)

    @property
    def held(self) -> list[str]:
        """The cases this process holds claims on."""
        with self._lock:
            return list(self._held)

    def acquire(self, case_id: str) -> bool:
        """Claim ``case_id``: True when this process now holds it, False when a live claim of another is there."""
        for _ in range(3):  # a lost O_EXCL race: look once more (the winner's claim is then live)
            top = self._top(case_id)
            if top is not None and not self.is_dead(top[1]):
                return False
            path = self._path(case_id, 0 if top is None else top[0] + 1)
            claimed = time.time()
            if self._create(path, self._content(case_id, claimed)):
                with self._lock:
                    self._held[case_id] = (path, claimed)
                return True
        return False

    def release(self, case_id: str, finished: bool) -> None:
        """Let go of ``case_id``: every generation of its claim when its output is ``finished``, else only ours."""
        with self._lock:
            mine = self._held.pop(case_id, None)
            doomed = [p for _, p in self._generations(case_id)] if finished else [mine[0]] if mine else []
            for path in doomed:
                path.unlink(missing_ok=True)

    def is_dead(self, path: Path) -> bool:
        """Whether the claim at ``path`` is abandoned (gone, no heartbeat within the timeout, or made on this host
        by a process that no longer exists). An unreadable claim (being written) is judged by its file time."""
        try:
            beat = path.stat().st_mtime
            info = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return True
        except (OSError, ValueError):
            info = {}
        info = info if isinstance(info, dict) else {}
        if isinstance(info.get("heartbeat"), (int, float)):
            beat = max(beat, float(info["heartbeat"]))
        if time.time() - beat > self.timeout:
            return True
        pid = info.get("pid")
        return info.get("host") == self.holder.host and isinstance(pid, int) and not pid_alive(pid)

    def refresh(self) -> None:
        """Rewrite the heartbeat of every claim held (in place: a claim removed meanwhile is not made again)."""
        with self._lock:
            for case_id, (path, claimed) in self._held.items():
                with contextlib.suppress(OSError):
                    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        f.write(self._content(case_id, claimed))

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(self.timeout / 5, HEARTBEAT_MAX)):
            self.refresh()

    def _content(self, case_id: str, claimed: float) -> str:
        return json.dumps({"case": case_id, **self.holder.describe(), "token": self.holder.token,
                           "claimed": claimed, "heartbeat": time.time()}) + "\n"

    def _path(self, case_id: str, generation: int) -> Path:
        return self.folder / (f"{case_id}{_CLAIM}" + (f".{generation}" if generation else ""))

    def _generations(self, case_id: str) -> list[tuple[int, Path]]:
        """The case's claim files as ``(generation, path)``, lowest first."""
        base = f"{case_id}{_CLAIM}"
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        found = [(0, n) if n == base else (int(n[len(base) + 1:]), n) for n in names
                 if n == base or (n.startswith(base + ".") and n[len(base) + 1:].isdigit())]
        return [(g, self.folder / n) for g, n in sorted(found)]

    def _top(self, case_id: str) -> tuple[int, Path] | None:
        generations = self._generations(case_id)
        return generations[-1] if generations else None

    def _create(self, path: Path, content: str) -> bool:
        """Create ``path`` exclusively with ``content``; False when it exists already."""
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            except FileNotFoundError:  # the folder was removed (a merge found everything finished): make it again
                self.folder.mkdir(parents=True, exist_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(content)
            return True
        return False


def claimed_cases(cases: Iterable[InputCase], board: ClaimBoard, finished: Callable[[str], bool],
                  skipped: list[str], busy: list[str]) -> Iterator[InputCase]:
    """The cases this process claims, in order, as it asks for them (so claims are made just before reading).

    A case found finished is added to ``skipped``. Cases held by others are looked at again after a pass that
    claimed something (their holders may have died meanwhile); those still held when a pass claims nothing are
    added to ``busy``.
    """
    pending = list(cases)
    while pending:
        waiting: list[InputCase] = []
        progressed = False
        for case in pending:
            if finished(case.case_id):
                skipped.append(case.case_id)
            elif not board.acquire(case.case_id):
                waiting.append(case)
            elif finished(case.case_id):  # finished by another between the look and the claim
                board.release(case.case_id, finished=True)
                skipped.append(case.case_id)
            else:
                progressed = True
                yield case
        pending = waiting
        if not progressed:
            break
    busy.extend(c.case_id for c in pending)


class RunRecord:
    """One sharing process's record, ``OUT/prediction.runs/<Holder.name>.json``: ``{"run": settings with
    host, pid, start and share, "cases": {case: {"seconds": {...}}}, "quality": {case: quality-table row}}``."""

    def __init__(self, output_folder: str | os.PathLike[str], run: dict[str, Any], holder: Holder) -> None:
        self.path = Path(output_folder) / RUNS / f"{holder.name}.json"
        self.run = {**run, **holder.describe()}
        self.cases: dict[str, dict[str, Any]] = {}
        self.quality: dict[str, dict[str, Any]] = {}

    def add(self, case_id: str, seconds: dict[str, float], quality: dict[str, Any] | None = None) -> None:
        """Note a finished case and save the record."""
        self.cases[case_id] = {"seconds": seconds}
        if quality is not None:
            self.quality[case_id] = quality
        self.save()

    def save(self) -> None:
        """Write the record (atomically)."""
        write_json_atomic(self.path, {"run": self.run, "cases": self.cases, "quality": self.quality})


def read_records(output_folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every process record in ``OUT/prediction.runs/``, oldest start first (unreadable ones are left out)."""
    records = []
    for path in sorted((Path(output_folder) / RUNS).glob("*.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("run"), dict) and isinstance(rec.get("cases"), dict):
            records.append(rec)
    return sorted(records, key=lambda r: str(r["run"].get("started", "")))


def merge_records(output_folder: str | os.PathLike[str], record: str | os.PathLike[str],
                  case_ids: Sequence[str] = ()) -> tuple[Path, list[dict[str, Any]]]:
    """Merge every process record into ``record`` (``OUT/prediction.json``, keeping earlier runs found there); the
    record's path and the quality-table rows of every record. Removes what is left in ``OUT/.claims/`` (claims of
    processes killed after finishing a case) and the folder.

    Call it when every case is finished. A case in several records (a holder taken over while alive) points at
    the run that started last; one of ``case_ids`` in none (its process was killed between writing the output
    and its record) gets ``{"run": null}``.
    """
    path = Path(record)
    old: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(path.read_text(encoding="utf-8"))
        old = loaded if isinstance(loaded, dict) else {}
    runs = list(old["runs"]) if isinstance(old.get("runs"), list) else []
    cases = dict(old["cases"]) if isinstance(old.get("cases"), dict) else {}
    rows: dict[str, dict[str, Any]] = {}
    cases.update({cid: {"run": None} for cid in case_ids if cid not in cases})
    for rec in read_records(output_folder):
        if rec["run"] not in runs:
            runs.append(rec["run"])
        for case_id, entry in rec["cases"].items():
            cases[case_id] = {"run": runs.index(rec["run"]), **entry}
        rows.update(rec.get("quality") if isinstance(rec.get("quality"), dict) else {})
    write_json_atomic(path, {"runs": runs, "cases": dict(sorted(cases.items()))})
    claims = Path(output_folder) / CLAIMS
    for leftover in claims.glob(f"*{_CLAIM}*"):  # every case is finished: no claim means anything any more
        leftover.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        claims.rmdir()
    return path, list(rows.values())
