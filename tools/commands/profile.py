"""`streamspec profile`: where the time goes on this device, and whether speculation pays."""

from __future__ import annotations

import argparse

from streamspec.tools.commands.arguments import integer, output_file, real, text, threads

HELP = ("Profile an exported folder on this device: a live view while it generates, then the time split, "
        "acceptance, step-latency curve, roofline and (with --compare-ar) the measured speed-up.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="DIR", help="a folder written by `streamspec export`")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompts", metavar="FILE", default=None,
                        help="prompts file: JSONL (per line {\"messages\": [...]} or {\"prompt\": ...}), or a .txt "
                             "file with one plain prompt per line (default: two built-in prompts)")
    source.add_argument("--prompt", metavar="TEXT", default=None, type=text, help="profile this one prompt")
    parser.add_argument("--chat", action="store_true",
                        help="send text prompts as a user message through the model's chat template")
    parser.add_argument("--max-new-tokens", type=integer(1), default=64, help="tokens to generate per prompt")
    parser.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                        help="ONNX Runtime execution provider; auto picks CUDA when available")
    parser.add_argument("--compare-ar", action="store_true",
                        help="also run every prompt autoregressively, side by side, and report the speed-up")
    parser.add_argument("--json", metavar="OUT", default=None, type=output_file,
                        help="write every figure to this JSON file (`streamspec report OUT` shows it again)")
    parser.add_argument("--prune", type=real(0, 1, high_open=True), default=None, metavar="THRESHOLD",
                        help="tree-pruning threshold, 0 for none (default: the folder's; needs --pruning at export)")
    parser.add_argument("--budget", type=integer(0, 4096), default=None,
                        help="draft nodes per tree (default: the folder's streamspec.json)")
    parser.add_argument("--threads", type=threads, default=None,
                        help="ONNX Runtime intra-op threads (1 to this machine's CPU cores)")
    parser.add_argument("--max-length", type=integer(16), default=None,
                        help="KV cache rows to allocate (default: the exported maximum)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="generate exactly --max-new-tokens per prompt, past any end-of-sequence token")
    parser.add_argument("--repeats", type=integer(1), default=3,
                        help="timed runs per tree size for the step-latency curve (median reported)")
    parser.add_argument("--no-ort-profile", action="store_true",
                        help="skip ONNX Runtime's profiler (its short extra run and the operator table)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from streamspec.tools.profiler import report as reports
    from streamspec.tools.profiler.collect import ProfileSettings, as_chat, load_prompts, run_profile
    from streamspec.tools.profiler.live import LiveView

    settings = ProfileSettings(args.folder, provider=args.provider, max_new_tokens=args.max_new_tokens,
                               compare_ar=args.compare_ar, budget=args.budget, prune=args.prune, threads=args.threads,
                               max_length=args.max_length, ignore_eos=args.ignore_eos,
                               ort_profile=not args.no_ort_profile, curve_repeats=args.repeats)
    if args.prompts:
        settings.prompts = load_prompts(args.prompts, chat=args.chat)
    elif args.prompt is not None:
        settings.prompts = [as_chat(args.prompt) if args.chat else args.prompt]
    elif args.chat:
        settings.prompts = [as_chat(p) for p in settings.prompts]

    console = Console()
    view = LiveView()
    # transient: the report that follows replaces the live view on a terminal.
    with Live(view, console=console, refresh_per_second=4, transient=True):
        report = run_profile(settings, view)
    console.print(reports.render(report, console.width))
    if args.json:
        path = reports.save(report, args.json)
        console.print(f"[dim]Wrote every figure to {path}; `streamspec report {path}` shows this report again.[/]")
    return 0
