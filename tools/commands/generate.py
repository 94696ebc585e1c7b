"""`streamspec generate`: run an exported folder on ONNX Runtime and stream the text."""

from __future__ import annotations

import argparse
import sys

from streamspec.errors import StreamspecError
from streamspec.tools.commands.arguments import integer, real, seed, text
from streamspec.tools.commands.engine_options import add_engine_arguments, engine_from_args

HELP = "Generate text with an exported folder on ONNX Runtime, streaming it as it is committed."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="DIR", help="a folder written by `streamspec export`")
    parser.add_argument("--prompt", required=True, type=text, help="the prompt text")
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as a user message through the model's chat template")
    parser.add_argument("--system", default=None, type=text, help="with --chat: a system message before the prompt")
    parser.add_argument("--max-new-tokens", type=integer(1), default=128, help="the most tokens to generate")
    parser.add_argument("--temperature", type=real(0), default=0.0, help="0 is greedy; above 0 samples exactly")
    parser.add_argument("--top-p", type=real(0, 1, low_open=True), default=1.0,
                        help="nucleus sampling mass (1 keeps all)")
    parser.add_argument("--top-k", type=integer(0), default=0, help="sample among the K most probable (0 keeps all)")
    parser.add_argument("--seed", type=seed, default=None, help="random seed for sampling (0 to 2**64 - 1)")
    parser.add_argument("--stop", action="append", type=text, default=[], help="stop before this text (repeatable)")
    parser.add_argument("--ar", action="store_true",
                        help="autoregressive: one token per forward pass, no draft tree (for comparison)")
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    if args.system is not None and not args.chat:  # it would be silently ignored
        raise StreamspecError("--system needs --chat: a system message exists only in a chat.")
    engine = engine_from_args(args)
    prompt = args.prompt
    if args.chat:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + \
                 [{"role": "user", "content": args.prompt}]
    pieces = engine.stream(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, top_k=args.top_k, stop=args.stop, seed=args.seed,
                           speculative=not args.ar)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    stats = engine.last_result.stats
    mode = "speculative" if stats.speculative else "autoregressive"
    if stats.fallback_steps:
        mode += f" ({stats.fallback_steps} steps autoregressive by the fallback)"
    if engine.prune > 0 and stats.steps:
        mode += (f", pruning kept {sum(stats.tree_sizes) / stats.steps:.1f} of "
                 f"{sum(stats.drafted_sizes) / stats.steps:.1f} nodes per step")
    Console(stderr=True).print(
        f"[dim]{stats.new_tokens} tokens, {mode}, {stats.forward_passes} forward passes, "
        f"{stats.mean_accepted_length:.2f} tokens/step | {stats.tokens_per_second:.1f} tokens/s "
        f"(decode {stats.decode_tokens_per_second:.1f}) | prefill {stats.prefill_seconds * 1000:.0f} ms, "
        f"decode {stats.decode_seconds:.2f} s, in onnxruntime {stats.model_seconds:.2f} s, "
        f"host {stats.host_seconds:.2f} s | stop: {stats.stop_reason}[/dim]")
    return 0
