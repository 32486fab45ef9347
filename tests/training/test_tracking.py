"""Experiment tracking: the loop's callbacks and ``train --log-to csv,tensorboard,mlflow`` log exactly what
log.jsonl holds; unknown names and missing packages are refused in one line before training starts."""

from __future__ import annotations

import csv
import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from autoseg.cli import main as cli
from autoseg.errors import MissingDependencyError, TrainingConfigError
from autoseg.networks.checkpoint import FINAL
from autoseg.training.run import train_fold
from autoseg.training.settings import TrainSettings
from autoseg.training.tracking import Tracker, TrackerGroup, check_trackers, open_trackers, parse_trackers, scalars

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
FAST = {"iters_per_epoch": 2, "val_iters": 1, "workers": 0, "device": "cpu", "progress": False, "deterministic": True}


class Recorder(Tracker):
    name = "recorder"

    def __init__(self) -> None:
        self.epochs, self.validations, self.checkpoints, self.closed = [], [], [], 0

    def on_epoch_end(self, record):
        self.epochs.append(dict(record))

    def on_validation(self, summary):
        self.validations.append(summary)

    def on_checkpoint(self, path):
        self.checkpoints.append(Path(path).name)

    def close(self):
        self.closed += 1


class FakeClient:
    """What autoseg calls on ``mlflow.MlflowClient``, recorded."""

    runs: dict[str, dict] = {}

    def __init__(self, tracking_uri: str) -> None:
        self.uri = tracking_uri

    def get_experiment_by_name(self, name):
        return None

    def create_experiment(self, name):
        return f"exp:{name}"

    def create_run(self, experiment_id, run_name=None):
        run_id = f"run{len(self.runs)}"
        self.runs[run_id] = {"experiment": experiment_id, "name": run_name, "params": {}, "metrics": [], "tags": {},
                             "status": "RUNNING", "uri": self.uri}
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id))

    def get_run(self, run_id):
        run = self.runs[run_id]
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id),
                                     data=types.SimpleNamespace(params=dict(run["params"])))

    def update_run(self, run_id, status=None):
        self.runs[run_id]["status"] = status

    def log_batch(self, run_id, metrics=(), params=()):
        self.runs[run_id]["params"].update({p.key: p.value for p in params})
        self.runs[run_id]["metrics"] += [(m.key, m.value, m.step) for m in metrics]

    def set_tag(self, run_id, key, value):
        self.runs[run_id]["tags"][key] = value

    def set_terminated(self, run_id):
        self.runs[run_id]["status"] = "FINISHED"


@pytest.fixture
def fake_mlflow(monkeypatch):
    """A stand-in ``mlflow`` package in sys.modules (the real one is heavy, and optional)."""
    mlflow = types.ModuleType("mlflow")
    mlflow.__spec__ = importlib.machinery.ModuleSpec("mlflow", None)
    entities = types.ModuleType("mlflow.entities")
    entities.Metric = lambda key, value, timestamp, step: types.SimpleNamespace(key=key, value=value, step=step)
    entities.Param = lambda key, value: types.SimpleNamespace(key=key, value=value)
    mlflow.entities, mlflow.MlflowClient = entities, FakeClient
    FakeClient.runs = {}
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.setitem(sys.modules, "mlflow.entities", entities)
    return FakeClient.runs


@pytest.fixture(scope="module")
def planned(tmp_path_factory, planned_factory):
    return planned_factory(tmp_path_factory.mktemp("tracking"))


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def _csv(folder: Path) -> list[dict]:
    with open(folder / "log.csv", newline="") as fh:
        return [{k: None if v == "" else float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(folder / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    return {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"] if acc.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"}


def test_trackers_log_exactly_what_log_jsonl_holds_and_continue_on_resume(planned, fake_mlflow):
    ds, wd, plans = planned
    names = ("csv", "tensorboard", "mlflow") if HAS_TENSORBOARD else ("csv", "mlflow")
    rec = Recorder()
    res = train_fold(ds, plans, "3d_fullres", 0, wd, settings=TrainSettings(epochs=2, log_to=names, **FAST),
                     trackers=[rec])
    folder = res.folder
    log = _log(folder)
    assert rec.epochs == log and rec.checkpoints == [FINAL] and rec.closed == 1
    assert rec.validations == [res.validation]
    assert _csv(folder) == [scalars(r) for r in log]
    (run,) = fake_mlflow.values()
    assert run["name"] == "fold_0" and run["experiment"] == f"exp:autoseg/{ds.root.name}/3d_fullres"
    assert run["uri"] == (wd.resolve() / "mlruns").as_uri() and run["status"] == "FINISHED"
    assert json.loads(run["params"]["epochs"]) == 2 and run["params"]["configuration"] == "3d_fullres"
    epoch_metrics = [m for m in run["metrics"] if not m[0].startswith("validation_")]
    assert epoch_metrics == [(k, v, r["epoch"]) for r in log for k, v in scalars(r).items()
                             if k != "epoch" and v is not None]
    assert ("validation_dice_mean_foreground", res.validation.mean_foreground_dice, 2) in run["metrics"]
    assert run["tags"]["checkpoint"] == str(folder / FINAL)
    if HAS_TENSORBOARD:
        events = _tensorboard(folder)
        for key in ("train_loss", "val_loss", "lr", "ema_fg_dice", "pseudo_dice_0"):
            assert events[key] == [(r["epoch"], scalars(r)[key]) for r in log], key
        assert events["validation/dice_mean_foreground"] == [(2, res.validation.mean_foreground_dice)]

    # extend the finished run: the same mlflow run goes on, log.csv and the event files hold each epoch once
    train_fold(ds, plans, "3d_fullres", 0, wd, settings=TrainSettings(epochs=3, log_to=names, validate=False, **FAST),
               resume=True)
    log = _log(folder)
    assert len(log) == 3 and _csv(folder) == [scalars(r) for r in log]
    assert len(fake_mlflow) == 1 and [m[2] for m in run["metrics"] if m[0] == "train_loss"] == [0, 1, 2]
    if HAS_TENSORBOARD:
        assert _tensorboard(folder)["train_loss"] == [(r["epoch"], r["train_loss"]) for r in log]


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install 'autoseg[tensorboard]')")
def test_tensorboard_hides_the_epochs_a_resumed_run_trains_again(tmp_path):
    records = [{"epoch": e, "train_loss": 1.0 / (e + 1), "pseudo_dice": [0.5, None]} for e in range(4)]
    first = open_trackers(["tensorboard"], folder=tmp_path, workdir=tmp_path)
    for r in records:  # the run logged epochs 0-3, then was killed; its last checkpoint was at epoch 2
        first.on_epoch_end(r)
    first.close()
    again = open_trackers(["tensorboard"], folder=tmp_path, workdir=tmp_path, first_epoch=2)
    for r in records[2:]:
        again.on_epoch_end({**r, "train_loss": r["train_loss"] + 1})
    again.close()
    got = _tensorboard(tmp_path)
    assert got["train_loss"] == [(0, 1.0), (1, 0.5), (2, 1 + 1 / 3), (3, 1.25)]
    assert got["pseudo_dice_0"] == [(e, 0.5) for e in range(4)] and "pseudo_dice_1" not in got


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed (the fake-module test "
                                                                        "above covers the calls)")
def test_the_real_mlflow_stores_the_metrics_in_a_local_mlruns(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    records = [{"epoch": e, "train_loss": 0.1 + e / 7, "lr": 0.01, "pseudo_dice": [0.25]} for e in range(2)]
    group = open_trackers(["mlflow"], folder=tmp_path / "fold_0", workdir=tmp_path, params={"epochs": 2},
                          experiment="autoseg/test", run_name="fold_0")
    for r in records:
        group.on_epoch_end(r)
    group.close()
    run_id = json.loads((tmp_path / "fold_0" / "mlflow_run.json").read_text())["run_id"]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train_loss")] == \
        [(r["epoch"], r["train_loss"]) for r in records]
    assert client.get_run(run_id).data.params["epochs"] == "2" and client.get_run(run_id).info.status == "FINISHED"


def test_unknown_tracker_names_are_refused_with_the_valid_ones(planned, capsys):
    with pytest.raises(TrainingConfigError, match="unknown tracker 'wandb'.*valid: csv, tensorboard, mlflow"):
        TrainSettings(log_to="csv,wandb")
    assert TrainSettings(log_to="CSV, tensorboard,csv").log_to == ("csv", "tensorboard")
    assert parse_trackers(["csv,mlflow", "tensorboard"]) == ("csv", "mlflow", "tensorboard")
    ds, wd, _ = planned
    status = cli(["-q", "train", str(ds.root), "3d_fullres", "1", "--workdir", str(wd), "--log-to", "csv,wandb"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "valid: csv, tensorboard, mlflow" in err, err


def test_a_missing_package_is_named_before_anything_runs(planned, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # find_spec then reports it missing
    with pytest.raises(MissingDependencyError, match=r'pip install "autoseg\[tensorboard\]"'):
        check_trackers(["csv", "tensorboard"])
    ds, wd, _ = planned
    status = cli(["-q", "train", str(ds.root), "3d_fullres", "2", "--workdir", str(wd), "--log-to", "tensorboard",
                  "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and 'pip install "autoseg[tensorboard]"' in err, err
    assert not (wd / "models" / "3d_fullres" / "fold_2").exists(), "training started before the check"


def test_a_failing_tracker_is_switched_off_and_the_others_go_on():
    class Broken(Tracker):
        name = "broken"

        def on_epoch_end(self, record):
            raise OSError("disk full")

    ok, broken = Recorder(), Broken()
    group = TrackerGroup([broken, ok])
    with pytest.warns(RuntimeWarning, match="'broken' failed in on_epoch_end.*switched off"):
        group.on_epoch_end({"epoch": 0})
    group.on_epoch_end({"epoch": 1})
    group.close()
    assert ok.epochs == [{"epoch": 0}, {"epoch": 1}] and group.trackers == [] and ok.closed == 1
