"""`streamspec bench precision`: fp32 against int8 / int4 weights and quantized KV caches.

The measuring and the report live in `streamspec.tools.bench_precision`; this module
parses options, shows progress, prints the table and writes the JSON report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from streamspec.tools.bench_precision import PRECISIONS  # stdlib-only at import time, so --help stays fast
from streamspec.tools.commands.arguments import integer
from streamspec.tools.commands.bench_options import add_loop_arguments, run_and_print

HELP = ("Benchmark one model's precisions side by side (fp32, int8, int4 weights, optionally quantized KV "
        "caches): tok/s autoregressive and speculative, agreement with fp32 greedy, memory.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", metavar="CKPT_OR_FOLDERS",
                        help="one checkpoint or base model to export per precision, or exported folders")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), metavar="P",
                        help="precisions to export from a checkpoint (ignored for exported folders): weights fp32, "
                             "int8 or int4, each optionally with +kv8 or +kv4 for an int8 / int4 KV cache, e.g. "
                             "fp32 int4 int4+kv8")
    parser.add_argument("--out-dir", type=Path, default=None, metavar="DIR",
                        help="where the exports go (default: <streamspec cache>/bench/precision/<source name>)")
    parser.add_argument("--force-export", action="store_true", help="export again even when a folder is there")
    parser.add_argument("--block-size", type=integer(1), default=32, help="quantization block size of the exports")
    parser.add_argument("--quant-activations", choices=("fp32", "int8", "int8-head"), default="fp32",
                        help="what the quantized exports' MatMuls compute with (see `streamspec export --help`)")
    parser.add_argument("--max-length", type=integer(16), default=1024, help="max length of the exports")
    parser.add_argument("--budget", type=integer(0, 4096), default=None,
                        help="draft nodes per tree (default: each folder's)")
    add_loop_arguments(parser, num_prompts=4, max_new_tokens=64, repeats=3, report="bench_precision.json")


def run(args: argparse.Namespace) -> int:
    from streamspec.tools import bench_precision

    report, console = run_and_print(bench_precision, args)
    broken = [s["precision"] for s in report["precisions"] if s["spec_equals_ar"] is False]
    if broken:
        console.print(f"[red]Speculative and autoregressive tokens differ for {', '.join(broken)}.[/]")
    console.print(f"Wrote {args.json}")
    return 0
