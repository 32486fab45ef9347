"""The command line: a thin argparse layer over :mod:`autoseg.api` (parse, call, print; no logic).

``app`` holds the parser and the pipeline commands; ``selection``, ``trust``, ``report`` and ``plugins`` add
the commands of their topic. ``autoseg COMMAND --help`` lists every option.
"""

from autoseg.cli.app import main

__all__ = ["main"]
