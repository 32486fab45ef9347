"""Storage of preprocessed cases: memory-mapped .npy or Blosc2 NDArrays (``autoseg plan --storage``)."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest

from autoseg.cli import main as cli
from autoseg.errors import MissingDependencyError, PlanningError
from autoseg.planner.plans import Plans
from autoseg.preprocessing.preprocess import case_paths, preprocess_dataset
from autoseg.preprocessing.storage import blosc2_layout, load_case_array, save_case_array
from autoseg.training.dataloader import CaseStore, PatchLoader

blosc2 = pytest.importorskip("blosc2")
INSTALL = 'pip install "autoseg[blosc2]"'


def _losses(folder):
    return [json.loads(line)["train_loss"] for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stores(tiny_brats, tmp_path_factory):
    """The tiny dataset preprocessed into two work folders, one per storage: {storage: (workdir, plans)}."""
    ds, _, plans = tiny_brats
    out = {}
    for storage in ("npy", "blosc2"):
        wd = tmp_path_factory.mktemp(storage)
        p = dataclasses.replace(plans, storage=storage)
        p.save(wd / "plans.json")
        preprocess_dataset(ds, p, "3d_fullres", wd, progress=False)
        out[storage] = (wd, p)
    return out


def test_the_layout_follows_the_patch_and_the_l1_cache():
    assert blosc2_layout((4, 160, 160, 160), (128, 128, 128), 4) == ((4, 64, 64, 64), (4, 8, 16, 16))
    assert blosc2_layout((1, 160, 160, 160), (128, 128, 128), 1) == ((1, 64, 64, 64), (1, 32, 32, 32))
    assert blosc2_layout((2, 40, 300, 20), (96, 160, 160), 4) == ((2, 40, 128, 20), (2, 16, 16, 16))
    chunks, blocks = blosc2_layout((1, 60, 512, 512), (448, 448), 4)  # 2D configuration: one slice per read
    assert chunks == (1, 1, 256, 256) and blocks == (1, 1, 64, 128)


def test_a_patch_is_sliced_from_the_opened_ndarray(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(3, 40, 50, 30)).astype(np.float32)
    data[:, :20] = 0  # background
    save_case_array(tmp_path / "c.b2nd", data, patch_size=(16, 16, 16))
    save_case_array(tmp_path / "c.npy", data)
    arr = load_case_array(tmp_path / "c.b2nd")
    assert isinstance(arr, blosc2.NDArray) and arr.shape == data.shape and arr.dtype == np.float32
    assert arr.chunks == (3, 8, 8, 8) and arr.blocks == (3, 8, 8, 8)
    patch = arr[:, 5:21, 30:46, 14:30]
    assert isinstance(patch, np.ndarray) and np.array_equal(patch, data[:, 5:21, 30:46, 14:30])
    assert np.array_equal(load_case_array(tmp_path / "c.b2nd", mmap=False), data)
    assert np.array_equal(load_case_array(tmp_path / "c.npy")[:, 3], data[:, 3])
    assert (tmp_path / "c.b2nd").stat().st_size < (tmp_path / "c.npy").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.b2nd", "c.npy"]  # no temporaries left


def test_plans_record_the_storage_and_old_plans_load_as_npy(tiny_brats):
    _, _, plans = tiny_brats
    d = dataclasses.replace(plans, storage="blosc2").to_json()
    assert d["storage"] == "blosc2" and Plans.from_json(d).storage == "blosc2"
    del d["storage"]  # a plans.json from before the choice existed
    assert Plans.from_json(d).storage == "npy"
    with pytest.raises(PlanningError, match="npy, blosc2"):
        dataclasses.replace(plans, storage="zarr")


def test_blosc2_and_npy_stores_give_equal_patches(tiny_brats, stores):
    ds, _, plans = tiny_brats
    ident = plans.configuration("3d_fullres").data_identifier
    folders = {s: wd / "preprocessed" / ident for s, (wd, _) in stores.items()}
    cid = ds.cases[0].case_id
    assert case_paths(folders["blosc2"], cid)["data"].suffix == ".b2nd"
    assert not case_paths(folders["blosc2"], cid, "npy")["data"].exists()
    a, b = (load_case_array(case_paths(folders[s], cid)["data"]) for s in ("npy", "blosc2"))
    assert isinstance(b, blosc2.NDArray) and np.array_equal(a[:, 2:14, 1:17, 3:9], b[:, 2:14, 1:17, 3:9])
    kw = dict(patch_size=(24, 24, 24), final_patch_size=(16, 16, 16), batch_size=3, seed=5)
    loaders = [PatchLoader(CaseStore(folders[s], [c.case_id for c in ds.cases]), **kw) for s in ("npy", "blosc2")]
    for _ in range(6):  # patches reaching outside the image (padding) included
        x, y = (loader.generate_train_batch() for loader in loaders)
        assert x["keys"] == y["keys"] and x["data"].dtype == y["data"].dtype == np.float32
        assert np.array_equal(x["data"], y["data"]) and np.array_equal(x["seg"], y["seg"])


def test_switching_storage_re_preprocesses(tiny_brats, tmp_path):
    ds, _, plans = tiny_brats
    ids = tuple(c.case_id for c in ds.cases)
    runs = [preprocess_dataset(ds, dataclasses.replace(plans, storage=s), "3d_fullres", tmp_path, progress=False)
            for s in ("npy", "npy", "blosc2", "blosc2", "npy")]
    assert [(r.processed, r.reused) for r in runs] == [(ids, ()), ((), ids), (ids, ()), ((), ids), (ids, ())]
    names = {p.name for p in runs[-1].folder.iterdir()}
    assert f"{ids[0]}.npy" in names and not any(n.endswith(".b2nd") for n in names)  # the other format is gone


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_a_blosc2_store_trains_to_the_same_losses(tiny_brats, stores, workers):
    ds = tiny_brats[0]
    fast = dict(epochs=2, iters_per_epoch=3, val_iters=1, workers=workers, device="cpu", progress=False,
                deterministic=True, validate=False)
    from autoseg.api import train

    losses = {s: _losses(train(ds.root, "3d_fullres", f"{workers}", workdir=wd, **fast)[0].folder)
              for s, (wd, _) in stores.items()}
    assert len(losses["npy"]) == 2 and losses["blosc2"] == losses["npy"]


def test_cli_plan_records_the_storage_and_writes_b2nd(tiny_brats, tmp_path, capsys):
    ds = tiny_brats[0]
    wd = tmp_path / "work"
    assert cli(["-q", "plan", str(ds.root), "--workdir", str(wd), "--preset", "cpu", "--storage", "blosc2"]) == 0
    assert json.loads((wd / "plans.json").read_text())["storage"] == "blosc2"
    assert (wd / "preprocessed" / "3d_fullres" / f"{ds.cases[0].case_id}_seg.b2nd").is_file()


def test_a_missing_blosc2_package_is_one_line_naming_the_extra(tiny_brats, stores, tmp_path, monkeypatch, capsys):
    ds, _, plans = tiny_brats
    wd, _ = stores["blosc2"]
    monkeypatch.setitem(sys.modules, "blosc2", None)  # import blosc2 now raises ImportError
    with pytest.raises(MissingDependencyError) as info:
        preprocess_dataset(ds, dataclasses.replace(plans, storage="blosc2"), "3d_fullres", tmp_path, progress=False)
    assert INSTALL in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(MissingDependencyError, match="autoseg\\[blosc2\\]"):
        CaseStore(wd / "preprocessed" / "3d_fullres", [ds.cases[0].case_id]).get(ds.cases[0].case_id)
    capsys.readouterr()
    assert cli(["plan", str(ds.root), "--workdir", str(tmp_path / "w"), "--storage", "blosc2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and INSTALL in err and not (tmp_path / "w" / "fingerprint.json").exists()
