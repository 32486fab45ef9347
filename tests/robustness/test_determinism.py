"""Reproducibility: the same dataset and seed give the same fingerprint.json, plans.json and splits.json bit for
bit, ``--deterministic`` training gives the same losses and the same checkpoint file, and ``predict
--deterministic`` the same outputs.

Two independent runs are compared: run A in this process, run B in a fresh interpreter with another
``PYTHONHASHSEED`` (so set and dict ordering would show), on a second copy of the dataset written separately (other
file times), with a different number of preprocessing processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg.cli import main
from autoseg.data.synthetic import make_synthetic_dataset
from autoseg.io.image import read_label

FOLD = Path("models/3d_fullres/fold_0")
TRAIN = ["--epochs", "2", "--iters-per-epoch", "2", "--val-iters", "1", "--workers", "2", "--device", "cpu",
         "--deterministic", "--no-validation"]


def _dataset(root: Path) -> Path:
    return make_synthetic_dataset(root / "Dataset009_Det", n_cases=5, shape=(16, 16, 16), n_channels=2,
                                  kind="binary", seed=5, n_test=2, shape_jitter=0)


def _commands(ds: Path, work: Path, jobs: str) -> list[list[str]]:
    return [["-q", "plan", str(ds), "--workdir", str(work), "--preset", "cpu", "--seed", "77", "-j", jobs],
            ["-q", "train", str(ds), "3d_fullres", "0", "--workdir", str(work), "-j", jobs, *TRAIN]]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """``(work A, work B, dataset A)``: the same pipeline run twice, independently."""
    a_root, b_root = tmp_path_factory.mktemp("run_a"), tmp_path_factory.mktemp("run_b")
    ds_a, ds_b = _dataset(a_root), _dataset(b_root)
    for argv in _commands(ds_a, a_root / "work", "1"):
        assert main(argv) == 0
    seed = os.environ.get("PYTHONHASHSEED", "")
    env = {**os.environ, "PYTHONHASHSEED": str(int(seed) + 1) if seed.isdigit() else "0"}
    script = ("import sys\nfrom autoseg.cli import main\n"
              f"for argv in {_commands(ds_b, b_root / 'work', '2')!r}:\n    assert main(argv) == 0, argv\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return a_root / "work", b_root / "work", ds_a


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fingerprint.json", "plans.json", "splits.json"])
def test_planning_files_are_identical_bit_for_bit(two_runs, name):
    work_a, work_b, _ = two_runs
    assert (work_a / name).read_bytes() == (work_b / name).read_bytes()


@pytest.mark.slow
def test_preprocessed_arrays_are_identical(two_runs):
    work_a, work_b, _ = two_runs
    arrays = sorted((work_a / "preprocessed" / "3d_fullres").glob("*.npy"))
    assert len(arrays) == 15  # data, seg and foreground locations of 5 cases
    for p in arrays:
        assert p.read_bytes() == (work_b / "preprocessed" / "3d_fullres" / p.name).read_bytes(), p.name


def _losses(work: Path) -> list[tuple[float, float]]:
    rows = [json.loads(line) for line in (work / FOLD / "log.jsonl").read_text().splitlines() if line.strip()]
    return [(r["train_loss"], r["val_loss"]) for r in rows]


@pytest.mark.slow
def test_deterministic_training_repeats_losses_and_checkpoint(two_runs):
    work_a, work_b, _ = two_runs
    losses = _losses(work_a)
    assert len(losses) == 2 and all(np.isfinite(v) for row in losses for v in row)
    assert losses == _losses(work_b)
    final = FOLD / "checkpoint_final.pt"
    state_a = torch.load(work_a / final, weights_only=True)
    state_b = torch.load(work_b / final, weights_only=True)
    assert state_a["network"].keys() == state_b["network"].keys()
    assert all(torch.equal(state_a["network"][k], state_b["network"][k]) for k in state_a["network"])
    assert (work_a / final).read_bytes() == (work_b / final).read_bytes()  # the whole file, optimizer and RNG included


@pytest.mark.slow
def test_deterministic_prediction_gives_identical_files(two_runs, tmp_path):
    work_a, work_b, ds = two_runs
    outs = []
    for k, work in enumerate((work_a, work_a, work_b)):
        out = tmp_path / f"pred_{k}"
        assert main(["-q", "predict", "-i", str(ds / "imagesTs"), "-o", str(out), "--workdir", str(work),
                     "--device", "cpu", "--deterministic", "--save-probabilities", "--no-tta"]) == 0  # TTA: slow
        outs.append(out)
    segs = sorted(outs[0].glob("*.nii.gz"))
    assert len(segs) == 2
    for seg in segs:
        first = read_label(seg).array
        for other in outs[1:]:
            again = read_label(other / seg.name).array
            assert again.dtype == first.dtype and np.array_equal(again, first), seg.name
            assert (other / seg.name).read_bytes() == seg.read_bytes()
            with np.load(seg.with_name(seg.name.replace(".nii.gz", ".npz"))) as p, \
                    np.load(other / seg.name.replace(".nii.gz", ".npz")) as q:
                assert np.array_equal(p["probabilities"], q["probabilities"])
