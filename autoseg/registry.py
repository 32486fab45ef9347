"""The part registry: named, documented, parameterised parts, built in or declared by other packages.

Every pluggable thing of autoseg is a :class:`PluginInfo`: its name, its kind, its documented parameters
(:class:`Param`) and a ``build(**params)`` that makes it. The kinds:

* ``channel`` and ``labels``: extra input channels and derived label maps (:mod:`autoseg.plugins`);
* ``network``: a segmentation network with its own cost model (:mod:`autoseg.networks.parts`);
* ``loss``, ``optimizer``, ``schedule``, ``augmentation``: the training recipe's parts (:mod:`autoseg.training.parts`).

Each stage keeps the table of its own kinds (built-ins plus :func:`entry_point_parts`), so the table of a low stage
never imports a higher one. A package adds parts by declaring, in its ``pyproject.toml``::

    [project.entry-points."autoseg.plugins"]
    tiny_net = "my_package.parts:TINY_NET"     # a PluginInfo (or a function returning one)

Tables are built anew by each call (nothing is cached in the module), and a name is only ever looked up in
them: no user string is imported or resolved as an attribute.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import numbers
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import numpy as np

from autoseg.errors import PluginError

#: entry-point group other packages declare parts under
GROUP = "autoseg.plugins"
KINDS = ("channel", "labels", "network", "loss", "optimizer", "schedule", "augmentation")
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


@dataclass(frozen=True)
class PluginInfo:
    """A plugin as the registry lists it.

    Attributes:
        name: the name used in plans and on the command line (lowercase, ``_`` allowed).
        kind: one of :data:`KINDS`.
        doc: what it does (the first line is its summary).
        params: its parameters, with defaults.
        build: ``build(**params)`` makes the part (params checked and complete).
        output: labels plugins: the prediction subfolder their maps go to.
        origin: ``built-in``, or the entry point that declared it.
    """

    name: str
    kind: str
    doc: str
    params: tuple[Param, ...]
    build: Callable[..., Any]
    output: str = ""
    origin: str = "built-in"

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum() or self.name != self.name.lower():
            raise PluginError(f"plugin name {self.name!r} must be lowercase letters, digits and '_'.")
        if self.kind not in KINDS:
            raise PluginError(f"plugin {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}.")
        if self.kind == "labels" and not self.output:
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

    def create(self, params: Mapping[str, Any] | None = None) -> Any:
        """The object ``build`` makes for ``params`` (checked and completed first)."""
        return self.build(**self.validate(params))

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


def _from_entry_point(ep: EntryPoint) -> PluginInfo:
    """The :class:`PluginInfo` an entry point declares (the object itself, or what calling it returns)."""
    fix = "fix or uninstall the package that declares it"
    try:
        obj: Any = ep.load()
        info = obj if isinstance(obj, PluginInfo) else obj() if callable(obj) else obj
    except Exception as err:  # noqa: BLE001 - any failure of foreign code is reported with the entry point
        raise PluginError(f"the {GROUP} entry point {ep.name!r} = {ep.value!r} failed to load "
                          f"({type(err).__name__}: {err}); {fix}.") from err
    if not isinstance(info, PluginInfo):
        raise PluginError(f"the {GROUP} entry point {ep.name!r} = {ep.value!r} gives a {type(info).__name__}, not an "
                          f"autoseg.plugins.PluginInfo; {fix}.")
    if info.name != ep.name:
        raise PluginError(f"the {GROUP} entry point {ep.name!r} = {ep.value!r} declares a plugin named "
                          f"{info.name!r}; the entry point and the plugin must have the same name ({fix}).")
    dist = getattr(ep, "dist", None)
    package = f" of package {dist.name}" if dist is not None and getattr(dist, "name", None) else ""
    return dataclasses.replace(info, origin=f"entry point {ep.value}{package}")


def entry_point_parts(kinds: Iterable[str]) -> list[PluginInfo]:
    """The parts of the given kinds that installed packages declare (sorted by name).

    Raises:
        PluginError: an entry point fails to load, is not a :class:`PluginInfo`, or names another part.
    """
    wanted = set(kinds)
    found = [_from_entry_point(ep) for ep in sorted(entry_points(group=GROUP), key=lambda e: (e.name, e.value))]
    return [info for info in found if info.kind in wanted]


def part_table(builtins: Iterable[PluginInfo], kinds: Iterable[str]) -> dict[str, PluginInfo]:
    """Built-in parts first, then those of installed packages; a reused name is an error.

    Raises:
        PluginError: a broken entry point, or a name used twice.
    """
    table = {p.name: p for p in builtins}
    for info in entry_point_parts(kinds):
        if info.name in table:
            raise PluginError(f"the {GROUP} entry point {info.name!r} ({info.origin}) reuses the name of the part "
                              f"from {table[info.name].origin}; rename it or uninstall one of the packages.")
        table[info.name] = info
    return table


_TYPES = {bool: "bool", int: "int", float: "float"}


def params_from_signature(factory: Callable[..., Any], skip: Sequence[str] = ()) -> tuple[Param, ...]:
    """The documented parameters of a factory: its keyword-only arguments with a default, typed ``int``,
    ``float`` or ``bool`` (``X | None`` makes them optional), except ``skip``. Help texts come from the
    docstring's ``Args:`` lines when present."""
    hints = typing.get_type_hints(factory)
    docs = _arg_docs(factory.__doc__ or "")
    out = []
    for name, p in inspect.signature(factory).parameters.items():
        if p.kind is not p.KEYWORD_ONLY or name in skip or p.default is p.empty:
            continue
        hint, optional = hints.get(name, type(p.default)), False
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            hint, optional = (args[0] if len(args) == 1 else hint), type(None) in typing.get_args(hint)
        if hint not in _TYPES:
            continue
        out.append(Param(name, _TYPES[hint], p.default, docs.get(name, name.replace("_", " ")), optional=optional))
    return tuple(out)


def _arg_docs(doc: str) -> dict[str, str]:
    """``name: text`` lines of a Google-style ``Args:`` section."""
    out, inside = {}, False
    for line in doc.splitlines():
        text = line.strip()
        if text in ("Args:", "Arguments:", "Parameters:"):
            inside = True
        elif inside and text.endswith(":") and " " not in text:
            inside = False
        elif inside and ":" in text and text.split(":", 1)[0].isidentifier():
            name, rest = text.split(":", 1)
            out[name] = rest.strip()
    return out


def lookup(name: str, table: Mapping[str, PluginInfo], what: str = "plugin") -> PluginInfo:
    """The part called ``name`` in ``table``.

    Raises:
        PluginError: no such part (the message lists the available ones and suggests the closest).
    """
    if name in table:
        return table[name]
    close = difflib.get_close_matches(str(name), list(table), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise PluginError(f"there is no {what} {name!r}{hint}; available: {', '.join(table) or 'none'} "
                      "(`autoseg plugins` describes them).")


def check_number(kind: str, part: str, param: str, value: object, ok: Callable[[float], bool], valid: str) -> float:
    """``value`` as a float when it is a finite real number passing ``ok``; else a TrainingConfigError naming the
    part (``loss 'dice_topk'``), the parameter, the value and the valid range ``valid``."""
    from autoseg.errors import TrainingConfigError

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TrainingConfigError(f"{kind} {part!r}: {param}={value!r} is not a number; valid: {valid}.")
    number = float(value)
    if not (math.isfinite(number) and ok(number)):
        raise TrainingConfigError(f"{kind} {part!r}: {param}={value!r} is out of range; valid: {valid}.")
    return number
