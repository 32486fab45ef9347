"""Experiment tracking: callbacks the training loop calls, and the built-in trackers chosen with
``train --log-to csv,tensorboard,mlflow``.

A :class:`Tracker` gets ``on_epoch_end(record)`` with each epoch's record exactly as written to ``log.jsonl``,
``on_checkpoint(path)`` after each checkpoint is written, ``on_validation(summary)`` with the final validation's
:class:`~autoseg.training.validation.ValidationSummary`, and ``close()`` at the end of the run (also when it fails
or is preempted). Only the main process (rank 0) tracks. Subclass it for another service and pass it to
:func:`autoseg.training.run.train_fold` (``trackers=``).

Built-in trackers (:data:`TRACKERS`):

- ``csv``: ``log.csv`` next to ``log.jsonl``, one row per epoch (lists such as ``pseudo_dice`` become one column per
  entry, ``pseudo_dice_0``...; None is an empty cell). No dependency.
- ``tensorboard``: event files under the fold folder's ``tensorboard/`` (``tensorboard --logdir <workdir>/models``
  shows every fold), through ``torch.utils.tensorboard``; needs ``pip install "autoseg[tensorboard]"``.
  Scalars are stored in double precision, so they equal ``log.jsonl``'s values.
- ``mlflow``: one MLflow run per fold (experiment ``autoseg/<dataset folder>/<configuration>``) with the settings as
  parameters and each epoch's scalars as metrics (step = epoch), in the tracking store of ``MLFLOW_TRACKING_URI``
  or else a local ``mlruns`` folder in the work folder; needs ``pip install "autoseg[mlflow]"``.

A resumed run continues its trackers: ``log.csv`` is rewritten from the epochs kept, TensorBoard hides the events
of epochs that are trained again (``purge_step``), and MLflow continues the fold's run.

A tracker that fails (a full disk, an unreachable MLflow server) is switched off with a warning: training goes on,
and ``log.jsonl`` stays complete.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoseg.errors import MissingDependencyError, TrainingConfigError
from autoseg.io.atomic import write_text_atomic

if TYPE_CHECKING:
    from autoseg.training.validation import ValidationSummary

__all__ = ["TRACKERS", "CsvTracker", "MlflowTracker", "TensorBoardTracker", "Tracker", "TrackerGroup",
           "check_trackers", "open_trackers", "parse_trackers", "scalars"]

#: tracker name -> (module it imports, the autoseg extra that installs it); None = no dependency
TRACKERS: dict[str, tuple[str, str] | None] = {"csv": None, "tensorboard": ("tensorboard", "tensorboard"),
                                               "mlflow": ("mlflow", "mlflow")}


class Tracker:
    """Receives what a training run logs. Every hook does nothing here: override those you need."""

    name = "tracker"

    def on_epoch_end(self, record: Mapping[str, Any]) -> None:
        """An epoch ended; ``record`` is its line of ``log.jsonl`` (``epoch``, ``train_loss``, ``val_loss``,
        ``pseudo_dice``, ``mean_fg_dice``, ``ema_fg_dice``, ``lr``, ``epoch_time``, ``train_time``, ``data_wait``:
        the seconds of the training iterations and, of those, blocked waiting for the next batch)."""

    def on_validation(self, summary: ValidationSummary) -> None:
        """The final full-volume validation of the fold finished."""

    def on_checkpoint(self, path: Path) -> None:
        """A checkpoint was written (atomically) at ``path``."""

    def close(self) -> None:
        """The run ended (finished, failed or preempted): flush and release what the tracker holds."""


class TrackerGroup(Tracker):
    """Calls every tracker in turn; one that raises is switched off with a warning (training goes on)."""

    name = "group"

    def __init__(self, trackers: Iterable[Tracker] = ()) -> None:
        self.trackers = list(trackers)

    def _call(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # noqa: BLE001 - a tracker never stops training; log.jsonl stays complete
                self.trackers.remove(tracker)
                warnings.warn(f"tracker {tracker.name!r} failed in {method} ({type(err).__name__}: {err}); it is "
                              "switched off for the rest of this run (log.jsonl is complete)", RuntimeWarning,
                              stacklevel=3)
                if method != "close":
                    _close_quietly(tracker)

    def on_epoch_end(self, record: Mapping[str, Any]) -> None:
        self._call("on_epoch_end", record)

    def on_validation(self, summary: ValidationSummary) -> None:
        self._call("on_validation", summary)

    def on_checkpoint(self, path: Path) -> None:
        self._call("on_checkpoint", path)

    def close(self) -> None:
        self._call("close")
        self.trackers = []


def _close_quietly(tracker: Tracker) -> None:
    try:
        tracker.close()
    except Exception:  # noqa: BLE001 - it already failed once and was reported
        pass


def parse_trackers(names: str | Iterable[str] | None) -> tuple[str, ...]:
    """Tracker names from ``"csv,tensorboard"`` or a sequence of names (each may hold commas), in order, once each.

    Raises:
        TrainingConfigError: an unknown name (the message lists the valid ones).
    """
    if names is None:
        return ()
    items = [names] if isinstance(names, str) else list(names)
    out: list[str] = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip().lower()
            if not name or name in out:
                continue
            if name not in TRACKERS:
                raise TrainingConfigError(f"unknown tracker {name!r} in --log-to; valid: {', '.join(TRACKERS)} "
                                          "(comma-separated, e.g. --log-to csv,tensorboard)")
            out.append(name)
    return tuple(out)


def check_trackers(names: Iterable[str]) -> None:
    """Check that the packages the trackers need are installed (without importing them), before training starts.

    Raises:
        MissingDependencyError: one line naming the ``pip install`` command.
        TrainingConfigError: an unknown name.
    """
    for name in parse_trackers(tuple(names)):
        need = TRACKERS[name]
        if need is not None and not _installed(need[0]):
            raise MissingDependencyError(f"--log-to {name} needs the {need[0]} package, which is not installed: "
                                         f'pip install "autoseg[{need[1]}]" (or drop {name} from --log-to)')


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or one without a spec
        return False


def scalars(record: Mapping[str, Any]) -> dict[str, float | None]:
    """The values of an epoch record by column name, ``epoch`` first: lists become ``key_0``, ``key_1``...;
    numbers are kept as they are (so a tracker logs exactly ``log.jsonl``'s values)."""
    out: dict[str, float | None] = {}
    for key, value in record.items():
        if isinstance(value, (list, tuple)):
            out.update({f"{key}_{i}": v for i, v in enumerate(value)})
        else:
            out[key] = value
    return out


# ---- csv ---------------------------------------------------------------------------------------------------
class CsvTracker(Tracker):
    """``log.csv``: one row per epoch, the columns of :func:`scalars`."""

    name = "csv"

    def __init__(self, folder: Path, history: Sequence[Mapping[str, Any]] | None = ()) -> None:
        self.path = Path(folder) / "log.csv"
        self.columns: list[str] | None = None
        if history is None:  # nothing is trained (a finished fold validated again): the file stays as it is
            return
        text = io.StringIO()
        for record in history:  # a resumed run: the epochs kept (as log.jsonl keeps them), the others go
            self._write(text, record)
        write_text_atomic(self.path, text.getvalue())

    def _write(self, fh: Any, record: Mapping[str, Any]) -> None:
        row = scalars(record)
        writer = csv.DictWriter(fh, fieldnames=self.columns or list(row), extrasaction="ignore", lineterminator="\n")
        if self.columns is None:
            self.columns = list(row)
            writer.writeheader()
        writer.writerow({k: "" if v is None else v for k, v in row.items()})

    def on_epoch_end(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8", newline="") as fh:
            self._write(fh, record)


# ---- TensorBoard -------------------------------------------------------------------------------------------
class TensorBoardTracker(Tracker):
    """Event files under ``<fold>/tensorboard/``: each scalar of the record at step = epoch (double precision),
    the final validation's Dice per class, and the run's parameters as text."""

    name = "tensorboard"

    def __init__(self, folder: Path, *, first_epoch: int = 0, params: Mapping[str, Any] | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(folder) / "tensorboard"
        # every run marks its start (TensorBoard takes the first mark as the start, each later one as a restart
        # that hides what was logged for the epochs trained again)
        # events are written by the writer's thread; flushed every 30 s and on close (also when preempted), which
        # costs an epoch nothing, where a flush per epoch costs a few ms
        self.writer = SummaryWriter(str(self.folder), purge_step=first_epoch, flush_secs=30)
        self.epoch = first_epoch
        if params and first_epoch == 0:
            self.writer.add_text("params", "\n".join(f"    {k}: {json.dumps(v)}" for k, v in params.items()), 0)

    def on_epoch_end(self, record: Mapping[str, Any]) -> None:
        self.epoch = int(record["epoch"])
        for key, value in scalars(record).items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, self.epoch, new_style=True, double_precision=True)

    def on_validation(self, summary: ValidationSummary) -> None:
        values = {**summary.mean, "mean_foreground": summary.mean_foreground_dice}
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(f"validation/dice_{name}", value, self.epoch + 1, new_style=True,
                                       double_precision=True)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# ---- MLflow ------------------------------------------------------------------------------------------------
class MlflowTracker(Tracker):
    """One MLflow run per fold (through ``mlflow.MlflowClient``, no global active run): parameters once, each
    epoch's scalars as metrics (step = epoch), the final validation's Dice and the last checkpoint's path as
    tags. The run id is kept in ``<fold>/mlflow_run.json`` so a resumed run continues it."""

    name = "mlflow"

    def __init__(self, folder: Path, workdir: Path, *, experiment: str, run_name: str, first_epoch: int = 0,
                 params: Mapping[str, Any] | None = None) -> None:
        import mlflow
        from mlflow.entities import Metric, Param

        self.metric, self.param = Metric, Param
        self.epoch = first_epoch - 1
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(workdir).resolve() / "mlruns").as_uri()
        self.client = _mlflow_client(mlflow, uri)
        self.record_file = Path(folder) / "mlflow_run.json"
        self.run_id = self._continued_run(uri) if first_epoch > 0 else None
        if self.run_id is None:
            got = self.client.get_experiment_by_name(experiment)
            experiment_id = got.experiment_id if got is not None else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            write_text_atomic(self.record_file, json.dumps({"tracking_uri": uri, "run_id": self.run_id}) + "\n")
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        self._log_params(params or {})

    def _continued_run(self, uri: str) -> str | None:
        try:
            saved = json.loads(self.record_file.read_text(encoding="utf-8"))
            if saved.get("tracking_uri") != uri:
                return None
            return str(self.client.get_run(saved["run_id"]).info.run_id)
        except Exception:  # noqa: BLE001 - no record, or a run deleted since: start a new one
            return None

    def _log_params(self, params: Mapping[str, Any]) -> None:
        logged = self.client.get_run(self.run_id).data.params
        new = [self.param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in params.items()
               if k not in logged]  # a parameter cannot change (a resumed run may extend the epochs)
        if new:
            self.client.log_batch(self.run_id, params=new)

    def on_epoch_end(self, record: Mapping[str, Any]) -> None:
        self.epoch = int(record["epoch"])
        stamp = _now_ms()
        metrics = [self.metric(k, float(v), stamp, self.epoch) for k, v in scalars(record).items()
                   if k != "epoch" and isinstance(v, (int, float))]
        self.client.log_batch(self.run_id, metrics=metrics)

    def on_validation(self, summary: ValidationSummary) -> None:
        stamp, step = _now_ms(), self.epoch + 1
        values = {**summary.mean, "mean_foreground": summary.mean_foreground_dice}
        metrics = [self.metric(f"validation_dice_{k}", float(v), stamp, step)
                   for k, v in values.items() if v is not None]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def on_checkpoint(self, path: Path) -> None:
        self.client.set_tag(self.run_id, "checkpoint", str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _mlflow_client(mlflow: Any, uri: str) -> Any:
    """``MlflowClient(uri)``; a local ``file:`` store is allowed for the client's construction (MLflow 3 refuses
    the file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set)."""
    if not uri.startswith("file:"):
        return mlflow.MlflowClient(tracking_uri=uri)
    flag = "MLFLOW_ALLOW_FILE_STORE"
    before = os.environ.get(flag)
    os.environ.update({flag: "true"})  # only while the client is made; nothing asks the user to set it
    try:
        return mlflow.MlflowClient(tracking_uri=uri)
    finally:
        os.environ.pop(flag, None)
        if before is not None:
            os.environ.update({flag: before})


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def open_trackers(names: Iterable[str], *, folder: Path, workdir: Path, first_epoch: int = 0,
                  history: Sequence[Mapping[str, Any]] | None = (), params: Mapping[str, Any] | None = None,
                  experiment: str = "autoseg", run_name: str = "fold", extra: Iterable[Tracker] = ()) -> TrackerGroup:
    """The trackers named (see :data:`TRACKERS`) and ``extra`` ones, as one :class:`TrackerGroup`.

    Args:
        names: built-in tracker names.
        folder: the fold folder.
        workdir: the work folder (MLflow's local store).
        first_epoch: the epoch the run starts at (> 0 when resuming).
        history: the epoch records kept from before (``TrainingLog.records``); None when nothing will be trained
            (``log.csv`` is then left as it is).
        params: the run's parameters (settings, configuration, fold).
        experiment, run_name: MLflow's experiment and run names.
        extra: trackers of the caller's own.

    Raises:
        MissingDependencyError: a tracker's package is not installed.
    """
    names = parse_trackers(tuple(names))
    check_trackers(names)
    group = TrackerGroup(extra)
    try:
        for name in names:
            if name == "csv":
                group.trackers.append(CsvTracker(folder, history))
            elif name == "tensorboard":
                group.trackers.append(TensorBoardTracker(folder, first_epoch=first_epoch, params=params))
            else:
                group.trackers.append(MlflowTracker(folder, workdir, experiment=experiment, run_name=run_name,
                                                    first_epoch=first_epoch, params=params))
    except BaseException:
        group.close()
        raise
    return group
