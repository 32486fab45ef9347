"""Choosing plugins when planning: parse and check the choices, record them (defaults filled in) in the plans.

The plans keep each chosen plugin as ``{"name": ..., "kind": ..., "params": {...}}`` (every parameter, so a
later change of a default does not change what a work folder means).

    >>> resolve_plugins(["kle_residual:grid=32", {"name": "peritumoral_zones", "params": {"widths_mm": [5]}}])[0]
    {'name': 'kle_residual', 'kind': 'channel', 'params': {'grid': 32, 'n_components': 32}}
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from autoseg.planner.plans import Plans
from autoseg.plugins.base import (
    CHANNEL,
    ChannelPlugin,
    LabelsPlugin,
    PluginError,
    PluginInfo,
    create_plugin,
    format_value,
)
from autoseg.plugins.registry import available_plugins, get_plugin

#: how the plans' decisions about plugins begin (replaced when the plugins are chosen again)
DECISION_PREFIX = "plugin "
PluginChoice = str | Mapping[str, Any]


def parse_spec(text: str) -> tuple[str, dict[str, str]]:
    """``NAME`` or ``NAME:KEY=VALUE:KEY=VALUE`` (``;`` also separates) -> name and the unconverted parameters.

    Raises:
        PluginError: an item that is not ``KEY=VALUE``, or a parameter given twice.

    Example:
        >>> parse_spec("peritumoral_zones:widths_mm=5,10:labels=1")
        ('peritumoral_zones', {'widths_mm': '5,10', 'labels': '1'})
    """
    name, _, rest = str(text).strip().partition(":")
    params: dict[str, str] = {}
    for item in (i.strip() for i in re.split(r"[:;]", rest) if i.strip()):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PluginError(f"plugin option {text!r}: {item!r} is not KEY=VALUE; write e.g. "
                              "peritumoral_zones:widths_mm=5,10:labels=1.")
        if key.strip() in params:
            raise PluginError(f"plugin option {text!r}: {key.strip()!r} is given twice.")
        params[key.strip()] = value.strip()
    return name.strip(), params


def resolve_plugins(choices: Sequence[PluginChoice] | None, table: dict[str, PluginInfo] | None = None
                    ) -> tuple[dict[str, Any], ...]:
    """Check plugin choices and return them as the plans store them (defaults filled in).

    Args:
        choices: each a name, a ``NAME:KEY=VALUE:...`` text, or a mapping ``{"name": ..., "params": {...}}``
            (the stored form, so the plugins of existing plans can be passed back).
        table: the plugin table (default: :func:`available_plugins`).

    Returns:
        ``({"name", "kind", "params"}, ...)`` in the order given.

    Raises:
        PluginError: an unknown plugin, a bad parameter, or the same plugin twice.
    """
    if not choices:
        return ()
    if isinstance(choices, (str, Mapping)):
        choices = [choices]
    table = available_plugins() if table is None else table
    out: list[dict[str, Any]] = []
    for choice in choices:
        if isinstance(choice, Mapping):
            if "name" not in choice or not isinstance(choice.get("params", {}), Mapping):
                raise PluginError(f"plugin choice {dict(choice)!r} needs a 'name' and optionally a 'params' mapping.")
            name, params = str(choice["name"]), dict(choice.get("params") or {})
        elif isinstance(choice, str):
            name, params = parse_spec(choice)
        else:
            raise PluginError(f"plugin choice {choice!r} is neither a name, a 'NAME:KEY=VALUE' text nor a mapping.")
        info = get_plugin(name, table)
        if any(o["name"] == info.name for o in out):
            raise PluginError(f"plugin {info.name!r} is chosen twice; give it once with all its parameters.")
        out.append({"name": info.name, "kind": info.kind, "params": info.validate(params)})
    return tuple(out)


def chosen_plugins(plans: Plans, kind: str, table: dict[str, PluginInfo] | None = None
                   ) -> list[tuple[dict[str, Any], PluginInfo, ChannelPlugin | LabelsPlugin]]:
    """The plans' plugins of one kind, each as ``(stored choice, info, plugin object)``, in the plans' order.

    Raises:
        PluginError: a plugin of the plans is not installed (here) or its stored parameters are no longer valid.
    """
    wanted = [p for p in plans.plugins if p.get("kind") == kind]
    if not wanted:
        return []
    table = available_plugins() if table is None else table
    out = []
    for spec in wanted:
        try:
            info = get_plugin(str(spec["name"]), table)
            out.append((spec, info, create_plugin(info, spec.get("params"))))
        except PluginError as err:
            raise PluginError(f"the plans of {plans.dataset_name!r} use plugin {spec.get('name')!r}, which cannot be "
                              f"used here: {err} Install the package that provides it, or plan again without it."
                              ) from err
    return out


def with_plugins(plans: Plans, choices: Sequence[PluginChoice] | None,
                 table: dict[str, PluginInfo] | None = None) -> Plans:
    """``plans`` with these plugins (replacing earlier ones) and a decision line for each.

    Raises:
        PluginError: see :func:`resolve_plugins`.

    Example:
        >>> plans = with_plugins(plans, ["kle_residual"])  # doctest: +SKIP
        >>> plans.plugins[0]["params"]  # doctest: +SKIP
        {'grid': 48, 'n_components': 32}
    """
    table = available_plugins() if table is None else table
    chosen = resolve_plugins(choices, table)
    notes = []
    for spec in chosen:
        info = table[spec["name"]]
        plugin = create_plugin(info, spec["params"])
        params = ", ".join(f"{k}={format_value(v)}" for k, v in spec["params"].items()) or "no parameters"
        if info.kind == CHANNEL:
            assert isinstance(plugin, ChannelPlugin)
            effect = f"adds {plugin.n_channels} network input channel(s) after the image channels"
        else:
            effect = f"`autoseg predict` also writes OUTPUT/{info.output}/<case> from each segmentation"
        notes.append(f"{DECISION_PREFIX}{info.name} ({info.kind}; {params}): {effect}.")
        if isinstance(plugin, ChannelPlugin):
            notes += [f"{DECISION_PREFIX}{info.name}: {d}" for d in plugin.decisions(plans.num_training)]
    kept = tuple(d for d in plans.decisions if not d.startswith(DECISION_PREFIX))
    return dataclasses.replace(plans, plugins=chosen, decisions=kept + tuple(notes))
