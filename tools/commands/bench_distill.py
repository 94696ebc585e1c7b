"""`streamspec bench distill`: answers/hour of three ways to get the greedy answers distillation needs.

The measuring lives in `streamspec.tools.bench_distill`; this module parses options,
prints the table and writes the JSON report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from streamspec.tools.commands.arguments import integer, output_file, threads

HELP = ("Benchmark distillation throughput: transformers one prompt at a time, on padded batches, and the "
        "continuous batching `streamspec distill` uses, on the same prompts, alternated each round.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="default", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prompts", required=True, type=Path, help="a prompts file as `streamspec distill` reads")
    parser.add_argument("--num-prompts", type=integer(1), default=32, help="prompts per round")
    parser.add_argument("--rounds", type=integer(1), default=2, help="rounds, each on new prompts, systems alternated")
    parser.add_argument("--max-new-tokens", type=integer(1), default=128, help="longest answer")
    parser.add_argument("--padded-batch", type=integer(1), default=16, help="prompts per padded transformers batch")
    parser.add_argument("--slots", type=integer(1), default=48,
                        help="sequences decoded together by continuous batching")
    parser.add_argument("--threads", type=threads, default=2, help="torch threads")
    parser.add_argument("--json", type=output_file, default="distill-bench.json", help="where to write the report")


def run(args: argparse.Namespace) -> int:
    import sys

    from streamspec.tools import bench_distill
    from streamspec.tools.harness import write_report

    report = bench_distill.run(args.base, args.prompts, args.num_prompts, args.rounds, args.max_new_tokens,
                               args.padded_batch, args.slots, args.threads, say=lambda m: print(m, file=sys.stderr))
    write_report(report, args.json)
    print(f"{'system':<15} {'answers/h':>10} {'tok/s':>7} {'speed-up':>8} {'same as one-at-a-time':>22}")
    for row in report["systems"]:
        print(f"{row['system']:<15} {row['answers_per_hour']:>10.0f} {row['tokens_per_second']:>7.1f} "
              f"{row['speedup']:>7.2f}x {row['equal_to_one_at_a_time']:>14}/{row['answers']}")
    print(f"report written to {args.json}")
    return 0
