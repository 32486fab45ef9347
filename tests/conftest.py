"""A tiny planned dataset shared by the training and inference tests (4 stages of 8-64 features at 32^3 would be slow; the
plans are shrunk to 3 stages of 4-16 features on a 16^3 patch)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from autoseg.api import plan, preprocess
from autoseg.data.synthetic import make_synthetic_dataset
from autoseg.io.dataset import load_dataset
from autoseg.networks.topology import UNetTopology


def tiny_plans(plans, patch=(16, 16, 16)):
    """The same plans with a 3-stage 4-8-16 network on a small patch (fast CPU steps)."""
    configs = {}
    for name, cfg in plans.configurations.items():
        nd = cfg.ndim
        p = patch[-nd:]
        topo = UNetTopology(strides=((1,) * nd, (2,) * nd, (2,) * nd), kernel_sizes=((3,) * nd,) * 3,
                            features_per_stage=(4, 8, 16), n_blocks_per_stage=(1, 1, 1),
                            n_conv_per_stage_decoder=(1, 1), block=cfg.topology.block)
        configs[name] = dataclasses.replace(cfg, patch_size=tuple(p), topology=topo, batch_size=2)
    return dataclasses.replace(plans, configurations=configs)


def make_planned(root: Path, *, kind: str = "brats", regions: bool = True, n_cases: int = 6,
                 shape=(20, 20, 20), ndim: int = 3, n_channels: int = 2, n_test: int = 0):
    ds = make_synthetic_dataset(root / "Dataset007_Tiny", n_cases=n_cases, shape=shape, n_channels=n_channels,
                                kind=kind, regions=regions, ndim=ndim, seed=1, n_test=n_test)
    wd = root / "work"
    plans = tiny_plans(plan(ds, workdir=wd, preset="cpu", progress=False))
    plans.save(wd / "plans.json")
    preprocess(ds, list(plans.configurations), workdir=wd, progress=False)
    return load_dataset(ds), wd, plans


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test: tests that run a server and its clients as threads of this process
    keep a loaded machine responsive."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_brats(tmp_path_factory):
    """A planned + preprocessed 6-case 2-channel region (BraTS-style) dataset: (dataset, workdir, plans)."""
    return make_planned(tmp_path_factory.mktemp("tiny_brats"))


@pytest.fixture(scope="session")
def planned_factory():
    """:func:`make_planned`, for tests that need a dataset of their own kind."""
    return make_planned
