"""The command line, run in-process as a user would type it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from autoseg import __version__
from autoseg.cli import main
from autoseg.data.synthetic import make_synthetic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("cli") / "Dataset010_Cli", n_cases=4,
                                  shape=(24, 24, 24), seed=3)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and __version__ in capsys.readouterr().out


def test_unknown_flags_are_rejected_not_ignored(capsys, dataset):
    with pytest.raises(SystemExit) as exc:
        main(["plan", str(dataset), "--gpu-memroy", "4"])
    assert exc.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_check_clean_dataset_exits_zero(capsys, dataset):
    assert main(["-q", "check", str(dataset), "-j", "1"]) == 0
    assert "0 errors" in capsys.readouterr().out


def test_check_reports_problems_and_exits_one(tmp_path, capsys):
    ds = make_synthetic_dataset(tmp_path / "Dataset011_Bad", n_cases=3, shape=(16, 16, 16), seed=1)
    first_label = sorted((ds / "labelsTr").iterdir())[0]
    first_label.unlink()
    status = main(["-q", "check", str(ds), "-j", "1", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert status == 1 and first_label.name in out
    assert json.loads((tmp_path / "r.json").read_text())["problems"]


def test_errors_are_one_message_without_traceback(tmp_path):
    missing = tmp_path / "nope"
    r = subprocess.run([sys.executable, "-m", "autoseg", "plan", str(missing)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and str(missing) in r.stderr and "dataset folder not found" in r.stderr
    r = subprocess.run([sys.executable, "-m", "autoseg", "--debug", "plan", str(missing)], capture_output=True,
                       text=True)
    assert "Traceback" in r.stderr


def test_plan_writes_plans_and_explains(tmp_path, capsys, dataset):
    work = tmp_path / "work"
    assert main(["-q", "plan", str(dataset), "--workdir", str(work), "--preset", "cpu", "--explain", "-j", "1"]) == 0
    out = capsys.readouterr().out
    assert (work / "plans.json").is_file() and (work / "fingerprint.json").is_file()
    assert (work / "dataset.json").is_file()
    assert "3d_fullres" in out and "2d" in out
    plans = json.loads((work / "plans.json").read_text())
    assert "3d_fullres" in plans["configurations"]


def test_unknown_preset_suggests_the_closest(capsys, tmp_path, dataset):
    assert main(["-q", "plan", str(dataset), "--workdir", str(tmp_path / "w"), "--preset", "cpuu", "-j", "1"]) == 2
    err = capsys.readouterr().err
    assert "cpuu" in err and "cpu" in err
