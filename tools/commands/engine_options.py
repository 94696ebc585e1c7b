"""The options that load an `Engine`, shared by the commands that run one (generate, serve)."""

from __future__ import annotations

import argparse

from streamspec.tools.commands.arguments import integer, real, threads


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-fallback", action="store_true",
                        help="speculate even where measurements show it is slower than autoregressive decoding")
    parser.add_argument("--budget", type=integer(0, 4096), default=None,
                        help="draft nodes per tree (default: the folder's streamspec.json)")
    parser.add_argument("--lookup", type=integer(0, 4096), default=None,
                        help="prompt-lookup draft tokens per step, 0 for none (default: the folder's streamspec.json)")
    parser.add_argument("--prune", type=real(0, 1, high_open=True), default=None, metavar="THRESHOLD",
                        help="tree-pruning threshold in [0, 1), 0 for none (default: the folder's streamspec.json); "
                             "needs a folder exported with --pruning")
    parser.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                        help="ONNX Runtime execution provider; auto picks CUDA when available")
    parser.add_argument("--max-length", type=integer(16), default=None,
                        help="KV cache rows to allocate (default: the exported maximum)")
    parser.add_argument("--max-memory", default=None, metavar="SIZE",
                        help="memory for weights + KV cache + activations, e.g. 1.5G: the cache gets the most rows "
                             "that fit, and a folder that cannot fit is refused")
    parser.add_argument("--threads", type=threads, default=None,
                        help="ONNX Runtime intra-op threads (1 to this machine's CPU cores)")


def engine_from_args(args: argparse.Namespace):
    """The `Engine` for `args.folder` with the options above."""
    from streamspec.runtime import Engine

    return Engine(args.folder, provider=args.provider, max_length=args.max_length, budget=args.budget,
                  threads=args.threads, fallback=not args.no_fallback, lookup=args.lookup,
                  memory_budget=args.max_memory, prune=args.prune)
