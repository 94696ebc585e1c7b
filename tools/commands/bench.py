"""`streamspec bench`: streamspec next to optimum, transformers and onnxruntime-genai.

The systems live in `streamspec.tools.bench`, the measuring loop in
`streamspec.tools.harness`; this module parses options, finds or exports the folder,
prints the table and writes the JSON report.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from streamspec.tools.commands.arguments import integer, output_file, threads

from streamspec.tools.bench import SYSTEMS  # stdlib-only at import time, so --help stays fast

HELP = ("Benchmark streamspec (speculative and autoregressive) against optimum, transformers (greedy and "
        "prompt lookup) and onnxruntime-genai: same weights, same prompts, side by side in one run.")
EPILOG = ("The other benchmarks are commands of their own, each with --help: `streamspec bench precision` "
          "(fp32 / int8 / int4), `bench pruning` (tree pruning and prompt lookup), `bench attention` (the two "
          "attention backends' step latency), `bench distill` (distillation throughput), `bench kernels` "
          "(quantized MatMul kernels).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="DIR", nargs="?", default=None,
                        help="a folder written by `streamspec export`; when omitted, the default model, exported "
                             "once into the streamspec cache (the folder `streamspec demo` uses)")
    parser.add_argument("--prompts", metavar="FILE", default=None,
                        help='a JSONL file of {"messages": [...]} or {"prompt": "..."} records, each with an optional '
                             '"domain" (a prompt is sent as a user message through the chat template), or a .txt file with one '
                             'prompt per line; when omitted, '
                             "the default model's held-out prompts of every domain, which its streams never saw")
    parser.add_argument("--domains", default=None, metavar="LIST",
                        help="comma-separated domains of the prompts to run (default: all); figures are printed per "
                             "domain and as their mean")
    parser.add_argument("--num-prompts", type=integer(1), default=None, metavar="N",
                        help="use the first N prompts of each domain; when omitted, 8 of the built-in prompts or "
                             "all of a --prompts file")
    parser.add_argument("--max-new-tokens", type=integer(1), default=96, metavar="N",
                        help="the most tokens each generation makes")
    parser.add_argument("--repeats", type=integer(1), default=3, metavar="N",
                        help="timed runs of every prompt on every system; the median per prompt is reported")
    parser.add_argument("--threads", type=threads, default=os.cpu_count() or 1, metavar="N",
                        help="threads for ONNX Runtime (intra-op) and PyTorch alike; the default is all cores")
    parser.add_argument("--only", action="append", default=None, metavar="SYSTEMS",
                        help=f"comma-separated systems to run (repeatable); choose from {', '.join(SYSTEMS)} "
                             "; when omitted, all of them")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="generate max-new-tokens tokens everywhere, end-of-sequence tokens included")
    parser.add_argument("--json", metavar="OUT", type=output_file, default="bench.json", help="where to write the JSON report")
    parser.add_argument("--hf-model", metavar="FOLDER", default=None,
                        help="the Hugging Face folder of the same weights for the PyTorch, optimum and genai systems "
                             "; when omitted, the base model the folder was exported from")
    parser.add_argument("--genai-model", metavar="FOLDER", default=None,
                        help="a folder made by onnxruntime-genai's model builder; when omitted, one is built once "
                             "into the cache")
    parser.add_argument("--prompt-lookup-tokens", type=integer(1), default=10, metavar="N",
                        help="prompt_lookup_num_tokens for the prompt-lookup system")
    parser.add_argument("--baseline", choices=SYSTEMS, default="optimum",
                        help="the system the speed ratios are relative to")
    parser.add_argument("--no-progress", action="store_true", help="no progress display")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from streamspec.errors import StreamspecError
    from streamspec.tools import bench, harness

    console = Console()
    systems = bench.check_systems([name.strip() for value in args.only for name in value.split(",") if name.strip()]
                                  if args.only else bench.SYSTEMS)
    if not systems:
        raise StreamspecError("--only names no system.")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise StreamspecError(f"--num-prompts must be at least 1, got {args.num_prompts}.")
    if args.genai_model is not None and not Path(args.genai_model, "genai_config.json").is_file():
        raise StreamspecError(f"{args.genai_model} has no genai_config.json, so it is no onnxruntime-genai folder.")
    folder = Path(args.folder) if args.folder else _default_folder(console)
    if not folder.exists():
        raise StreamspecError(f"The folder {folder} does not exist; pass a folder written by `streamspec export`.")
    settings = bench.make_settings(folder, systems, args.threads, args.ignore_eos,
                                   Path(args.hf_model) if args.hf_model else None,
                                   prompt_lookup_tokens=args.prompt_lookup_tokens,
                                   genai_folder=Path(args.genai_model) if args.genai_model else None)
    domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
    prompts = harness.load_prompts(Path(args.prompts) if args.prompts else None, args.num_prompts, domains)
    prompt_ids = harness.tokenize_prompts(folder, prompts)
    report = bench.run_bench(settings, prompt_ids, systems, args.max_new_tokens, args.repeats, args.baseline,
                             progress=not args.no_progress, prompt_names=[p.id for p in prompts])
    report["prompts"] = [{**entry, "domain": p.domain} for entry, p in zip(report["prompts"], prompts)]
    report["domains"] = bench.domain_summary(report, [p.domain for p in prompts])
    console.print(bench.render_table(report))
    if report["domains"]:
        console.print(bench.render_domains(report["domains"]))
    for line in settings.notes + bench.row_notes(report):
        console.print(f"[yellow]note[/]: {line}")
    harness.write_report(report, Path(args.json))
    console.print(f"[dim]report written to {args.json}[/]")
    return 0


def _default_folder(console) -> Path:
    """The default model exported once into the cache, where `streamspec demo` keeps it."""
    from streamspec.exporter import export
    from streamspec.models.loading import cache_root
    from streamspec.tools.commands.demo import exported_from, default_model_source

    source = default_model_source()
    out = cache_root() / "demo" / Path(source).name
    if not exported_from(out, source):  # missing, or an export of older default streams
        console.print(f"[bold]Exporting[/] {source} to {out} (once)...")
        export(source, out, force=True)
    return out
