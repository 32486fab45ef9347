"""A tiny trained work folder for the report tests: 3d_fullres folds 0 and 1 (a couple of iterations each) and
find-best, about 10 s on 2 CPU cores."""

from __future__ import annotations

import shutil

import pytest

from autoseg.api import train
from autoseg.ensemble.selection import find_best

FAST = {"iters_per_epoch": 2, "val_iters": 1, "workers": 0, "device": "cpu", "progress": False}


@pytest.fixture(scope="session")
def trained_work(tmp_path_factory, planned_factory):
    """(dataset, workdir) of a 6-case BraTS-style dataset trained on two CV folds, with find-best run."""
    ds, wd, _ = planned_factory(tmp_path_factory.mktemp("report"), n_cases=6)
    train(ds.root, "3d_fullres", "0", workdir=wd, epochs=1, **FAST)
    train(ds.root, "3d_fullres", "1", workdir=wd, epochs=2, **FAST)
    find_best(wd, jobs=1, progress=False)
    return ds, wd


@pytest.fixture
def work_copy(trained_work, tmp_path):
    """A copy of the trained work folder (without the preprocessed data) that a test may damage."""
    ds, wd = trained_work
    dst = tmp_path / "work"
    shutil.copytree(wd, dst, ignore=shutil.ignore_patterns("preprocessed", "*.pt", "report.html"))
    return ds, dst
