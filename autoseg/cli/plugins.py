"""``autoseg plugins``: list the available plugins and their parameters (or describe one); parse, call, print."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    pg = sub.add_parser("plugins", help="list the parts: recipe parts (networks, losses, optimisers, schedules, "
                                        "augmentations) and plugins (extra input channels, derived labels)")
    pg.add_argument("name", nargs="?", help="describe this part or plugin in full")


def _cmd_plugins(args: argparse.Namespace) -> int:
    from autoseg.plugins import available_plugins
    from autoseg.registry import lookup
    from autoseg.training.parts import part_tables

    tables = {**part_tables(), "plugin": available_plugins()}
    if args.name:
        every = {name: info for table in tables.values() for name, info in table.items()}
        info = lookup(args.name, every, "part or plugin")
        print("\n".join(info.describe()))
        print()
        print(info.doc.strip())
        return 0
    for kind, table in tables.items():
        print(f"{kind}s:" if kind != "plugin" else "plugins (channel, labels):")
        for info in table.values():
            print("\n".join("  " + line for line in info.describe()))
    print("\nchoose recipe parts when planning or training: autoseg plan DATASET --recipe network=attention_unet "
          "loss=dice_focal:gamma=2; plugins with --plugin NAME[:KEY=VALUE[:KEY=VALUE...]] (e.g. --plugin kle_residual "
          "--plugin peritumoral_zones:widths_mm=5,10:labels=1)")
    return 0


COMMANDS = {"plugins": _cmd_plugins}
