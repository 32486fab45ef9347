"""Training end to end on a tiny dataset: files a user looks at, resume after a kill, cascade, 2D, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg.api import train
from autoseg.cli import main as cli
from autoseg.io.image import read_label
from autoseg.networks.checkpoint import FINAL, LATEST, load_checkpoint
from autoseg.training.cascade import CascadeInputError
from autoseg.training.run import TrainingError

FAST = {"iters_per_epoch": 3, "val_iters": 1, "workers": 0, "device": "cpu", "progress": False}


def _losses(folder: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (folder / "log.jsonl").read_text().splitlines()]


def test_a_fold_trains_validates_and_writes_what_users_look_at(tiny_brats):
    ds, wd, _ = tiny_brats
    (res,) = train(ds.root, "3d_fullres", 0, workdir=wd, epochs=2, **FAST)
    f = res.folder
    assert (f / FINAL).is_file() and not (f / LATEST).is_file()
    assert (f / "progress.png").stat().st_size > 1000
    assert len(_losses(f)) == 2
    summary = json.loads((f / "val" / "summary.json").read_text())
    assert summary["classes"] == ["whole_tumor", "tumor_core", "enhancing_tumor"]  # region-based training
    case = next(iter(summary["cases"]))
    pred = read_label(f / "val" / f"{case}.nii.gz")
    ref = read_label(next(c.label for c in ds.cases if c.case_id == case))
    assert pred.array.shape == ref.array.shape and pred.geometry.differences(ref.geometry) == []
    assert set(np.unique(pred.array)) <= {0, 1, 2, 3}
    ckpt = load_checkpoint(f / FINAL)
    assert ckpt["epoch"] == 2 and ckpt["mirror_axes"] == [0, 1, 2] and ckpt["num_outputs"] == 3
    assert (wd / "splits.json").is_file() and (wd / "models" / "3d_fullres" / "plans.json").is_file()


def test_existing_checkpoints_need_resume_and_a_larger_epoch_count_extends(tiny_brats):
    ds, wd, _ = tiny_brats
    (res,) = train(ds.root, "3d_fullres", 1, workdir=wd, epochs=1, validate=False, **FAST)
    with pytest.raises(TrainingError, match="--resume"):
        train(ds.root, "3d_fullres", 1, workdir=wd, epochs=1, validate=False, **FAST)
    ckpt = load_checkpoint(res.folder / FINAL)
    assert ckpt["recipe"]["augmentation"]["name"] == "nnunet"  # the default: on the training device
    # a run begun by an earlier release, whose recipe (version 1) meant the CPU workers by ``nnunet``, keeps them
    torch.save({**ckpt, "recipe": {**ckpt["recipe"], "version": 1, "augmentation": {
        "name": "nnunet", "params": {"elastic": False, "order_data": 3, "order_seg": 1}}}}, res.folder / FINAL)
    (res,) = train(ds.root, "3d_fullres", 1, workdir=wd, epochs=3, validate=False, resume=True, **FAST)
    ckpt = load_checkpoint(res.folder / FINAL)
    assert ckpt["epoch"] == 3 and len(_losses(res.folder)) == 3
    assert ckpt["recipe"]["augmentation"] == {"name": "nnunet_cpu", "origin": "built-in",
                                              "params": {"elastic": False, "order_data": 3, "order_seg": 1}}


def test_kill_then_resume_reproduces_the_epochs_and_loss_trajectory(tiny_brats, tmp_path):
    ds, wd, _ = tiny_brats
    args = [sys.executable, "-m", "autoseg", "-q", "train", str(ds.root), "3d_fullres", "{fold}", "--workdir",
            str(wd), "--epochs", "6", "--iters-per-epoch", "3", "--val-iters", "1", "--save-every", "1",
            "--workers", "0", "--device", "cpu", "--deterministic", "--no-validation"]
    folder = wd / "models" / "3d_fullres" / "fold_3"
    proc = subprocess.Popen([a.replace("{fold}", "3") for a in args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill it once it has saved a checkpoint mid-way
        if (folder / LATEST).is_file() and load_checkpoint(folder / LATEST)["epoch"] >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (folder / FINAL).is_file()
    resumed = subprocess.run([a.replace("{fold}", "3") for a in args] + ["--resume"], capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(folder / FINAL)["epoch"] == 6 and len(_losses(folder)) == 6
    clean = wd / "models" / "3d_fullres" / "fold_3_clean"
    clean.parent.mkdir(exist_ok=True)
    os.rename(folder, clean)
    fresh = subprocess.run([a.replace("{fold}", "3") for a in args], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    assert _losses(clean) == _losses(folder)


def test_a_few_iterations_lower_the_loss(tiny_brats):
    ds, wd, _ = tiny_brats
    (res,) = train(ds.root, "3d_fullres", 4, workdir=wd, epochs=8, validate=False,
                   **{**FAST, "iters_per_epoch": 4})
    losses = _losses(res.folder)
    assert np.mean(losses[-2:]) < np.mean(losses[:2])


def test_2d_configuration_trains_on_slices_and_predicts_volumes(tiny_brats):
    ds, wd, _ = tiny_brats
    (res,) = train(ds.root, "2d", 0, workdir=wd, epochs=1, **FAST)
    summary = json.loads((res.folder / "val" / "summary.json").read_text())
    case = next(iter(summary["cases"]))
    ref = read_label(next(c.label for c in ds.cases if c.case_id == case))
    assert read_label(res.folder / "val" / f"{case}.nii.gz").array.shape == ref.array.shape


def test_cascade_needs_lowres_predictions_then_trains_on_them(tiny_brats):
    ds, wd, plans = tiny_brats
    full = plans.configuration("3d_fullres")
    low = dataclasses.replace(full, name="3d_lowres", next_stage="3d_cascade_fullres")
    casc = dataclasses.replace(full, name="3d_cascade_fullres", previous_stage="3d_lowres")
    cascade_plans = dataclasses.replace(plans, configurations={**plans.configurations, "3d_lowres": low,
                                                               "3d_cascade_fullres": casc})
    work = wd.parent / "cascade_work"
    work.mkdir(exist_ok=True)
    cascade_plans.save(work / "plans.json")
    with pytest.raises(CascadeInputError, match="3d_lowres cv"):
        train(ds.root, "3d_cascade_fullres", 0, workdir=work, epochs=1, **FAST)
    val = work / "models" / "3d_lowres" / "fold_0" / "val"
    val.mkdir(parents=True)
    for c in ds.cases:  # stand-in CV predictions: the reference labels
        (val / c.label.name).write_bytes(c.label.read_bytes())
    with pytest.warns(UserWarning, match="cascade stage augments on the CPU workers"):  # the default's fallback
        (res,) = train(ds.root, "3d_cascade_fullres", 0, workdir=work, epochs=1, **FAST)
    ckpt = load_checkpoint(res.folder / FINAL)
    assert ckpt["in_channels"] == 2 + 3 and ckpt["cascade_labels"] == [1, 2, 3]
    assert json.loads((res.folder / "val" / "summary.json").read_text())["mean_foreground_dice"] is not None


def test_cli_train_errors_are_one_clear_line(tiny_brats, tmp_path, capsys):
    ds, _, _ = tiny_brats
    assert cli(["train", str(ds.root), "3d_fullres", "0", "--workdir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "plans.json does not exist" in err and "autoseg plan" in err and "Traceback" not in err
    assert cli(["train", str(ds.root), "3d_fullres", "seven", "--workdir", str(tiny_brats[1])]) == 2
    assert "'cv'" in capsys.readouterr().err


def test_a_2d_png_dataset_trains_and_validates_in_its_own_geometry(tmp_path, planned_factory):
    ds, wd, plans = planned_factory(tmp_path, kind="binary", regions=False, shape=(1, 40, 36), ndim=2, n_channels=1)
    assert list(plans.configurations) == ["2d"]
    (res,) = train(ds.root, "2d", 0, workdir=wd, epochs=1, **FAST)
    summary = json.loads((res.folder / "val" / "summary.json").read_text())
    case = next(iter(summary["cases"]))
    ending = ds.spec.file_ending
    ref = read_label(next(c.label for c in ds.cases if c.case_id == case))
    pred = read_label(res.folder / "val" / f"{case}{ending}")
    assert pred.array.shape == ref.array.shape and pred.array.ndim == 2


@pytest.mark.slow
def test_ddp_under_torchrun_trains_one_fold_on_two_cpu_processes(tiny_brats):
    ds, wd, _ = tiny_brats
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        pytest.skip("torchrun not installed next to this python")
    run = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "autoseg", "-q", "train",
                          str(ds.root), "3d_fullres", "all", "--workdir", str(wd), "--device", "cpu", "--epochs", "2",
                          "--iters-per-epoch", "2", "--val-iters", "1", "--workers", "0"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    folder = wd / "models" / "3d_fullres" / "fold_all"
    assert load_checkpoint(folder / FINAL)["epoch"] == 2 and len(_losses(folder)) == 2
    assert run.stdout.count("validation Dice") == 1  # only rank 0 reports
