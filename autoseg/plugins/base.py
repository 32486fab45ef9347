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
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from autoseg.errors import PluginError

CHANNEL = "channel"
LABELS = "labels"
KINDS = (CHANNEL, LABELS)
#: parameter types: scalars, and lists written comma-separated on the command line (``widths_mm=5,10``)
PARAM_TYPES = ("int", "float", "bool", "ints", "floats")


@dataclass(frozen=True)
class Param:
    """One documented plugin parameter.

    Attributes:
        name: the keyword (``widths_mm``).
        type: ``int``, ``float``, ``bool``, ``ints`` or ``floats`` (lists).
        default: the value used when the parameter is not given (JSON-native: lists, not tuples).
        help: what it means.
        low: smallest allowed number (inclusive), or None.
        high: largest allowed number (inclusive), or None.
        optional: ``None`` (written ``all`` or ``none`` on the command line) is allowed.
    """

    name: str
    type: str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    optional: bool = False

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise PluginError(f"parameter {self.name!r}: type {self.type!r} is not one of {', '.join(PARAM_TYPES)}.")

    def allowed(self) -> str:
        """What values are accepted, in words (``an integer >= 2``)."""
        base = {"int": "an integer", "float": "a number", "bool": "true or false",
                "ints": "comma-separated integers", "floats": "comma-separated numbers"}[self.type]
        bounds = [f"{op} {v:g}" for op, v in ((">=", self.low), ("<=", self.high)) if v is not None]
        text = base + (" " + " and ".join(bounds) if bounds else "")
        return text + (", or 'all'/'none' for the default behaviour" if self.optional else "")

    def convert(self, value: Any) -> Any:
        """Check ``value`` (a Python value, or the text after ``KEY=`` on the command line) and return its stored form.

        Raises:
            ValueError: the value is not allowed (the message says what is).
        """
        if value is None or (isinstance(value, str) and value.strip().lower() in ("all", "none")):
            if self.optional:
                return None
            raise ValueError(f"expected {self.allowed()}")
        if self.type == "bool":
            return _boolean(value)
        if self.type in ("int", "float"):
            return self._number(value)
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if isinstance(items, (int, float)) and not isinstance(items, bool):
            items = [items]
        if not isinstance(items, Sequence) or isinstance(items, (str, bytes)) or not items:
            raise ValueError(f"expected {self.allowed()}")
        return [self._number(v, self.type[:-1]) for v in items]

    def _number(self, value: Any, kind: str | None = None) -> int | float:
        kind = kind or self.type
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value.strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected {self.allowed()}") from None
        if not math.isfinite(number) or (kind == "int" and number != int(number)):
            raise ValueError(f"expected {self.allowed()}")
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            raise ValueError(f"expected {self.allowed()}")
        return int(number) if kind == "int" else number


def _boolean(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


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


@dataclass(frozen=True)
class PluginInfo:
    """A plugin as the registry lists it.

    Attributes:
        name: the name used in plans and on the command line (lowercase, ``_`` allowed).
        kind: ``channel`` or ``labels``.
        doc: what it does (the first line is its summary).
        params: its parameters, with defaults.
        build: ``build(**params) -> ChannelPlugin | LabelsPlugin`` (params checked and complete).
        output: labels plugins: the prediction subfolder their maps go to.
        origin: ``built-in``, or the entry point that declared it.
    """

    name: str
    kind: str
    doc: str
    params: tuple[Param, ...]
    build: Callable[..., ChannelPlugin | LabelsPlugin]
    output: str = ""
    origin: str = "built-in"

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum() or self.name != self.name.lower():
            raise PluginError(f"plugin name {self.name!r} must be lowercase letters, digits and '_'.")
        if self.kind not in KINDS:
            raise PluginError(f"plugin {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}.")
        if self.kind == LABELS and not self.output:
            raise PluginError(f"plugin {self.name!r}: a labels plugin needs an output folder name.")

    @property
    def summary(self) -> str:
        """The first line of :attr:`doc`."""
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""

    def validate(self, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every parameter checked and converted, defaults filled in, in declaration order.

        Raises:
            PluginError: an unknown parameter or a bad value (the message lists what is allowed).
        """
        given = dict(params or {})
        known = {p.name: p for p in self.params}
        unknown = [k for k in given if k not in known]
        if unknown:
            listed = ", ".join(f"{p.name} ({p.allowed()})" for p in self.params) or "none"
            raise PluginError(f"plugin {self.name!r} has no parameter {', '.join(map(repr, unknown))}; "
                              f"its parameters: {listed}.")
        out = {}
        for p in self.params:
            try:
                out[p.name] = p.convert(given[p.name]) if p.name in given else p.default
            except ValueError as err:
                raise PluginError(f"plugin {self.name!r}: {p.name}={given[p.name]!r} is not allowed: {err} "
                                  f"(default {p.default!r}).") from err
        return out

    def create(self, params: Mapping[str, Any] | None = None) -> ChannelPlugin | LabelsPlugin:
        """The plugin object for ``params`` (checked first)."""
        plugin = self.build(**self.validate(params))
        expected = ChannelPlugin if self.kind == CHANNEL else LabelsPlugin
        if not isinstance(plugin, expected):
            raise PluginError(f"plugin {self.name!r} ({self.origin}) built a {type(plugin).__name__}, not a "
                              f"{expected.__name__}; fix or uninstall the package that provides it.")
        return plugin

    def describe(self) -> list[str]:
        """Lines for ``autoseg plugins``: name, kind, summary and each parameter with its default."""
        lines = [f"{self.name} ({self.kind}{'' if self.origin == 'built-in' else ', ' + self.origin}): {self.summary}"]
        lines += [f"    {p.name}={format_value(p.default)}  {p.help} ({p.allowed()})" for p in self.params]
        return lines


def format_value(value: Any) -> str:
    """A parameter value as it is written on the command line (``5,10``, ``true``, ``all``)."""
    if value is None:
        return "all"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)
