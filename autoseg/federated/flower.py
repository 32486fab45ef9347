"""The one place that imports Flower (an optional extra), with the one-line message when it is missing."""

from __future__ import annotations

import logging
from types import ModuleType

from autoseg.errors import MissingDependencyError

MISSING_FLWR = "federated training needs Flower: pip install 'autoseg[federated]'"


def flwr() -> ModuleType:
    """The ``flwr`` package (its logger quietened to errors: the legacy transport warns that it is deprecated on every start).

    Raises:
        MissingDependencyError: Flower is not installed.
    """
    try:
        import flwr as fl
    except ImportError as err:
        raise MissingDependencyError(MISSING_FLWR) from err
    logging.getLogger("flwr").setLevel(logging.ERROR)
    return fl
