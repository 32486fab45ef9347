"""The GPU step's switches from the command line: ``--compile`` reaches ``torch.compile`` (network and loss) with
checkpoints that hold the eager module's keys, and ``--amp-dtype`` reaches the settings."""

from __future__ import annotations

import pytest
import torch

from autoseg import api
from autoseg.api import train
from autoseg.cli import main as cli
from autoseg.errors import TrainingConfigError
from autoseg.networks.checkpoint import FINAL, load_checkpoint
from autoseg.training import settings as settings_module
from autoseg.training.settings import TrainSettings

FAST = {"iters_per_epoch": 2, "val_iters": 1, "workers": 0, "device": "cpu", "progress": False, "validate": False}


def test_auto_compiles_on_cuda_only_and_bad_values_are_refused(monkeypatch):
    monkeypatch.setattr(settings_module, "_triton_installed", lambda: True)
    assert TrainSettings().resolved_compile("cuda") and not TrainSettings().resolved_compile("cpu")
    monkeypatch.setattr(settings_module, "_triton_installed", lambda: False)  # no GPU compiler: eager
    assert not TrainSettings().resolved_compile("cuda")
    assert TrainSettings(compile="on").resolved_compile("cpu")
    assert not TrainSettings(compile="off").resolved_compile("cuda")
    with pytest.raises(TrainingConfigError, match="'auto'"):
        TrainSettings(compile="yes")


def test_compiled_training_saves_the_eager_modules_keys_and_resumes(tiny_brats, monkeypatch):
    ds, wd, _ = tiny_brats
    compiled, real = [], torch.compile

    def recording(model, **kw):  # dynamo's tracing without inductor's code generation: a real wrapper, quickly
        compiled.append(type(model).__name__)
        return real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", recording)
    train(ds.root, "3d_fullres", 2, workdir=wd, epochs=1, compile="off", **FAST)  # the CPU default: auto = off
    train(ds.root, "3d_fullres", 2, workdir=wd, epochs=1, resume=True, **FAST)
    assert compiled == []
    (res,) = train(ds.root, "3d_fullres", 2, workdir=wd, epochs=2, compile="on", resume=True, **FAST)
    assert compiled == ["UNet", "DeepSupervisionLoss"]
    ckpt = load_checkpoint(res.folder / FINAL)
    assert ckpt["epoch"] == 2 and ckpt["settings"]["compile"] == "on"
    assert not [k for k in ckpt["network"] if "_orig_mod" in k]  # predict and resume load it as an eager U-Net


def test_cli_passes_compile_and_amp_dtype(monkeypatch, tmp_path, capsys):
    seen = []
    monkeypatch.setattr(api, "train", lambda *a, settings, **kw: seen.append(settings) or [])
    assert cli(["train", str(tmp_path), "3d_fullres", "0", "--compile", "off", "--amp-dtype", "bfloat16"]) == 0
    assert cli(["train", str(tmp_path), "3d_fullres", "0"]) == 0
    assert [(s.compile, s.amp_dtype) for s in seen] == [("off", "bfloat16"), ("auto", "float16")]
    with pytest.raises(SystemExit) as exc:
        cli(["train", str(tmp_path), "3d_fullres", "0", "--amp-dtype", "float8"])
    assert exc.value.code == 2 and "--amp-dtype" in capsys.readouterr().err
