"""`streamspec bench pruning`: tree pruning and prompt lookup side by side with autoregressive decoding.

The measuring and the report live in `streamspec.tools.bench_pruning`; this module
parses options, prints the table and writes the JSON report.
"""

from __future__ import annotations

import argparse

from streamspec.tools.bench_pruning import DEFAULT_PRUNE, LARGE_BUDGET  # stdlib-only at import time
from streamspec.tools.commands.arguments import integer, real
from streamspec.tools.commands.bench_options import add_loop_arguments, run_and_print

HELP = ("Benchmark tree pruning: no pruning, pruning, pruning + prompt lookup, at the folder's tuned budget and "
        "a large one, against autoregressive decoding of the same folder, side by side in one run.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folders", nargs="+", metavar="FOLDER",
                        help="folders exported with `streamspec export --pruning` (the same model)")
    parser.add_argument("--budgets", type=integer(1, 4096), nargs="+", default=None, metavar="B",
                        help=f"tree budgets (default: the folder's tuned budget and {LARGE_BUDGET})")
    parser.add_argument("--prune", type=real(0, 1, low_open=True, high_open=True), default=None, metavar="THRESHOLD",
                        help=f"pruning threshold (default: the folder's tuned one, else {DEFAULT_PRUNE})")
    parser.add_argument("--lookup", type=integer(0, 4096), default=8,
                        help="prompt-lookup draft tokens of the lookup rows (0: none)")
    add_loop_arguments(parser, num_prompts=6, max_new_tokens=64, repeats=3, report="bench_pruning.json")


def run(args: argparse.Namespace) -> int:
    from streamspec.tools import bench_pruning

    report, console = run_and_print(bench_pruning, args)
    if not all(row["equals_autoregressive"] for row in report["rows"]):
        console.print("[red]Some setting did not reproduce the autoregressive tokens.[/]")
        return 1
    console.print(f"Wrote {args.json}")
    return 0
