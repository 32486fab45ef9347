"""``autoseg plugins``: list the available plugins and their parameters (or describe one); parse, call, print."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    pg = sub.add_parser("plugins", help="list the plugins (extra input channels, derived labels) and their parameters")
    pg.add_argument("name", nargs="?", help="describe this plugin in full")


def _cmd_plugins(args: argparse.Namespace) -> int:
    from autoseg.plugins import available_plugins, get_plugin

    if args.name:
        info = get_plugin(args.name)
        print("\n".join(info.describe()))
        print()
        print(info.doc.strip())
        return 0
    for info in available_plugins().values():
        print("\n".join(info.describe()))
    print("\nchoose them when planning: autoseg plan DATASET --plugin NAME[:KEY=VALUE[:KEY=VALUE...]] "
          "(e.g. --plugin kle_residual --plugin peritumoral_zones:widths_mm=5,10:labels=1)")
    return 0


COMMANDS = {"plugins": _cmd_plugins}
