"""`streamspec bench kernels`: one quantized MatMul against fp32, per kernel variant and rows.

The measuring lives in `streamspec.tools.bench_kernels`; this module parses options,
prints the tables and writes the JSON report.
"""

from __future__ import annotations

import argparse

from streamspec.tools.commands.arguments import integer, output_file, threads

HELP = ("Benchmark ONNX Runtime's MatMulNBits CPU kernels against an fp32 MatMul, side by side: float / uint8 / "
        "no zero points, 4 and 8 bits, fp32 or int8 activations, per number of rows (what the exporter's "
        "quantized layout is chosen by).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=integer(1, 4096), nargs="+", default=[1, 4, 12], metavar="R",
                        help="rows of the activation (1: an autoregressive step; a tree step has more)")
    parser.add_argument("--shapes", nargs="+", choices=("mlp", "gate_up", "head"), default=["mlp", "head"],
                        help="mlp: 576 x 1536 (SmolLM2's up-projection); gate_up: 576 x 3072 (its gate and up "
                             "projections merged, as the exporter runs them); head: 576 x 49152 (its LM head)")
    parser.add_argument("--repeats", type=integer(1), default=30, help="timed calls per kernel and row count")
    parser.add_argument("--threads", type=threads, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--json", type=output_file, default="bench_kernels.json", help="where to write the JSON report")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from streamspec.tools import bench_kernels
    from streamspec.tools.harness import write_report

    console = Console()
    shapes = {name: bench_kernels.SHAPES[name] for name in args.shapes}
    report = bench_kernels.run(shapes, tuple(args.rows), args.threads, args.repeats, show=console.log)
    for table in bench_kernels.render(report):
        console.print(table)
    write_report(report, args.json)
    console.print(f"Wrote {args.json}")
    return 0
