"""The training recipe of a configuration: which network, loss, optimiser, schedule and augmentation, with their
parameters, and the mirrored axes. Chosen when planning (``autoseg plan --recipe ...``), recorded in plans.json,
in every checkpoint and in every bundle's manifest, and overridable when training (``autoseg train --recipe ...``).

One syntax for both: ``KIND=NAME[:KEY=VALUE[:KEY=VALUE...]]`` and ``mirror_axes=0,1`` (or ``all``/``none``)::

    >>> overrides = parse_recipe(["network=attention_unet", "loss=dice_focal:gamma=2", "mirror_axes=1,2"])
    >>> recipe = default_recipe(block="plain", regions=False).with_overrides(overrides)
    >>> recipe.describe()
    'network=attention_unet loss=dice_focal:gamma=2 optimizer=sgd schedule=poly augmentation=nnunet mirror_axes=1,2'

The names and parameters are checked against the part tables (:mod:`autoseg.networks.parts`,
:mod:`autoseg.training.parts`); this module only holds the record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from autoseg.errors import FileFormatError, PlanningError

PART_KINDS = ("network", "loss", "optimizer", "schedule", "augmentation")
MIRROR = "mirror_axes"
#: 2: augmentation ``nnunet`` runs on the training device; version-1 records mean the CPU workers (``nnunet_cpu``)
VERSION = 2
#: the network each encoder block type of a planner preset means by default
DEFAULT_NETWORK = {"plain": "unet", "residual": "resenc_unet"}


@dataclass(frozen=True)
class PartChoice:
    """One part of a recipe: its name, its parameters (complete once checked) and where it comes from.

    Attributes:
        name: the part's name in its table.
        params: parameter values (from the command line: text until checked).
        origin: ``built-in``, or the entry point that provides it (so a missing part names its package).
    """

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    origin: str = "built-in"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params), "origin": self.origin}

    @classmethod
    def from_json(cls, data: Any) -> PartChoice:
        if isinstance(data, str):
            return cls(data)
        if not isinstance(data, Mapping) or not isinstance(data.get("name"), str):
            raise FileFormatError(f"a recipe part must be a name or {{'name', 'params'}}, found {data!r}.")
        return cls(data["name"], dict(data.get("params") or {}), str(data.get("origin", "built-in")))

    def text(self) -> str:
        """``NAME[:KEY=VALUE...]`` as on the command line."""
        return ":".join([self.name, *(f"{k}={_text(v)}" for k, v in self.params.items())])


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Recipe:
    """The parts of a training run.

    Attributes:
        network, loss, optimizer, schedule, augmentation: the chosen parts.
        mirror_axes: spatial axes mirrored in training and at test time; None = every axis (nnU-Net's default).
        version: the record's version.
    """

    network: PartChoice
    loss: PartChoice
    optimizer: PartChoice = PartChoice("sgd")
    schedule: PartChoice = PartChoice("poly")
    augmentation: PartChoice = PartChoice("nnunet")
    mirror_axes: tuple[int, ...] | None = None
    version: int = VERSION

    def part(self, kind: str) -> PartChoice:
        """The part of one kind."""
        return getattr(self, kind)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Recipe:
        """This recipe with parts (:class:`PartChoice`) or ``mirror_axes`` replaced. A part named again keeps
        none of its old parameters; one given only parameters (empty name) updates them."""
        changes: dict[str, Any] = {}
        for kind, value in overrides.items():
            if kind == MIRROR:
                changes[kind] = value
            elif isinstance(value, PartChoice) and not value.name:
                old = self.part(kind)
                changes[kind] = replace(old, params={**old.params, **value.params})
            else:
                changes[kind] = value
        return replace(self, **changes)

    def mirror_axes_for(self, ndim: int) -> tuple[int, ...] | None:
        """The mirrored axes of a ``ndim``-D patch: the recipe numbers 3D axes, and a 2D configuration's axes are the
        last two (so ``mirror_axes=2`` mirrors left/right in both)."""
        if self.mirror_axes is None:
            return None
        shift = 3 - ndim
        return tuple(a - shift for a in self.mirror_axes if a >= shift)

    def describe(self) -> str:
        """The recipe in the command-line syntax."""
        parts = [f"{k}={self.part(k).text()}" for k in PART_KINDS]
        axes = "all" if self.mirror_axes is None else ",".join(map(str, self.mirror_axes)) or "none"
        return " ".join([*parts, f"{MIRROR}={axes}"]) if self.mirror_axes is not None else " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, **{k: self.part(k).to_json() for k in PART_KINDS},
                MIRROR: None if self.mirror_axes is None else list(self.mirror_axes)}

    @classmethod
    def from_json(cls, data: Any) -> Recipe:
        """Read a recipe.

        A version-1 record (plans, checkpoints and bundles of earlier releases) that names augmentation ``nnunet``
        meant the CPU worker pipeline and reads as ``nnunet_cpu``, so a recorded run keeps its augmentation.

        Raises:
            FileFormatError: not a recipe object, or a newer version.
        """
        if not isinstance(data, Mapping) or not all(k in data for k in ("network", "loss")):
            raise FileFormatError(f"a recipe needs at least 'network' and 'loss', found {data!r}.")
        if int(data.get("version", 1)) > VERSION:
            raise FileFormatError(f"recipe version {data['version']} is newer than this autoseg reads; upgrade it.")
        axes, version = data.get(MIRROR), int(data.get("version", 1))
        parts = {k: PartChoice.from_json(data[k]) for k in PART_KINDS if k in data}
        if version < 2 and "augmentation" in parts and parts["augmentation"].name == "nnunet":
            parts["augmentation"] = replace(parts["augmentation"], name="nnunet_cpu")
        return cls(**parts, mirror_axes=None if axes is None else tuple(int(a) for a in axes), version=VERSION)


def has_regions(labels: Mapping[str, Any]) -> bool:
    """Whether dataset.json ``labels`` define overlapping regions (lists of values): region training, sigmoid outputs."""
    return any(isinstance(v, (list, tuple)) for k, v in labels.items() if k != "ignore")


def default_recipe(*, block: str = "plain", regions: bool = False) -> Recipe:
    """Today's training: the preset's U-Net, Dice+CE (Dice+BCE for regions), SGD, poly, nnU-Net augmentation."""
    return Recipe(network=PartChoice(DEFAULT_NETWORK.get(block, "unet")),
                  loss=PartChoice("dice_bce" if regions else "dice_ce"))


def parse_recipe(items: Sequence[str] | str | None) -> dict[str, Any]:
    """``["network=attention_unet", "loss=dice_focal:gamma=2", "mirror_axes=0,1"]`` -> overrides for
    :meth:`Recipe.with_overrides` (parameter values stay text until the part's table checks them).

    ``loss=:gamma=3`` changes only a parameter of the current part.

    Raises:
        PlanningError: an item without ``KIND=``, an unknown kind (with a suggestion), a malformed parameter.
    """
    items = [items] if isinstance(items, str) else list(items or [])
    out: dict[str, Any] = {}
    for item in (t for text in items for t in str(text).split()):
        kind, sep, value = item.partition("=")
        kind = kind.strip().replace("-", "_")
        if not sep or kind not in (*PART_KINDS, MIRROR):
            import difflib

            close = difflib.get_close_matches(kind, [*PART_KINDS, MIRROR], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PlanningError(f"--recipe {item!r}: expected KIND=NAME[:KEY=VALUE...] with KIND one of "
                                f"{', '.join((*PART_KINDS, MIRROR))}{hint}, e.g. loss=dice_focal:gamma=2.")
        out[kind] = _mirror(value, item) if kind == MIRROR else _part(value, item)
    return out


def _mirror(value: str, item: str) -> tuple[int, ...] | None:
    text = value.strip().lower()
    if text == "all":
        return None
    if text in ("none", ""):
        return ()
    try:
        axes = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise PlanningError(f"--recipe {item!r}: mirror_axes takes axis numbers like 0,1,2, 'all' or 'none'.") from err
    if len(set(axes)) != len(axes) or any(a < 0 or a > 2 for a in axes):
        raise PlanningError(f"--recipe {item!r}: mirror axes must be distinct numbers from 0 to 2.")
    return tuple(sorted(axes))


def _part(value: str, item: str) -> PartChoice:
    name, *pairs = value.split(":")
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, val = pair.partition("=")
        if not sep or not key.strip():
            raise PlanningError(f"--recipe {item!r}: parameter {pair!r} must be KEY=VALUE, e.g. loss=dice_focal:gamma=2.")
        params[key.strip()] = val.strip()
    return PartChoice(name.strip().lower(), params)
