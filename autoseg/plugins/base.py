"""What a plugin is: a name, a kind, documented parameters, and the object it builds.

Two kinds exist:

* ``channel``: extra network input channels computed from a case's preprocessed images (after
  normalisation and resampling, missing channels already blanked). The plugin may learn a state from the
  training cases (:meth:`ChannelPlugin.fit`, arrays only, saved as ``.npz``) and computes the channels of any
  case from it (:meth:`ChannelPlugin.compute`).
* ``labels``: a label map derived from a segmentation (and optionally the image), written next to each
  prediction (``OUTPUT/<output>/<case><ending>``) or applied to any label file.

Third-party packages declare a :class:`PluginInfo` under the ``autoseg.plugins`` entry-point group
(see :func:`autoseg.plugins.available_plugins`).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from autoseg.errors import PluginError
from autoseg.registry import Param, PluginInfo, format_value  # noqa: F401  (the plugin API)

CHANNEL = "channel"
LABELS = "labels"


class ChannelPlugin(abc.ABC):
    """Extra input channels computed from a case's preprocessed images.

    Data are ``(C, *spatial)`` float32 in the planning axes, always three spatial axes; a ``2d`` configuration
    (``ndim == 2``) works on the slices along the first spatial axis. Both methods must be deterministic.
    """

    #: channels :meth:`compute` returns
    n_channels: int = 1

    @abc.abstractmethod
    def fit(self, cases: Sequence[np.ndarray], ndim: int) -> dict[str, np.ndarray]:
        """Learn the state from the training cases' preprocessed images (memory-mapped; read what you need).

        Returns:
            Named numeric or string arrays (saved as ``.npz`` and loaded without pickle).
        """

    @abc.abstractmethod
    def compute(self, state: Mapping[str, np.ndarray], data: np.ndarray, ndim: int) -> np.ndarray:
        """The extra channels of one case: float32 ``(n_channels, *spatial)``, spatial shape of ``data``."""

    def training_channels(self, state: Mapping[str, np.ndarray], cases: Sequence[np.ndarray], ndim: int
                          ) -> Iterator[tuple[int, np.ndarray]]:
        """The channels of the training cases the state was fitted on, as ``(index in cases, channels)``.

        By default :meth:`compute` with ``state``. A plugin whose state fits its own training cases too well (a
        basis reconstructs them exactly) overrides this to cross-fit, so that training sees what a new case gives.
        """
        for i, case in enumerate(cases):
            yield i, self.compute(state, case, ndim)

    def decisions(self, n_training: int) -> list[str]:
        """Lines for the plans' decisions (e.g. a parameter capped by the number of training cases)."""
        return []


class LabelsPlugin(abc.ABC):
    """A label map derived from a segmentation (``0`` = nothing, ``1..n`` the derived classes)."""

    #: :meth:`derive` needs the image's nonzero region (``body``)
    needs_body: bool = False

    @abc.abstractmethod
    def derive(self, seg: np.ndarray, spacing: Sequence[float], body: np.ndarray | None = None) -> np.ndarray:
        """The derived label map of ``seg`` (same shape); ``spacing`` in numpy axis order (mm)."""


def create_plugin(info: PluginInfo, params: Mapping[str, Any] | None = None) -> ChannelPlugin | LabelsPlugin:
    """The channel or labels plugin ``info`` builds for ``params`` (checked first).

    Raises:
        PluginError: a bad parameter, or the package's plugin built the wrong kind of object.
    """
    plugin = info.create(params)
    expected = ChannelPlugin if info.kind == CHANNEL else LabelsPlugin
    if info.kind not in (CHANNEL, LABELS) or not isinstance(plugin, expected):
        raise PluginError(f"plugin {info.name!r} ({info.origin}) built a {type(plugin).__name__}, not a "
                          f"{expected.__name__}; fix or uninstall the package that provides it.")
    return plugin
