"""A tiny trained model shared by the inference tests: 3d_fullres fold 0 of a 2-channel region dataset with
two held-out test cases (imagesTs/labelsTs)."""

from __future__ import annotations

import pytest

from autoseg.api import train

FAST = {"iters_per_epoch": 4, "val_iters": 1, "workers": 0, "device": "cpu", "progress": False}


@pytest.fixture(scope="session")
def trained(tmp_path_factory, planned_factory):
    """``(dataset, workdir, plans)`` with a finished 3d_fullres fold 0 (validation outputs included)."""
    ds, wd, plans = planned_factory(tmp_path_factory.mktemp("trained"), n_test=2)
    train(ds.root, "3d_fullres", 0, workdir=wd, epochs=3, **FAST)
    return ds, wd, plans
