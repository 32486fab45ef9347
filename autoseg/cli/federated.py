"""``autoseg federated server|site|simulate``: parse, call :mod:`autoseg.federated`, print."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    f = sub.add_parser("federated", help="train across sites with Flower: only statistics and weights travel")
    fsub = f.add_subparsers(dest="federated_command", metavar="ROLE", required=True)
    s = fsub.add_parser("server", help="the coordinator: plans from the sites' statistics, averages their weights")
    s.add_argument("--workdir", type=Path, required=True, help="coordinator work folder (the global model lands here)")
    s.add_argument("--address", default="0.0.0.0:8080", help="HOST:PORT to listen on (default 0.0.0.0:8080)")
    s.add_argument("--certificates", type=Path, nargs=3, metavar=("CA", "CERT", "KEY"),
                   help="PEM files of the CA certificate, the server certificate and its key: TLS")
    _add_federation(s)
    c = fsub.add_parser("site", help="one hospital: trains locally, sends weights and Dice, never images")
    c.add_argument("dataset", type=Path, help="the site's dataset folder (nnU-Net v2 raw layout)")
    c.add_argument("--server", required=True, help="coordinator HOST:PORT")
    c.add_argument("--workdir", type=Path, required=True, help="the site's work folder")
    c.add_argument("--name", required=True, help="the site's name in the coordinator's log")
    c.add_argument("--root-certificates", type=Path, metavar="CA", help="PEM of the coordinator's CA: TLS")
    _add_site(c)
    m = fsub.add_parser("simulate", help="a coordinator and one site per dataset on this machine (127.0.0.1)")
    m.add_argument("datasets", type=Path, nargs="+", metavar="SITE_DATASET", help="one dataset folder per site")
    m.add_argument("--workdir", type=Path, required=True, help="coordinator work folder (sites under sites/)")
    _add_federation(m)
    _add_site(m)


def _add_federation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=5, help="federated rounds (default 5)")
    p.add_argument("--min-sites", type=int, default=None, help="sites needed to plan and to keep a round "
                   "(default 2; simulate: every site)")
    p.add_argument("--strategy", choices=("fedavg", "fedprox"), default="fedavg", help="aggregation (default fedavg)")
    p.add_argument("--proximal-mu", type=float, default=0.01, help="FedProx's mu (default 0.01)")
    p.add_argument("--server-lr", type=float, default=1.0, help="the global weights move this many times the sites' "
                   "average update (default 1: plain FedAvg)")
    p.add_argument("--server-momentum", type=float, default=0.0, help="FedAvgM's server momentum (default 0)")
    p.add_argument("--local-momentum", type=float, default=0.9, help="the sites' SGD momentum (default 0.9)")
    p.add_argument("--initial-lr", type=float, default=0.1,
                   help="the sites' learning rate in round 1, poly decay over the rounds (default 0.1)")
    p.add_argument("--share-momentum", action="store_true",
                   help="average the sites' SGD momentum buffers with the weights (default: each site keeps its own)")
    p.add_argument("--local-epochs", type=int, default=1, help="epochs each site trains per round (default 1)")
    p.add_argument("--iters-per-epoch", type=int, default=None, help="iterations per local epoch (default: the plan's)")
    p.add_argument("--eval-every", type=int, default=1, help="rounds between federated validations (default 1)")
    p.add_argument("--configuration", default=None, help="configuration to train (default 3d_fullres, else 2d)")
    p.add_argument("--preset", default="default", help="planner preset, as for `autoseg plan` (default, cpu)")
    p.add_argument("--round-timeout", type=float, default=None, metavar="S", help="seconds a round waits for sites")


def _add_site(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fold", default="0", help="the fold whose held-out cases validate the global model, or 'all'")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")
    p.add_argument("--workers", type=int, default=None, help="data-loading worker processes")


def _settings(args: argparse.Namespace, default_min_sites: int) -> object:
    from autoseg.federated.server import FederationSettings

    return FederationSettings(rounds=args.rounds, min_sites=args.min_sites or default_min_sites,
                              strategy=args.strategy, proximal_mu=args.proximal_mu, local_epochs=args.local_epochs,
                              iters_per_epoch=args.iters_per_epoch, eval_every=args.eval_every,
                              configuration=args.configuration, preset=args.preset, round_timeout=args.round_timeout,
                              share_momentum=args.share_momentum, server_lr=args.server_lr,
                              server_momentum=args.server_momentum, local_momentum=args.local_momentum,
                              initial_lr=args.initial_lr)


def _train_settings(args: argparse.Namespace) -> object:
    from autoseg.training.settings import TrainSettings

    return TrainSettings(device=args.device, workers=args.workers, progress=not args.quiet)


def _fold(text: str) -> int | str:
    return "all" if text.strip().lower() == "all" else int(text)


def _cmd_federated(args: argparse.Namespace) -> int:
    from autoseg.federated.client import run_site
    from autoseg.federated.server import run_server
    from autoseg.federated.simulate import simulate
    from autoseg.federated.site import Site
    from autoseg.io.dataset import load_dataset

    role = args.federated_command
    if role == "server":
        certs = tuple(p.read_bytes() for p in args.certificates) if args.certificates else None
        result = run_server(args.workdir, _settings(args, 2), address=args.address, certificates=certs)
    elif role == "site":
        site = Site(load_dataset(args.dataset), args.workdir, fold=_fold(args.fold), settings=_train_settings(args))
        certs = args.root_certificates.read_bytes() if args.root_certificates else None
        run_site(site, args.name, args.server, root_certificates=certs)
        print(f"{args.name}: the coordinator ended the federation")
        return 0
    else:
        result = simulate(args.datasets, args.workdir, _settings(args, len(args.datasets)),
                          train=_train_settings(args), fold=_fold(args.fold))
    print(f"global model after {result.rounds_done} round(s) in {result.workdir} (log: federation.json); "
          f"next: autoseg predict with --workdir {result.workdir}")
    return 0


COMMANDS = {"federated": _cmd_federated}
