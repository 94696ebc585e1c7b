"""`streamspec report`: show a saved `streamspec profile --json` report again."""

from __future__ import annotations

import argparse

from streamspec.tools.commands.arguments import integer

HELP = ("Render a report saved by `streamspec profile --json` (e.g. one taken on a Jetson board) as "
        "`streamspec profile` showed it.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("report", metavar="PROFILE.json", help="a file written by `streamspec profile --json`")
    parser.add_argument("--width", type=integer(20, 1000), default=None,
                        help="render at this many columns (default: the terminal's width)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from streamspec.tools.profiler.report import load, render

    report = load(args.report)
    console = Console(width=args.width)
    console.print(render(report, console.width))
    return 0
