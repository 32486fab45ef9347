"""A whole federation on one machine: the coordinator and one site per dataset as threads talking Flower's gRPC over
127.0.0.1 (a free port), for trying federated training out and for tests. The sites work one at a time, so a
simulation repeats exactly (see :class:`_OneAtATime`)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoseg.errors import FederationError
from autoseg.federated.client import run_site
from autoseg.federated.server import FederationResult, FederationSettings, run_server
from autoseg.federated.site import Site
from autoseg.io.dataset import load_dataset
from autoseg.training.settings import TrainSettings


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class _OneAtATime(Site):
    """A simulated site whose work holds a lock shared by all of them: sites in one process share numpy's and torch's
    global random generators, which the data pipeline seeds per batch, so two sites training at once would draw each
    other's numbers and a simulation would not repeat."""

    lock: Any = None

    def describe(self, *, statistics: bool = True) -> dict[str, Any]:
        with self.lock:
            return super().describe(statistics=statistics)

    def train_round(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return super().train_round(*args, **kwargs)

    def validate(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return super().validate(*args, **kwargs)


class _Thread(threading.Thread):
    """A daemon thread that keeps the exception its target raised."""

    def __init__(self, target: Callable[[], Any], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._work, self.error, self.result = target, None, None

    def run(self) -> None:
        try:
            self.result = self._work()
        except BaseException as err:  # noqa: BLE001 - handed to the caller after join
            self.error = err


def simulate(datasets: Sequence[str | Path], workdir: str | Path, settings: FederationSettings | None = None, *,
             train: TrainSettings = TrainSettings(progress=False), fold: int | str = 0, timeout: float = 3600.0,
             log: Callable[[str], None] = print) -> FederationResult:
    """Run a coordinator in ``workdir`` and a site per dataset in ``workdir/sites/site<k>`` until the rounds end.

    Raises:
        FederationError: a site or the coordinator failed (its message is kept), or the run exceeded ``timeout``.
    """
    workdir = Path(workdir)
    settings = settings or FederationSettings(min_sites=len(datasets))
    address = f"127.0.0.1:{free_port()}"
    server = _Thread(lambda: run_server(workdir, settings, address=address, log=log), "federated-server")
    server.start()
    sites, lock = [], threading.Lock()
    for k, root in enumerate(datasets):
        site = _OneAtATime(load_dataset(root), workdir / "sites" / f"site{k}", fold=fold, settings=train, lock=lock)
        sites.append(_Thread(lambda s=site, n=f"site{k}": run_site(s, n, address, max_wait_time=60.0), f"site{k}"))
        sites[-1].start()
    server.join(timeout)
    for t in sites:
        t.join(30.0)
    if server.is_alive():
        raise FederationError(f"the simulated federation did not finish within {timeout:g} s.")
    if server.error is not None:
        raise FederationError(f"the coordinator failed: {server.error}") from server.error
    assert isinstance(server.result, FederationResult)
    return server.result
