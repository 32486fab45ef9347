"""The contract every network, loss and augmentation part keeps: checks a part's author runs in their own tests.

Like scikit-learn's estimator checks, each function exercises a part on tiny synthetic inputs and raises
``AssertionError`` naming the part and what it got wrong::

    from autoseg.training.contracts import check_augmentation, check_loss, check_network

    def test_tiny_net_keeps_the_contract():
        check_network("tiny_net")                  # a registered name, a PluginInfo or a NetworkPart

    def test_tiny_loss_keeps_the_contract():
        check_loss(TINY_LOSS, params={"w": 2.0})   # a PluginInfo, a name, or the factory itself

A check that cannot run here (the part's optional dependency or ``onnx``/``onnxruntime`` is missing) raises
:class:`unittest.SkipTest`, which pytest and unittest report as a skip. autoseg's own suite (``tests/contracts``)
runs these checks on every entry of :func:`~autoseg.training.parts.part_tables`, so installing a package that
registers a part puts that part under the contract too.

What each check demands is listed in :data:`NETWORK_CHECKS` and in the docstrings of :func:`check_network`,
:func:`check_loss` and :func:`check_augmentation`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autoseg.training.contracts.augmentations import check_augmentation
from autoseg.training.contracts.common import NETWORK_CHECKS, contract_topologies
from autoseg.training.contracts.losses import check_loss
from autoseg.training.contracts.networks import check_network

__all__ = ["NETWORK_CHECKS", "check_augmentation", "check_loss", "check_network", "check_part",
           "contract_topologies"]


# ---- dispatch ---------------------------------------------------------------------------------------------
_CHECKS: dict[str, Callable[..., None]] = {"network": check_network, "loss": check_loss,
                                           "augmentation": check_augmentation}


def check_part(kind: str, name: str, **kwargs: Any) -> None:
    """Run the contract of ``kind`` (``network``, ``loss`` or ``augmentation``) on the registered part ``name``;
    ``kwargs`` go to that check (``params=...``, ...).

    Raises:
        AssertionError: the part breaks the contract.
        ValueError: a kind without a contract (optimisers and schedules have none yet).
    """
    if kind not in _CHECKS:
        raise ValueError(f"kind {kind!r} has no contract check; checked kinds: {', '.join(_CHECKS)}.")
    _CHECKS[kind](name, **kwargs)
