"""The coordinator of a federation, on Flower's gRPC transport (``flwr.server.Server`` driving the round loop).

1. Planning (once): it waits for ``min_sites`` sites, asks each for its dataset description and aggregate statistics
   (Flower's ``get_properties``), merges them (:func:`autoseg.fingerprint.merge.merge_site_statistics`), plans with
   the rules of ``autoseg plan`` and saves ``fingerprint.json``, ``plans.json`` and ``dataset.json``.
2. Rounds: FedAvg weighted by training-case counts (:class:`~autoseg.federated.strategy.CheckpointingFedAvg`); the
   plans travel in every round's configuration, so a site that joins or rejoins late gets the plans and the
   current weights. After each round the global model is saved atomically as an ordinary model folder; a server
   restarted on the same work folder continues after the last saved round.
3. Evaluation: every ``eval_every`` rounds (and after the last) each site reports the global model's Dice on its
   held-out cases; the server logs them and the pooled Dice to ``federation.json``.

Transport: Flower's legacy gRPC (bidirectional) server and ``start_client``, deprecated since Flower 1.13 in favour
of SuperLink/SuperNode deployments but still shipped; they run as plain processes or threads with no app packaging,
which keeps a federation one command per machine. TLS uses Flower's own certificate options.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoseg.errors import FederationError
from autoseg.federated.flower import flwr
from autoseg.federated.model import build_network, load_global, zero_momentum
from autoseg.federated.planning import default_configuration, plan_federation
from autoseg.fingerprint.merge import SiteStatistics
from autoseg.io.atomic import read_json, write_json_atomic
from autoseg.planner.plans import Plans

STRATEGIES = ("fedavg", "fedprox")


@dataclass(frozen=True)
class FederationSettings:
    """What the coordinator decides for every site.

    Attributes:
        rounds: federated rounds in all (a resumed server runs the ones left).
        min_sites: sites needed to plan and to start a round; a round whose survivors are fewer keeps the weights.
        local_epochs: epochs each site trains per round.
        iters_per_epoch: iterations per local epoch (None: the plan's).
        eval_every: rounds between federated validations (the last round is always validated).
        strategy: ``fedavg``, or ``fedprox`` (adds the proximal term ``mu/2 |w - w_global|^2`` at the sites).
        proximal_mu: FedProx's ``mu``.
        initial_lr: the sites' learning rate in the first round, decayed as poly over the rounds (constant within a
            round).
        share_momentum: the sites' SGD momentum buffers travel with the weights and are averaged like them (each
            round starts from the global weights and the global momentum); False: each site keeps its own.
        server_lr: the global weights move this many times the server's velocity (1 with no server momentum:
            plain FedAvg, the default; more only helps rounds of a few local steps, see the README).
        server_momentum: FedAvgM's server momentum: the velocity is the sites' case-weighted average update plus
            this times the last velocity (0: none).
        local_momentum: the sites' SGD (Nesterov) momentum. The defaults, momentum 0.9 at learning rate 0.1, keep
            nnU-Net's effective step (rate / (1 - momentum) = 1) with a buffer that forgets a site's own past
            direction within ~10 steps instead of ~100; the best measured (README, federated).
        configuration: configuration to train (None: ``3d_fullres``, else ``2d``).
        preset, gpu_memory_gb, seed: as for ``autoseg plan``.
        round_timeout: seconds a round waits for its sites (None: no limit).
        wait_timeout: seconds to wait for ``min_sites`` sites to connect before planning.
    """

    rounds: int = 5
    min_sites: int = 2
    local_epochs: int = 1
    iters_per_epoch: int | None = None
    eval_every: int = 1
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    initial_lr: float = 0.1
    share_momentum: bool = False
    server_lr: float = 1.0
    server_momentum: float = 0.0
    local_momentum: float = 0.9
    configuration: str | None = None
    preset: str = "default"
    gpu_memory_gb: float = 8.0
    seed: int = 12345
    round_timeout: float | None = None
    wait_timeout: float = 3600.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise FederationError(f"strategy {self.strategy!r} is not known; use one of {', '.join(STRATEGIES)}.")
        if not self.server_lr > 0:
            raise FederationError(f"server_lr={self.server_lr} is not valid; it must be > 0 (1: plain FedAvg).")
        if not self.initial_lr > 0:
            raise FederationError(f"initial_lr={self.initial_lr} is not valid; it must be > 0.")
        for name in ("server_momentum", "local_momentum"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise FederationError(f"{name}={value} is not valid; it must be in [0, 1).")
        for name in ("rounds", "min_sites", "local_epochs", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise FederationError(f"{name}={getattr(self, name)} is not valid; it must be at least 1.")


@dataclass
class FederationResult:
    """What a server run did: the work folder, the rounds saved in all and the log of rounds."""

    workdir: Path
    rounds_done: int
    history: list[dict[str, Any]] = field(default_factory=list)


def _describe(client_manager: Any, settings: FederationSettings, *, statistics: bool) -> list[dict[str, Any]]:
    """Each connected site's dataset description (and aggregate statistics), once ``min_sites`` are connected."""
    fl = flwr()
    if not client_manager.wait_for(settings.min_sites, timeout=settings.wait_timeout):
        raise FederationError(f"only {client_manager.num_available()} of {settings.min_sites} site(s) connected within "
                              f"{settings.wait_timeout:g} s; start `autoseg federated site` at each site, or lower "
                              "--min-sites.")
    described = []
    for proxy in list(client_manager.all().values()):
        ins = fl.common.GetPropertiesIns(config={"statistics": statistics})
        res = proxy.get_properties(ins, timeout=settings.wait_timeout, group_id=None)
        if res.status.code != fl.common.Code.OK or "description" not in res.properties:
            raise FederationError(f"a site could not describe its dataset ({res.status.message}); see its log.")
        described.append(json.loads(str(res.properties["description"])))
    return described


def _plan(client_manager: Any, workdir: Path, settings: FederationSettings, log: Any) -> Plans:
    """The saved plans, or plans made from the statistics of the first ``min_sites`` sites; and ``dataset.json``
    (channels, labels, file ending: what prediction needs) from the sites' descriptions."""
    planned = (workdir / "plans.json").is_file()
    if planned and (workdir / "dataset.json").is_file():
        return Plans.load(workdir / "plans.json")
    described = _describe(client_manager, settings, statistics=not planned)
    workdir.mkdir(parents=True, exist_ok=True)
    if planned:
        plans = Plans.load(workdir / "plans.json")
        write_json_atomic(workdir / "dataset.json", {**described[0]["dataset"], "numTraining": 0})
        return plans
    parts = [SiteStatistics.from_json(d["statistics"]) for d in described]
    fp, plans = plan_federation(parts, dataset_name=workdir.name, preset=settings.preset,
                                gpu_memory_gb=settings.gpu_memory_gb, seed=settings.seed)
    fp.save(workdir / "fingerprint.json")
    write_json_atomic(workdir / "dataset.json", {**described[0]["dataset"], "numTraining": fp.num_training})
    plans.save(workdir / "plans.json")
    log(f"planned from {len(parts)} site(s), {fp.num_training} case(s): {', '.join(plans.configurations)}")
    return plans


def run_server(workdir: str | Path, settings: FederationSettings = FederationSettings(), *,
               address: str = "0.0.0.0:8080", certificates: tuple[bytes, bytes, bytes] | None = None,
               log: Any = print) -> FederationResult:
    """Serve a federation until ``settings.rounds`` rounds are saved in ``workdir`` (resuming a killed run).

    Args:
        workdir: the coordinator's work folder; afterwards an ordinary model folder (``predict`` uses it).
        settings: rounds, sites, strategy, ...
        address: ``HOST:PORT`` to listen on.
        certificates: (CA certificate, server certificate, server private key), PEM bytes: TLS.
        log: called with one line per event.

    Raises:
        FederationError: too few sites connected, sites that disagree on channels or labels.
        MissingDependencyError: Flower is not installed.
    """
    from flwr.server.superlink.fleet.grpc_bidi.grpc_server import start_grpc_server
    from flwr.supercore.grpc import GRPC_MAX_MESSAGE_LENGTH

    from autoseg.federated.strategy import HISTORY, CheckpointingFedAvg

    fl, workdir = flwr(), Path(workdir)
    manager = fl.server.SimpleClientManager()
    grpc_server = start_grpc_server(client_manager=manager, server_address=address,
                                    max_message_length=GRPC_MAX_MESSAGE_LENGTH, certificates=certificates)
    try:
        plans = _plan(manager, workdir, settings, log)
        configuration = settings.configuration or default_configuration(plans)
        saved = load_global(workdir, configuration)
        state, done, momentum, velocity = saved if saved is not None else (
            build_network(plans, configuration).state_dict(), 0, None, None)
        if settings.share_momentum and momentum is None:
            momentum = zero_momentum(state, plans, configuration)
        momentum = momentum if settings.share_momentum else None
        history = read_json(workdir / HISTORY, FederationError, "delete it to start a new log")["history"] if (workdir / HISTORY).is_file() else []
        if done:
            log(f"resuming after round {done} of {settings.rounds}")
        if done < settings.rounds:
            strategy = CheckpointingFedAvg(
                workdir=workdir, plans=plans, configuration=configuration, state=state, momentum=momentum, done=done,
                total=settings.rounds, min_sites=settings.min_sites, local_epochs=settings.local_epochs,
                iters_per_epoch=settings.iters_per_epoch, eval_every=settings.eval_every,
                proximal_mu=settings.proximal_mu if settings.strategy == "fedprox" else 0.0,
                initial_lr=settings.initial_lr, server_lr=settings.server_lr, history=history, log=log,
                server_momentum=settings.server_momentum, velocity=velocity if settings.server_momentum else None,
                local_momentum=settings.local_momentum)
            server = fl.server.Server(client_manager=manager, strategy=strategy)
            server.fit(settings.rounds - done, timeout=settings.round_timeout)
            server.disconnect_all_clients(timeout=30)
        else:
            fl.server.Server(client_manager=manager, strategy=None).disconnect_all_clients(timeout=30)
    finally:
        grpc_server.stop(grace=1)
    final = load_global(workdir, configuration)
    return FederationResult(workdir, final[1] if final else 0, history)
