"""A site as a Flower client: the only messages it sends are listed in :data:`SENT`."""

from __future__ import annotations

import json
from typing import Any

from autoseg.federated.flower import flwr
from autoseg.federated.model import build_network, to_arrays, to_state
from autoseg.federated.site import Site
from autoseg.planner.plans import Plans

#: what leaves a site: the dataset description and statistics (JSON), weights, counts, a loss and a Dice per round
SENT = {"get_properties": ("description",), "fit": ("weights", "num_examples", "site", "train_loss"),
        "evaluate": ("loss", "num_examples", "site", "dice")}


def make_client(site: Site, name: str) -> Any:
    """A ``flwr.client.NumPyClient`` running ``site``'s local work; ``name`` labels its metrics on the server."""
    fl = flwr()
    templates: dict[str, Any] = {}

    def _incoming(parameters: list[Any], config: dict[str, Any]) -> tuple[Plans, str, dict[str, Any]]:
        plans, configuration = Plans.from_json(json.loads(str(config["plans"]))), str(config["configuration"])
        if configuration not in templates:
            templates[configuration] = build_network(plans, configuration).state_dict()
        return plans, configuration, to_state(list(parameters), templates[configuration])

    class _SiteClient(fl.client.NumPyClient):  # type: ignore[misc,name-defined]
        def get_properties(self, config: dict[str, Any]) -> dict[str, Any]:
            return {"description": json.dumps(site.describe())}

        def fit(self, parameters: list[Any], config: dict[str, Any]) -> tuple[list[Any], int, dict[str, Any]]:
            plans, configuration, state = _incoming(parameters, config)
            iters = int(config.get("iters_per_epoch", 0)) or None
            new, n, loss = site.train_round(plans, configuration, state, round_=int(config["round"]),
                                            epochs=int(config["local_epochs"]), iters_per_epoch=iters,
                                            proximal_mu=float(config.get("proximal_mu", 0.0)))
            return to_arrays(new), n, {"site": name, "train_loss": float("nan") if loss is None else loss}

        def evaluate(self, parameters: list[Any], config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
            plans, configuration, state = _incoming(parameters, config)
            dice, n = site.validate(plans, configuration, state)
            return 1.0 - dice, n, {"site": name, "dice": dice}

    return _SiteClient()


def run_site(site: Site, name: str, server: str, *, root_certificates: bytes | None = None,
             max_wait_time: float | None = None) -> None:
    """Connect to the coordinator and serve it until it ends the federation (retrying while it is unreachable,
    up to ``max_wait_time`` seconds; None: forever). With ``root_certificates`` (PEM of the coordinator's CA) the
    connection is TLS."""
    fl = flwr()
    fl.client.start_client(server_address=server, client=make_client(site, name).to_client(),
                           root_certificates=root_certificates, insecure=root_certificates is None,
                           max_wait_time=max_wait_time)
