"""A site as a Flower client: the only messages it sends are listed in :data:`SENT`."""

from __future__ import annotations

import json
import time
from typing import Any

from autoseg.errors import FederationError
from autoseg.federated.flower import flwr
from autoseg.federated.model import build_network, pack, unpack
from autoseg.federated.site import Site
from autoseg.planner.plans import Plans

#: what leaves a site: the dataset description and statistics (JSON), weights (and, when shared, the SGD momentum
#: buffers after them), counts, a loss and a Dice per round
SENT = {"get_properties": ("description",), "fit": ("weights", "num_examples", "site", "train_loss"),
        "evaluate": ("loss", "num_examples", "site", "dice")}


def make_client(site: Site, name: str) -> Any:
    """A ``flwr.client.NumPyClient`` running ``site``'s local work; ``name`` labels its metrics on the server."""
    fl = flwr()
    templates: dict[str, Any] = {}

    def _incoming(parameters: list[Any], config: dict[str, Any]) -> tuple[Plans, str, dict[str, Any], Any]:
        plans, configuration = Plans.from_json(json.loads(str(config["plans"]))), str(config["configuration"])
        if configuration not in templates:
            templates[configuration] = build_network(plans, configuration).state_dict()
        return plans, configuration, *unpack(list(parameters), templates[configuration])

    class _SiteClient(fl.client.NumPyClient):  # type: ignore[misc,name-defined]
        def get_properties(self, config: dict[str, Any]) -> dict[str, Any]:
            return {"description": json.dumps(site.describe(statistics=bool(config.get("statistics", True))))}

        def fit(self, parameters: list[Any], config: dict[str, Any]) -> tuple[list[Any], int, dict[str, Any]]:
            plans, configuration, state, momentum = _incoming(parameters, config)
            iters = int(config.get("iters_per_epoch", 0)) or None
            new, buffers, n, loss = site.train_round(
                plans, configuration, state, round_=int(config["round"]), epochs=int(config["local_epochs"]),
                iters_per_epoch=iters, proximal_mu=float(config.get("proximal_mu", 0.0)),
                learning_rate=float(config["learning_rate"]) if "learning_rate" in config else None,
                momentum=momentum if config.get("share_momentum", False) else None,
                sgd_momentum=float(config["sgd_momentum"]) if "sgd_momentum" in config else None)
            return pack(new, buffers), n, {"site": name, "train_loss": float("nan") if loss is None else loss}

        def evaluate(self, parameters: list[Any], config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
            plans, configuration, state, _ = _incoming(parameters, config)
            dice, n = site.validate(plans, configuration, state)
            return 1.0 - dice, n, {"site": name, "dice": dice}

    return _SiteClient()


def run_site(site: Site, name: str, server: str, *, root_certificates: bytes | None = None,
             max_wait_time: float | None = None, log: Any = print) -> None:
    """Serve the coordinator until it ends the federation. A lost or refused connection (the coordinator restarting)
    is retried every second; after ``max_wait_time`` seconds without contact (None: never) the site gives up. With
    ``root_certificates`` (PEM of the coordinator's CA) the connection is TLS.

    Raises:
        FederationError: no contact with the coordinator for ``max_wait_time`` seconds.
    """
    import grpc

    fl = flwr()
    client = make_client(site, name)
    contact = [time.monotonic()]
    for method in ("get_properties", "fit", "evaluate"):  # every call is contact
        setattr(client, method, _touching(getattr(client, method), contact))
    lost = False
    while True:
        try:
            fl.client.start_client(server_address=server, client=client.to_client(),
                                   root_certificates=root_certificates, insecure=root_certificates is None)
            return
        except grpc.RpcError as err:
            if max_wait_time is not None and time.monotonic() - contact[0] > max_wait_time:
                raise FederationError(f"{name}: no contact with the coordinator at {server} for {max_wait_time:g} s "
                                      f"({err.__class__.__name__}); check the address and that it runs.") from err
            if not lost:
                log(f"{name}: lost the coordinator at {server}; reconnecting")
            lost = True
            time.sleep(1.0)


def _touching(method: Any, contact: list[float]) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        contact[0] = time.monotonic()
        out = method(*args, **kwargs)
        contact[0] = time.monotonic()
        return out
    return call
