"""The options of the benchmarks that run generations through the harness's A/B loop
(`streamspec bench precision`, `bench pruning`): the prompts, the loop's size, threads,
the report."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from streamspec.tools.commands.arguments import integer, output_file, threads


def add_loop_arguments(parser: argparse.ArgumentParser, num_prompts: int, max_new_tokens: int, repeats: int,
                       report: str) -> None:
    """Defaults differ per benchmark (how long a full run takes); the meaning does not."""
    parser.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                        help="a prompts file as `streamspec bench` reads (default: the default model's held-out "
                             "prompts)")
    parser.add_argument("--num-prompts", type=integer(1), default=num_prompts, metavar="N",
                        help="use the first N prompts of each domain")
    parser.add_argument("--max-new-tokens", type=integer(1), default=max_new_tokens, metavar="N",
                        help="the most tokens each generation makes")
    parser.add_argument("--repeats", type=integer(1), default=repeats, metavar="N",
                        help="timed runs of every prompt on every setting; the median per prompt is reported")
    parser.add_argument("--threads", type=threads, default=os.cpu_count() or 1, metavar="N",
                        help="ONNX Runtime intra-op threads")
    parser.add_argument("--json", type=output_file, default=report, metavar="OUT", help="where to write the report")
    parser.add_argument("--no-progress", action="store_true", help="no progress display")


def run_and_print(benchmark: ModuleType, args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """`benchmark.run(args, say)`'s report, written to --json and printed as
    `benchmark.render(report)`; returns it and the console for the verdict that follows."""
    from rich.console import Console

    from streamspec.tools.harness import write_report

    report = benchmark.run(args, Console(stderr=True, quiet=args.no_progress).log)
    write_report(report, args.json)
    console = Console()
    console.print(benchmark.render(report))
    return report, console
