"""Federated planning and training on Flower over 127.0.0.1: merged statistics plan like the pooled dataset, a real
server and sites train and validate, a dropped site does not stop a round, a killed server resumes, and nothing but
statistics, weights, counts and Dice leaves a site."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("flwr")

from autoseg.cli import main  # noqa: E402
from autoseg.data.synthetic import make_synthetic_dataset  # noqa: E402
from autoseg.federated import client as client_module  # noqa: E402
from autoseg.federated.client import run_site  # noqa: E402
from autoseg.federated.planning import plan_federation  # noqa: E402
from autoseg.federated.server import FederationSettings, run_server  # noqa: E402
from autoseg.federated.simulate import free_port  # noqa: E402
from autoseg.federated.site import Site  # noqa: E402
from autoseg.federated.strategy import HISTORY  # noqa: E402
from autoseg.fingerprint.extract import fingerprint_dataset  # noqa: E402
from autoseg.fingerprint.merge import SiteStatistics, site_statistics  # noqa: E402
from autoseg.io.dataset import load_dataset  # noqa: E402
from autoseg.planner.planner import plan_experiment  # noqa: E402
from autoseg.training.settings import TrainSettings  # noqa: E402

TRAIN = TrainSettings(progress=False, val_iters=1, workers=0, device="cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_merged_site_statistics_plan_like_the_pooled_dataset(tmp_path):
    root = make_synthetic_dataset(tmp_path / "Dataset009_Split", n_cases=6, shape=(20, 24, 28), n_channels=2,
                                  seed=4, shape_jitter=0.3)
    ds = load_dataset(root)
    whole = fingerprint_dataset(ds, progress=False)
    thirds = [dataclasses.replace(ds, cases=ds.cases[k::3], spec=dataclasses.replace(ds.spec, num_training=2))
              for k in range(3)]
    parts = [site_statistics(third, progress=False) for third in thirds]
    parts = [SiteStatistics.from_json(json.loads(json.dumps(p.to_json()))) for p in parts]  # as sent over the wire
    merged, plans = plan_federation(parts, dataset_name=whole.dataset_name, preset="cpu")
    expected = plan_experiment(whole, preset="cpu", recipe=plans.recipe(next(iter(plans.configurations))))
    got = {k: v.to_json() for k, v in plans.configurations.items()}
    want = {k: v.to_json() for k, v in expected.configurations.items()}
    norms = [(g.pop("normalization"), w.pop("normalization")) for g, w in zip(got.values(), want.values(), strict=True)]
    assert got == want  # spacing, patch, topology, batch, ...: exactly the pooled plan
    for g, w in ((g, w) for pair in norms for g, w in zip(*pair, strict=True)):
        assert (g["scheme"], g["use_mask"]) == (w["scheme"], w["use_mask"])
        assert g["mean"] == pytest.approx(w["mean"], rel=1e-9) and g["std"] == pytest.approx(w["std"], rel=1e-9)
    assert merged.median_spacing == whole.median_spacing
    assert merged.median_shape_after_crop == whole.median_shape_after_crop
    for got, want in zip(merged.intensity, whole.intensity, strict=True):
        assert got.mean == pytest.approx(want.mean, rel=1e-9) and got.std == pytest.approx(want.std, rel=1e-9)
        assert (got.min, got.max) == (want.min, want.max)
        spread = want.percentile_99_5 - want.percentile_00_5
        for a, b in ((got.median, want.median), (got.percentile_00_5, want.percentile_00_5),
                     (got.percentile_99_5, want.percentile_99_5)):
            assert abs(a - b) < 0.02 * spread  # sketched: sampling noise of both computations plus the sketch


def _sites(tmp_path, n=2):
    out = []
    for k in range(n):
        root = make_synthetic_dataset(tmp_path / f"site{k}" / "Dataset008_Fed", n_cases=5, shape=(20, 20, 20),
                                      n_channels=2, regions=True, seed=10 + k)
        out.append(Site(load_dataset(root), tmp_path / f"work{k}", fold=0, settings=TRAIN))
    return out


def _tiny_plans(plans):
    """The suite's ``tests/conftest.py`` helper, loaded by path (a bare ``import conftest`` finds whichever
    conftest module pytest imported last)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("autoseg_tests_conftest", Path(__file__).parent / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_plans(plans)


def _tiny_server_folder(tmp_path, sites):
    _, plans = plan_federation([site_statistics(s.dataset, progress=False) for s in sites], dataset_name="Fed",
                               preset="cpu")
    wd = tmp_path / "server"
    wd.mkdir()
    _tiny_plans(plans).save(wd / "plans.json")  # a coordinator with plans.json uses them (tiny network: fast test)
    return wd


def _history(wd):
    path = wd / HISTORY
    return json.loads(path.read_text())["history"] if path.is_file() else []


def _thread(target):
    def quiet():
        try:
            target()
        except SystemExit:  # a site made to drop out
            pass
    t = threading.Thread(target=quiet, daemon=True)
    t.start()
    return t


@pytest.fixture
def recorded(monkeypatch):
    """Every payload the sites return, by message kind."""
    seen: dict[str, list] = {"get_properties": [], "fit": [], "evaluate": []}
    make = client_module.make_client

    def recording(site, name):
        c = make(site, name)
        for kind in seen:
            original = getattr(c, kind)

            def wrapped(*a, _o=original, _k=kind, **kw):
                out = _o(*a, **kw)
                seen[_k].append(out)
                return out
            setattr(c, kind, wrapped)
        return c
    monkeypatch.setattr(client_module, "make_client", recording)
    return seen


def _check_payloads(seen, sites):
    assert all(seen.values()), {k: len(v) for k, v in seen.items()}
    forbidden = [c.case_id for s in sites for c in s.dataset.cases] + [str(s.dataset.root) for s in sites]
    for weights, n, metrics in seen["fit"]:
        assert all(isinstance(w, np.ndarray) and w.dtype.kind in "fiu" for w in weights)
        assert isinstance(n, int) and set(metrics) == {"site", "train_loss"}
        assert isinstance(metrics["train_loss"], float)
    for loss, n, metrics in seen["evaluate"]:
        assert isinstance(loss, float) and isinstance(n, int) and set(metrics) == {"site", "dice"}
    for props in seen["get_properties"]:
        text = props["description"]
        assert not any(f in text for f in forbidden)


def test_federation_trains_on_127_0_0_1_and_a_dropped_site_does_not_stop_the_round(
        tmp_path, recorded):
    sites = _sites(tmp_path)
    wd = _tiny_server_folder(tmp_path, sites)
    client_module.make_client(sites[0], "siteA").get_properties({})  # what a site answers when asked to plan
    address = f"127.0.0.1:{free_port()}"

    class Dropping(Site):  # the site's process dies in round 2: its connection closes mid-round
        def train_round(self, *a, **kw):
            if kw["round_"] == 2:
                raise SystemExit("site lost")
            return super().train_round(*a, **kw)

    b_started = threading.Event()

    class Waiting(Site):  # round 1 lasts until siteB has had time to connect, so round 2 always samples it
        def train_round(self, *a, **kw):
            if kw["round_"] == 1:
                b_started.wait(60)
                time.sleep(3.0)
            return super().train_round(*a, **kw)

    dropping = Dropping(sites[1].dataset, sites[1].workdir, fold=0, settings=TRAIN)
    waiting = Waiting(sites[0].dataset, sites[0].workdir, fold=0, settings=TRAIN)
    settings = FederationSettings(rounds=2, min_sites=1, iters_per_epoch=2, eval_every=2, wait_timeout=60, round_timeout=120,
                                  share_momentum=True)  # the resumed coordinator below shares none (the default)
    result = {}
    server = _thread(lambda: result.setdefault("r", run_server(wd, settings, address=address, log=lambda s: None)))
    first = _thread(lambda: run_site(waiting, "siteA", address, max_wait_time=60))
    time.sleep(1.0)
    b_started.set()
    _thread(lambda: run_site(dropping, "siteB", address, max_wait_time=60)).join(60)
    server.join(120)
    first.join(30)
    assert not server.is_alive() and result["r"].rounds_done == 2
    history = json.loads((wd / HISTORY).read_text())["history"]
    fits = [h for h in history if h["kind"] == "fit"]
    assert [h["round"] for h in fits] == [1, 2] and all(h["aggregated"] for h in fits), history
    assert fits[1]["sites"] == ["siteA"] and fits[1]["failures"] == 1
    assert all(h["mb_momentum_up"] > 0 for h in fits)  # the sites' momentum buffers travelled after their weights
    assert all(set(h["dice"]) <= {"siteA", "siteB"} for h in history if h["kind"] == "evaluate")
    # the coordinator is killed (SIGKILL) after round 3 is saved and restarted on its folder: it continues with round
    # 4, and siteA, which lost it, reconnects and gets the current weights
    command = [sys.executable, "-m", "autoseg", "-q", "federated", "server", "--workdir", str(wd), "--rounds", "4",
               "--min-sites", "1", "--address", address, "--iters-per-epoch", "2", "--eval-every", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    site = _thread(lambda: run_site(sites[0], "siteA", address, max_wait_time=90, log=lambda s: None))
    deadline = time.time() + 90
    while time.time() < deadline and not any(h["round"] == 3 for h in _history(wd)):
        time.sleep(0.2)
    killed.kill()
    killed.wait(10)
    assert max(h["round"] for h in _history(wd)) == 3
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    site.join(30)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after round 3 of 4" in resumed.stdout
    fits = [h for h in _history(wd) if h["kind"] == "fit"]
    assert [h["round"] for h in fits] == [1, 2, 3, 4] and fits[-1]["sites"] == ["siteA"]
    _check_payloads(recorded, sites)
    # the global model is an ordinary work folder (with dataset.json's labels and region order): predict uses it
    assert (wd / "models" / "3d_fullres" / "dataset.json").is_file()
    case = sites[0].dataset.cases[0]
    out = tmp_path / "pred"
    assert main(["-q", "predict", "-i", *map(str, case.images), "-o", str(out), "--workdir", str(wd),
                 "-c", "3d_fullres", "-f", "all", "--no-tta"]) == 0
    assert any(out.iterdir())


def test_cli_refuses_a_bad_federation_setting_in_one_line(capsys):
    assert main(["federated", "simulate", "nowhere", "--workdir", "w", "--rounds", "0"]) == 2
    err = capsys.readouterr().err
    assert "rounds=0 is not valid; it must be at least 1" in err and "Traceback" not in err


def test_fedprox_optimiser_pulls_the_weights_towards_where_training_started():
    import torch

    from autoseg.training.optim import fedprox, sgd

    def train(make):
        w = torch.nn.Parameter(torch.ones(3))
        opt = make([w])
        for _ in range(5):
            opt.zero_grad()
            (2 * w).sum().backward()
            opt.step()
        return w.detach()

    plain = train(lambda p: sgd(p, TRAIN, lr=0.1, momentum=0.5, weight_decay=0.0))
    assert torch.equal(train(lambda p: fedprox(p, TRAIN, mu=0.0, lr=0.1, momentum=0.5, weight_decay=0.0)), plain)
    proximal = train(lambda p: fedprox(p, TRAIN, mu=1.0, lr=0.1, momentum=0.5, weight_decay=0.0))
    assert bool(((proximal - 1).abs() < (plain - 1).abs()).all())


def test_a_federation_of_one_site_trains_exactly_what_autoseg_train_trains(tmp_path):
    import torch

    from autoseg.api import train
    from autoseg.federated.simulate import simulate

    site = _sites(tmp_path, n=1)[0]
    wd = _tiny_server_folder(tmp_path, [site])
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "plans.json").write_text((wd / "plans.json").read_text())
    federation = FederationSettings(rounds=2, min_sites=1, iters_per_epoch=2, eval_every=2)
    settings = dataclasses.replace(TRAIN, validate=False)
    train(site.dataset, "3d_fullres", "all", workdir=alone, settings=dataclasses.replace(  # the federation's optimiser
        settings, epochs=2, iters_per_epoch=2, momentum=federation.local_momentum, initial_lr=federation.initial_lr))
    simulate([site.dataset.root], wd, federation,
             train=settings, fold="all", log=lambda s: None)
    final = "models/3d_fullres/fold_all/checkpoint_final.pt"
    a, f = (torch.load(p / final, weights_only=True) for p in (alone, wd))
    assert all(torch.equal(a["network"][k], f["network"][k]) for k in a["network"])  # same start, batches, LR, momentum


def test_momentum_buffers_travel_after_the_weights_and_the_server_steps_the_weights_by_its_rate(tmp_path):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from autoseg.federated.model import build_network, load_global, pack, unpack, zero_momentum
    from autoseg.federated.strategy import CheckpointingFedAvg
    from autoseg.planner.plans import Plans

    wd = _tiny_server_folder(tmp_path, _sites(tmp_path, n=1))
    plans = Plans.load(wd / "plans.json")
    state = build_network(plans, "3d_fullres").state_dict()
    zeros = zero_momentum(state, plans, "3d_fullres")
    assert unpack(pack(state, None), state)[1] is None  # --no-share-momentum: weights alone
    strategy = CheckpointingFedAvg(workdir=wd, plans=plans, configuration="3d_fullres", state=state, momentum=zeros,
                                   done=0, total=1, min_sites=2, local_epochs=1, iters_per_epoch=1, eval_every=1,
                                   proximal_mu=0.0, initial_lr=0.01, history=[], log=lambda s: None, server_lr=2.0)
    assert strategy._config(1)["share_momentum"] is True
    results = []
    for value, cases in ((1.0, 1), (5.0, 3)):  # case-weighted mean: (1 * 1 + 5 * 3) / 4 = 4
        weights = {k: (v * 0 + value) if v.is_floating_point() else v for k, v in state.items()}
        arrays = pack(weights, [z + value for z in zeros])
        results.append((None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), cases, {"site": str(cases)})))
    strategy.aggregate_fit(1, results, [])
    network, rounds, momentum, _ = load_global(wd, "3d_fullres")
    assert rounds == 1 and len(momentum) == len(zeros) and all(np.allclose(m, 4.0) for m in momentum)
    # the weights move server_lr (2) times the average update; momentum is averaged
    assert all(np.allclose(v.numpy(), state[k].numpy() + 2 * (4.0 - state[k].numpy()), atol=1e-5)
               for k, v in network.items() if v.is_floating_point())
    record = json.loads((wd / HISTORY).read_text())["history"][0]
    assert 0 < record["mb_momentum_up"] < record["mb_up"]


def test_server_momentum_adds_the_last_velocity_and_survives_a_restart(tmp_path):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    from autoseg.federated.model import build_network, load_global, pack
    from autoseg.federated.strategy import CheckpointingFedAvg
    from autoseg.planner.plans import Plans

    wd = _tiny_server_folder(tmp_path, _sites(tmp_path, n=1))
    plans = Plans.load(wd / "plans.json")
    state = build_network(plans, "3d_fullres").state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point())

    def strategy(done, velocity, start):
        return CheckpointingFedAvg(workdir=wd, plans=plans, configuration="3d_fullres", state=start, momentum=None,
                                   done=done, total=3, min_sites=1, local_epochs=1, iters_per_epoch=1, eval_every=1,
                                   proximal_mu=0.0, initial_lr=0.01, history=[], log=lambda s: None, server_lr=1.0,
                                   server_momentum=0.5, velocity=velocity)

    def answer(s, round_, weights):  # one site that always returns the global weights plus 1
        arrays = pack({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, None)
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, {"site": "a"})
        return parameters_to_ndarrays(s.aggregate_fit(round_, [(None, res)], [])[0])

    first = strategy(0, None, state)
    answer(first, 1, state)  # velocity 1, weights + 1
    network, done, _, velocity = load_global(wd, "3d_fullres")
    assert done == 1 and np.allclose(velocity[0], 1.0)
    resumed = strategy(done, velocity, network)  # a restarted coordinator continues with the saved velocity
    answer(resumed, 1, network)  # velocity 0.5 * 1 + 1 = 1.5
    network, done, _, _ = load_global(wd, "3d_fullres")
    assert done == 2 and np.allclose(network[key].numpy(), state[key].numpy() + 2.5, atol=1e-5)
