"""Optimisers and learning-rate schedules by name, and the training loop with a chosen pair (tiny CPU runs)."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch

from autoseg.errors import TrainingConfigError
from autoseg.networks.checkpoint import LATEST, load_checkpoint
from autoseg.training.loop import TrainingLoop, poly_lr
from autoseg.training.optim import OPTIMIZERS, SCHEDULES, adamw, constant, cosine, poly, sgd
from autoseg.training.progress import TrainingLog
from autoseg.training.settings import TrainSettings


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("autoseg.training.loop.plot_progress", lambda log, path: None)  # matplotlib is slow


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 1))


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out, target[:, 0].long())


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"data": torch.randn(2, 1, 6, 6, 6, generator=g), "target": torch.randint(0, 3, (2, 1, 6, 6, 6), generator=g)}
            for _ in range(n)]


def _loop(folder: Path, net: torch.nn.Module, **kw: object) -> TrainingLoop:
    folder.mkdir(parents=True, exist_ok=True)
    return TrainingLoop(net, _loss, folder=folder, device=torch.device("cpu"), regions=False, ignore_label=None,
                        amp=False, initial_lr=1e-2, weight_decay=3e-5, momentum=0.99, grad_clip=12.0, **kw)


def _run(loop: TrainingLoop, batches: list[dict[str, torch.Tensor]], *, epochs: int) -> list[tuple[float, float]]:
    log = TrainingLog(loop.folder / "log.jsonl")
    loop.run(iter(batches), iter([]), epochs=epochs, iters_per_epoch=1, val_iters=0, save_every=1, log=log,
             progress=False)
    return [(r["train_loss"], r["lr"]) for r in _records(loop.folder)]


def _records(folder: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


# ---- the factories -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("table", [OPTIMIZERS, SCHEDULES])
def test_every_factory_has_typed_keyword_defaults_and_a_summary(table: dict) -> None:
    for name, factory in table.items():
        assert factory.__doc__ and factory.__doc__.strip().splitlines()[0], name
        sig = inspect.signature(factory, eval_str=True)
        for p in sig.parameters.values():
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                assert p.default is not inspect.Parameter.empty and p.annotation is not inspect.Parameter.empty
            else:  # only the optimisers' (parameters, settings), which the caller supplies
                assert table is OPTIMIZERS and p.kind is inspect.Parameter.POSITIONAL_ONLY, (name, p)


@pytest.mark.parametrize(("factory", "kwargs", "words"), [
    (sgd, {"lr": 0.0}, ["'sgd'", "lr=0.0", "> 0"]),
    (sgd, {"lr": "fast"}, ["'sgd'", "lr='fast'", "not a number"]),
    (sgd, {"momentum": 1.0}, ["'sgd'", "momentum=1.0", "0 <= momentum < 1"]),
    (sgd, {"weight_decay": -1e-5}, ["'sgd'", "weight_decay=-1e-05", ">= 0"]),
    (sgd, {"nesterov": 1}, ["'sgd'", "nesterov=1", "True or False"]),
    (sgd, {"momentum": 0.0}, ["'sgd'", "momentum=0", "nesterov"]),
    (adamw, {"lr": -1.0}, ["'adamw'", "lr=-1.0", "> 0"]),
    (adamw, {"weight_decay": math.nan}, ["'adamw'", "weight_decay=nan", ">= 0"]),
    (adamw, {"beta1": 1.0}, ["'adamw'", "beta1=1.0", "0 <= beta1 < 1"]),
    (adamw, {"beta2": True}, ["'adamw'", "beta2=True", "not a number"]),
])
def test_optimizer_parameters_are_validated(factory, kwargs, words) -> None:
    with pytest.raises(TrainingConfigError) as err:
        factory(_net().parameters(), **kwargs)
    assert all(w in str(err.value) for w in ["optimizer", *words]), str(err.value)


@pytest.mark.parametrize(("factory", "kwargs", "words"), [
    (poly, {"exponent": 0.0}, ["'poly'", "exponent=0.0", "> 0"]),
    (cosine, {"warmup": -1}, ["'cosine'", "warmup=-1", ">= 0"]),
    (cosine, {"warmup": 1.5}, ["'cosine'", "warmup=1.5", "integer"]),
    (cosine, {"min_lr": -0.1}, ["'cosine'", "min_lr=-0.1", ">= 0"]),
])
def test_schedule_parameters_are_validated(factory, kwargs, words) -> None:
    with pytest.raises(TrainingConfigError) as err:
        factory(**kwargs)
    assert all(w in str(err.value) for w in ["schedule", *words]), str(err.value)


def test_sgd_takes_unset_values_from_the_settings_and_matches_the_old_call() -> None:
    net = _net()
    group = sgd(net.parameters()).param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (1e-2, 0.99, 3e-5, True)
    settings = TrainSettings(initial_lr=0.05, momentum=0.9, weight_decay=1e-4)
    group = sgd(net.parameters(), settings, momentum=0.5).param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.5, 1e-4)
    old = torch.optim.SGD(net.parameters(), lr=settings.initial_lr, weight_decay=settings.weight_decay,
                          momentum=settings.momentum, nesterov=True)
    assert sgd(net.parameters(), settings).state_dict() == old.state_dict()


@pytest.mark.parametrize("factory", [sgd, adamw])
def test_optimizers_step_with_torch_default_implementation_bit_for_bit(factory) -> None:
    """The factories keep torch's default (for-loop on the CPU): the fused kernels are not bit-identical."""
    finals = []
    for extra in ({}, {"foreach": False}):
        net = _net()
        opt = factory(net.parameters())
        for key, value in extra.items():  # the explicit reference implementation
            for group in opt.param_groups:
                group[key] = value
        assert all(not g.get("fused") for g in opt.param_groups)
        losses = []
        for batch in _batches(4):
            opt.zero_grad()
            loss = _loss(net(batch["data"]), batch["target"])
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert losses[0] != losses[-1]  # it learns something
        finals.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    assert torch.equal(finals[0], finals[1])


def test_poly_is_the_old_poly_lr() -> None:
    schedule = poly()
    for epochs in (1, 7, 1000):
        for epoch in range(epochs + 1):
            old = 0.01 * (1 - min(epoch, epochs) / epochs) ** 0.9  # the loop's formula before schedules existed
            assert schedule(0.01, epoch, epochs) == old == poly_lr(0.01, epoch, epochs)
    assert poly(exponent=1.0)(1.0, 3, 4) == 0.25


def test_cosine_warm_up_and_end_values() -> None:
    schedule = cosine(warmup=3, min_lr=0.1)
    values = [schedule(1.0, e, 7) for e in range(8)]
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # (e + 1) / (warmup + 1), then initial_lr
    # cosine over the 4 remaining epochs: 0.1 + 0.9 * (1 + cos(pi * t)) / 2, t = (e - 3) / 4
    assert values[4:] == pytest.approx([0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 0.55,
                                        0.1 + 0.45 * (1 - math.cos(math.pi / 4)), 0.1])
    assert cosine()(2.0, 0, 10) == 2.0 and cosine()(2.0, 10, 10) == pytest.approx(0.0)
    assert cosine()(2.0, 5, 10) == pytest.approx(1.0)
    with pytest.raises(TrainingConfigError, match=r"'cosine': warmup=7 .*epochs"):
        cosine(warmup=7)(1.0, 0, 7)
    with pytest.raises(TrainingConfigError, match=r"'cosine': min_lr=0.5 .*initial"):
        cosine(min_lr=0.5)(0.1, 0, 7)


def test_constant() -> None:
    assert [constant()(0.3, e, 5) for e in range(6)] == [0.3] * 6


# ---- the loop with a chosen optimiser and schedule --------------------------------------------------------------
def test_default_loop_is_the_old_sgd_and_poly_bit_for_bit(tmp_path: Path) -> None:
    default = _run(_loop(tmp_path / "default", _net()), _batches(3), epochs=3)
    net = _net()
    old_sgd = torch.optim.SGD(net.parameters(), lr=1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    explicit = _run(_loop(tmp_path / "explicit", net, optimizer=old_sgd,
                          schedule=lambda lr, e, n: lr * (1 - min(e, n) / n) ** 0.9), _batches(3), epochs=3)
    assert default == explicit
    assert [lr for _, lr in default] == [poly_lr(1e-2, e, 3) for e in range(3)]


class _Killed(Exception):
    pass


def _stream(batches: list[dict[str, torch.Tensor]], stop: int | None = None):
    for i, batch in enumerate(batches):
        if i == stop:
            raise _Killed
        yield batch


def test_adamw_with_cosine_trains_and_resumes_identically(tmp_path: Path) -> None:
    batches, epochs = _batches(4), 4

    def make(folder: Path) -> TrainingLoop:
        net = _net()
        return _loop(folder, net, optimizer=adamw(net.parameters(), lr=1e-3), schedule=cosine(warmup=1))

    straight = make(tmp_path / "straight")
    _run(straight, batches, epochs=epochs)
    expected = _records(straight.folder)
    assert [r["lr"] for r in expected] == pytest.approx([5e-4, 1e-3, 1e-3 * 0.75, 1e-3 * 0.25])

    killed = make(tmp_path / "killed")
    with pytest.raises(_Killed):  # dies in epoch 2, after the checkpoint of epoch 1
        killed.run(_stream(batches, stop=2), iter([]), epochs=epochs, iters_per_epoch=1, val_iters=0, save_every=1,
                   log=TrainingLog(killed.folder / "log.jsonl"), progress=False)
    ckpt = load_checkpoint(killed.folder / LATEST)
    assert ckpt["epoch"] == 2 and ckpt["optimizer"]["state"]  # AdamW's moments are in the checkpoint
    resumed = make(killed.folder)  # a fresh process: new network and optimiser, then the checkpoint
    resumed.restore(ckpt)
    resumed.run(iter(batches[2:]), iter([]), epochs=epochs, iters_per_epoch=1, val_iters=0, save_every=1,
                log=TrainingLog(killed.folder / "log.jsonl", keep_before=2), progress=False)
    got = _records(killed.folder)
    assert [(r["train_loss"], r["lr"]) for r in got] == [(r["train_loss"], r["lr"]) for r in expected]
    for a, b in zip(straight.network.parameters(), resumed.network.parameters(), strict=True):
        assert torch.equal(a, b)


def test_restore_takes_the_checkpoints_state_and_rate_and_keeps_this_runs_optimiser_settings(tmp_path: Path) -> None:
    first = _loop(tmp_path / "a", _net())
    _run(first, _batches(2), epochs=2)
    ckpt = load_checkpoint(first.folder / "checkpoint_final.pt")
    saved = ckpt["optimizer"]["param_groups"][0]
    again = TrainingLoop(_net(), _loss, folder=tmp_path / "b", device=torch.device("cpu"), regions=False,
                         ignore_label=None, amp=False, initial_lr=1e-2, weight_decay=1e-4, momentum=0.9,
                         grad_clip=12.0)
    again.restore(ckpt)
    group = again.optimizer.param_groups[0]
    assert saved["momentum"] == 0.99 and group["momentum"] == 0.9 and group["weight_decay"] == 1e-4
    assert group["lr"] == saved["lr"]
    state = again.optimizer.state_dict()["state"]
    assert all(torch.equal(state[k]["momentum_buffer"], v["momentum_buffer"])
               for k, v in ckpt["optimizer"]["state"].items())
