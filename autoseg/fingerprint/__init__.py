"""Dataset fingerprint: per-case and dataset-level statistics the planner needs.

The package is also callable: ``autoseg.fingerprint(dataset, workdir=..., jobs=...)`` is
:func:`autoseg.fingerprint.stage.fingerprint` (check the dataset, compute its fingerprint, save ``fingerprint.json``).
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    """Lets ``autoseg.fingerprint(...)`` run the stage while ``autoseg.fingerprint.model`` stays importable."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from autoseg.fingerprint.stage import fingerprint

        return fingerprint(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
