"""The syntax of plan overrides (``--set CONFIG.KEY=VALUE``): the keys, and parsing into :class:`Override` records
checked for form before any planning work."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from autoseg.errors import PlanningError

#: the configurations the planner can make, in their planned order
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
#: key -> what its value must be (shown when it is not)
KEYS = {
    "spacing": "positive numbers, one per axis (e.g. 1,0.8,0.8)",
    "patch_size": "whole numbers >= 1, one per axis (e.g. 96,160,160)",
    "batch_size": "a whole number >= 1",
    "num_epochs": "a whole number >= 1",
    "iterations_per_epoch": "a whole number >= 1",
    "val_iterations": "a whole number >= 1",
}
_PER_AXIS = ("spacing", "patch_size")
_TRAINING_LENGTH = ("num_epochs", "iterations_per_epoch", "val_iterations")
#: how override decisions begin; a warning (e.g. a memory overshoot) begins with WARNING
DECISION_PREFIX = "override: "
WARNING = DECISION_PREFIX + "warning: "

OverrideInput = Sequence[Any] | Mapping[str, Any] | str | None


@dataclass(frozen=True)
class Override:
    """One parsed override.

    Attributes:
        configuration: the configuration it changes.
        key: one of :data:`KEYS`.
        value: an int, or a tuple (of ints for ``patch_size``, floats for ``spacing``).
        text: ``CONFIGURATION.KEY=VALUE`` as given, for messages.
    """

    configuration: str
    key: str
    value: int | tuple[int, ...] | tuple[float, ...]
    text: str

    def error(self, problem: str) -> PlanningError:
        """A one-line error about this override."""
        return PlanningError(f"override {self.text}: {problem}")

    def json_value(self) -> int | list[int] | list[float]:
        """The value as ``plans.json`` records it."""
        return list(self.value) if isinstance(self.value, tuple) else self.value


# ---- parsing -----------------------------------------------------------------------------------------------------
def parse_overrides(overrides: OverrideInput) -> tuple[Override, ...]:
    """Check the syntax, keys and values of overrides (what can be checked without the plans).

    Args:
        overrides: ``CONFIGURATION.KEY=VALUE`` texts (or :class:`Override` records), one such text, or a mapping
            ``{"CONFIGURATION.KEY": value}`` / ``{"CONFIGURATION": {"KEY": value}}`` (values as texts, numbers or
            sequences).

    Returns:
        The overrides in the order given.

    Raises:
        PlanningError: one line per invalid override (bad syntax, unknown configuration or key, a value that does
            not parse, a key given twice).
    """
    out: list[Override] = []
    problems: list[str] = []
    for item in _items(overrides):
        try:
            o = item if isinstance(item, Override) else _parse_one(str(item))
        except PlanningError as err:
            problems.append(str(err))
            continue
        twice = next((p for p in out if (p.configuration, p.key) == (o.configuration, o.key)), None)
        if twice is not None:
            problems.append(f"override {o.text}: {o.configuration}.{o.key} is already set by {twice.text}; give it "
                            "once.")
            continue
        out.append(o)
    if problems:
        raise PlanningError("\n".join(problems))
    return tuple(out)


def _items(overrides: OverrideInput) -> list[Any]:
    if overrides is None:
        return []
    if isinstance(overrides, (str, Override)):
        return [overrides]
    if not isinstance(overrides, Mapping):
        return list(overrides)
    items: list[Any] = []
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            items += [f"{key}.{k}={_value_text(v)}" for k, v in value.items()]
        else:
            items.append(f"{key}={_value_text(value)}")
    return items


def _value_text(value: Any) -> str:
    if isinstance(value, (list, tuple, np.ndarray)):
        return ",".join(str(v) for v in value)
    return str(value)


def _parse_one(text: str) -> Override:
    target, sep, raw = text.strip().partition("=")
    config, dot, key = target.strip().partition(".")
    config, key, raw = config.strip(), key.strip(), raw.strip()
    text = f"{config}.{key}={raw}" if sep and dot else text.strip()
    if not (sep and dot and config and key and raw):
        raise PlanningError(f"override {text!r} is not CONFIGURATION.KEY=VALUE; write e.g. "
                            "3d_fullres.patch_size=96,160,160 or 3d_fullres.batch_size=4.")
    if config not in CONFIGURATIONS:
        raise PlanningError(f"override {text}: unknown configuration {config!r}{_did_you_mean(config, CONFIGURATIONS)}"
                            f"; configurations: {', '.join(CONFIGURATIONS)}.")
    if key not in KEYS:
        raise PlanningError(f"override {text}: unknown key {key!r}{_did_you_mean(key, KEYS)}; keys: "
                            f"{', '.join(KEYS)}.")
    try:
        value = _parse_value(key, raw)
    except ValueError:
        raise PlanningError(f"override {text}: {key} must be {KEYS[key]}, not {raw!r}.") from None
    return Override(configuration=config, key=key, value=value, text=text)


def _did_you_mean(name: str, choices: Sequence[str] | Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse_value(key: str, raw: str) -> int | tuple[int, ...] | tuple[float, ...]:
    """The value of ``key``; ValueError when it does not parse or is out of range."""
    if key not in _PER_AXIS:
        return _whole(raw)
    parts = re.split(r"\s*[,x]\s*", raw)
    if key == "patch_size":
        return tuple(_whole(p) for p in parts)
    values = tuple(float(p) for p in parts)
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(raw)
    return values


def _whole(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


# ---- applying ----------------------------------------------------------------------------------------------------
