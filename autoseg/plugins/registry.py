"""The plugin table: the built-in plugins plus those other packages declare as entry points.

A package adds plugins by declaring, in its ``pyproject.toml``::

    [project.entry-points."autoseg.plugins"]
    my_channel = "my_package.plugins:MY_CHANNEL"     # a PluginInfo (or a function returning one)

The table is built anew by each call (nothing is cached in the module), and a name is only ever looked up in
it: no user string is imported or resolved as an attribute.
"""

from __future__ import annotations

import dataclasses
import difflib
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from autoseg.plugins.base import PluginError, PluginInfo

#: entry-point group other packages declare plugins under
GROUP = "autoseg.plugins"


def builtin_plugins() -> tuple[PluginInfo, ...]:
    """The plugins that come with autoseg."""
    from autoseg.plugins.kle import KLE_RESIDUAL
    from autoseg.plugins.zones import PERITUMORAL_ZONES

    return (KLE_RESIDUAL, PERITUMORAL_ZONES)


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
    return dataclasses.replace(info, origin=f"entry point {ep.value}")


def available_plugins() -> dict[str, PluginInfo]:
    """Every plugin that can be used: name -> :class:`PluginInfo`, built-ins first, then entry points by name.

    Raises:
        PluginError: a third-party entry point fails to load, is not a :class:`PluginInfo`, or reuses a name.

    Example:
        >>> sorted(available_plugins())[:2]
        ['kle_residual', 'peritumoral_zones']
    """
    table = {p.name: p for p in builtin_plugins()}
    for ep in sorted(entry_points(group=GROUP), key=lambda e: (e.name, e.value)):
        info = _from_entry_point(ep)
        if info.name in table:
            raise PluginError(f"the {GROUP} entry point {ep.name!r} = {ep.value!r} reuses the name of the plugin from "
                              f"{table[info.name].origin}; rename it or uninstall one of the packages.")
        table[info.name] = info
    return table


def get_plugin(name: str, table: dict[str, PluginInfo] | None = None) -> PluginInfo:
    """The plugin called ``name``.

    Args:
        name: plugin name.
        table: the table to look in (default: :func:`available_plugins`).

    Raises:
        PluginError: no such plugin (the message lists the available ones and suggests the closest).
    """
    table = available_plugins() if table is None else table
    if name in table:
        return table[name]
    close = difflib.get_close_matches(str(name), list(table), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise PluginError(f"there is no plugin {name!r}{hint}; available: {', '.join(table) or 'none'} "
                      "(`autoseg plugins` describes them).")
