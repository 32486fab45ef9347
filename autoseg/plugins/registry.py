"""The plugin table: the built-in plugins plus those other packages declare as entry points.

A package adds plugins by declaring, in its ``pyproject.toml``::

    [project.entry-points."autoseg.plugins"]
    my_channel = "my_package.plugins:MY_CHANNEL"     # a PluginInfo (or a function returning one)

The table is built anew by each call (nothing is cached in the module), and a name is only ever looked up in
it: no user string is imported or resolved as an attribute.
"""

from __future__ import annotations

from autoseg.plugins.base import CHANNEL, LABELS
from autoseg.registry import GROUP, PluginInfo, lookup, part_table  # noqa: F401


def builtin_plugins() -> tuple[PluginInfo, ...]:
    """The plugins that come with autoseg."""
    from autoseg.plugins.kle import KLE_RESIDUAL
    from autoseg.plugins.zones import PERITUMORAL_ZONES

    return (KLE_RESIDUAL, PERITUMORAL_ZONES)


def available_plugins() -> dict[str, PluginInfo]:
    """Every channel and labels plugin that can be used: name -> :class:`PluginInfo`, built-ins first, then entry
    points by name (other kinds of parts are listed by their own stage's table).

    Raises:
        PluginError: a third-party entry point fails to load, is not a :class:`PluginInfo`, or reuses a name.

    Example:
        >>> sorted(available_plugins())[:2]
        ['kle_residual', 'peritumoral_zones']
    """
    return part_table(builtin_plugins(), (CHANNEL, LABELS))


def get_plugin(name: str, table: dict[str, PluginInfo] | None = None) -> PluginInfo:
    """The plugin called ``name`` (default table: :func:`available_plugins`).

    Raises:
        PluginError: no such plugin (the message lists the available ones and suggests the closest).
    """
    return lookup(name, available_plugins() if table is None else table)
