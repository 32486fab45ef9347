"""FedAvg (weighted by the sites' training-case counts) that checkpoints the global model after every round and logs
per-site and pooled Dice; imported only once Flower is known to be installed (:mod:`autoseg.federated.server`)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg

from autoseg.federated.model import pack, save_global, unpack
from autoseg.io.atomic import write_json_atomic
from autoseg.planner.plans import Plans
from autoseg.training.optim import poly_lr

#: the server's log of rounds (one record per training and per evaluation round) in its work folder
HISTORY = "federation.json"


def _mb(parameters: Parameters, start: int = 0) -> float:
    """Megabytes of the serialised arrays from the ``start``-th on (after the weights: the momentum buffers)."""
    return sum(len(t) for t in parameters.tensors[start:]) / 1e6


class CheckpointingFedAvg(FedAvg):  # type: ignore[misc]
    """FedAvg over the sites that answered a round, when at least ``min_sites`` did (else the weights stay), with a
    server learning rate and server momentum (FedAvgM); ``server_lr=1`` without server momentum is plain FedAvg.

    With ``momentum`` (the global SGD momentum buffers) the buffers travel after the weights and are averaged with the
    same case-count weights, so every site starts a round from the global weights and the global momentum; with one
    local step per round this is SGD on the union of the sites' batches."""

    def __init__(self, *, workdir: Path, plans: Plans, configuration: str, state: dict[str, Any],
                 momentum: list[Any] | None, done: int,
                 total: int, min_sites: int, local_epochs: int, iters_per_epoch: int | None, eval_every: int,
                 proximal_mu: float, initial_lr: float, history: list[dict[str, Any]],
                 log: Callable[[str], None], server_lr: float = 1.0, server_momentum: float = 0.0,
                 velocity: list[Any] | None = None, local_momentum: float | None = None) -> None:
        super().__init__(min_fit_clients=min_sites, min_evaluate_clients=min_sites, min_available_clients=min_sites,
                         accept_failures=True, initial_parameters=ndarrays_to_parameters(pack(state, momentum)))
        self.workdir, self.plans, self.configuration, self.template = workdir, plans, configuration, state
        self.done, self.total, self.min_sites, self.local_epochs = done, total, min_sites, local_epochs
        self.iters, self.eval_every, self.mu, self.history, self.log = (iters_per_epoch, eval_every, proximal_mu,
                                                                          history, log)
        self.initial_lr, self.share_momentum, self.server_lr = initial_lr, momentum is not None, server_lr
        self.server_momentum, self.velocity, self.local_momentum = server_momentum, velocity, local_momentum
        self.current = pack(state, momentum)
        self._plans_json = json.dumps(plans.to_json())

    def _config(self, server_round: int) -> dict[str, Any]:
        """The round's instructions; the learning rate follows poly decay over the whole federation (the sites hold
        it constant within a round), so late rounds refine as the last epochs of a centralised run do."""
        g = self.done + server_round
        return {"round": g, "local_epochs": self.local_epochs, "iters_per_epoch": self.iters or 0,
                "plans": self._plans_json, "configuration": self.configuration, "proximal_mu": self.mu,
                "learning_rate": poly_lr(self.initial_lr, g - 1, self.total),
                "share_momentum": self.share_momentum,
                **({} if self.local_momentum is None else {"sgd_momentum": self.local_momentum})}

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[Any]:
        pairs = super().configure_fit(server_round, parameters, client_manager)
        for _, ins in pairs:
            ins.config = self._config(server_round)
        return pairs

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[Any]:
        g = self.done + server_round
        if g % self.eval_every and g != self.total:
            return []
        pairs = super().configure_evaluate(server_round, parameters, client_manager)
        for _, ins in pairs:
            ins.config = self._config(server_round)
        return pairs

    def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[Any, dict[str, Any]]:
        g = self.done + server_round
        sites = sorted(str(r.metrics.get("site", "?")) for _, r in results)
        record = {"round": g, "kind": "fit", "sites": sites, "failures": len(failures),
                  "mb_up": round(sum(_mb(r.parameters) for _, r in results), 4),
                  "mb_momentum_up": round(sum(_mb(r.parameters, len(self.template)) for _, r in results), 4),
                  "train_loss": {str(r.metrics.get("site")): r.metrics.get("train_loss") for _, r in results}}
        if len(results) < self.min_sites:
            self._record({**record, "aggregated": False})
            self.log(f"round {g}: {len(results)} site(s) answered, fewer than --min-sites {self.min_sites}; the global "
                     "model is unchanged")
            return None, {}
        results = sorted(results, key=lambda r: str(r[1].metrics.get("site", "")))  # one summation order: repeatable
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        arrays = self._server_step(parameters_to_ndarrays(parameters))
        parameters = ndarrays_to_parameters(arrays)
        state, momentum = unpack(arrays, self.template)
        save_global(self.workdir, self.plans, self.configuration, state, round_=g, epochs=g * self.local_epochs,
                    momentum=momentum, velocity=self.velocity)
        self._record({**record, "aggregated": True, "mb_down": round(_mb(parameters) * (len(results) + len(failures)), 4)})
        self.log(f"round {g}: averaged {len(results)} site(s) ({', '.join(sites)}), {len(failures)} failed; "
                 f"global model saved")
        return parameters, metrics

    def _server_step(self, average: list[Any]) -> list[Any]:
        """The new global arrays: the weights move ``server_lr`` times the server's velocity, which is the sites'
        case-weighted average update plus ``server_momentum`` times the last velocity (FedAvgM, Hsu et al. 2019:
        Flower's ``FedAvgM`` rule); rate 1 and no server momentum is plain FedAvg. Shared momentum buffers and
        integer buffers are the sites' average."""
        rate = float(self.server_lr)
        n = len(self.template)
        if rate != 1.0 or self.server_momentum:
            update = [new - old for old, new in zip(self.current[:n], average[:n], strict=True)]
            if self.server_momentum and self.velocity is not None:
                update = [self.server_momentum * v + u for v, u in zip(self.velocity, update, strict=True)]
            self.velocity = update if self.server_momentum else None
            average = [old + rate * u if new.dtype.kind == "f" else new
                       for old, new, u in zip(self.current[:n], average[:n], update, strict=True)] + average[n:]
        self.current = list(average)
        return self.current

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[Any, dict[str, Any]]:
        g = self.done + server_round
        dice = {str(r.metrics.get("site", "?")): (float(r.metrics["dice"]), int(r.num_examples)) for _, r in results}
        used = [(d, n) for d, n in dice.values() if n > 0 and math.isfinite(d)]
        pooled = sum(d * n for d, n in used) / sum(n for _, n in used) if used else None
        self._record({"round": g, "kind": "evaluate", "dice": {k: v[0] for k, v in dice.items()}, "pooled": pooled,
                      "failures": len(failures)})
        per_site = ", ".join(f"{k} {v[0]:.4f} ({v[1]} cases)" for k, v in sorted(dice.items()))
        self.log(f"round {g}: validation Dice {per_site}; pooled {'-' if pooled is None else f'{pooled:.4f}'}")
        return (None if pooled is None else 1.0 - pooled), {"pooled_dice": pooled if pooled is not None else float("nan")}

    def _record(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        write_json_atomic(self.workdir / HISTORY, {"configuration": self.configuration, "history": self.history})
