"""`streamspec bench attention`: step latency of the `custom` and `portable` attention backends.

The measuring lives in `streamspec.tools.bench_attention`; this module parses options
and writes the JSON report (the tables print as they complete).
"""

from __future__ import annotations

import argparse

from streamspec.tools.bench_attention import PAST_LENGTHS, TREE_SIZES  # numpy only at import time
from streamspec.tools.commands.arguments import integer, output_file, threads

HELP = ("Benchmark the attention backends side by side: whole step graphs and the attention op alone, "
        "custom (TreeAttention) against portable (GroupQueryAttention + tree bias), per tree size and cache length.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2",
                        help="smollm2: the embedded SmolLM2-135M; tiny: a 4-layer random model (quick check)")
    parser.add_argument("--trees", type=integer(1, 4096), nargs="+", default=list(TREE_SIZES), metavar="T",
                        help="tree sizes (nodes)")
    parser.add_argument("--pasts", type=integer(0, 1 << 20), nargs="+", default=list(PAST_LENGTHS), metavar="P",
                        help="committed cache rows before the tree")
    parser.add_argument("--repeats", type=integer(1), default=20, help="timed steps per backend and configuration")
    parser.add_argument("--warmup", type=integer(0), default=3, help="untimed steps per backend and configuration")
    parser.add_argument("--threads", type=threads, default=None, help="ONNX Runtime intra-op threads (default: ORT's)")
    parser.add_argument("--json", type=output_file, default="bench_attention.json",
                        help="where to write the JSON report")
    parser.add_argument("--force-export", action="store_true", help="export again even when cached")
    parser.add_argument("--tables", nargs="+", choices=("steps", "ops"), default=["steps", "ops"],
                        help="steps: whole step graphs; ops: the attention op alone, per layer kind")
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                        help="execution provider (cuda: onnxruntime-gpu and `streamspec build-ops --cuda`)")
    parser.add_argument("--op-dtype", choices=("float32", "float16"), default=None,
                        help="element type of the op table (default: float16 on cuda, float32 on cpu)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from streamspec.custom_ops import CustomOpError
    from streamspec.errors import StreamspecError
    from streamspec.tools import bench_attention
    from streamspec.tools.harness import write_report

    args.op_dtype = args.op_dtype or ("float16" if args.provider == "cuda" else "float32")
    console = Console()
    try:
        report = bench_attention.run(args, console)
    except CustomOpError as error:  # a missing or stale kernel library: its one sentence
        raise StreamspecError(str(error)) from None
    write_report(report, args.json)
    console.print(f"Wrote {args.json}")
    return 0
