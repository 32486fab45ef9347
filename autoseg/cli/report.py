"""``autoseg report``: parse, call the API, print."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    r = sub.add_parser("report", help="one self-contained HTML page describing a work folder (plans, training, "
                                      "CV, chosen model, worst cases)")
    r.add_argument("--workdir", type=Path, required=True, help="work folder to describe")
    r.add_argument("-o", "--output", type=Path, help="HTML file to write (default WORKDIR/report.html)")
    r.add_argument("--dataset", type=Path, help="dataset folder for the case images (default: the planned one)")
    r.add_argument("--max-cases", type=int, default=4, metavar="N", help="worst CV cases to draw (default 4)")


def _cmd_report(args: argparse.Namespace) -> int:
    from autoseg.report import write_report

    print(write_report(args.workdir, args.output, dataset=args.dataset, max_cases=args.max_cases))
    return 0


COMMANDS = {"report": _cmd_report}
