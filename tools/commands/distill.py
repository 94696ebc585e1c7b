"""`streamspec distill`: the base model's own greedy answers, as training data."""

from __future__ import annotations

import argparse
import os

HELP = ("Self-distillation: write the base model's greedy answers to prompts as JSONL for "
        "`streamspec train` (batched, resumable).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="default",
                        help="base model: 'default' (the embedded SmolLM2-135M-Instruct), a Hugging Face "
                             "folder or a .gguf file")
    parser.add_argument("--prompts", nargs="+", default=None, metavar="P.jsonl",
                        help="prompt files, one {\"id\", \"messages\": [...], \"split\"} object per line; "
                             "without it, prompts are harvested from the Python standard library's "
                             "source into OUT's folder first")
    parser.add_argument("--out", required=True, metavar="D.jsonl",
                        help="output JSONL (appended to: prompts already answered there are skipped)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer, in tokens")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    parser.add_argument("--limit", type=int, default=None,
                        help="at most this many prompts (per prompts file; in all when harvesting)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for torch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from streamspec.models.distill import distill

    out = Path(args.out)
    prompt_files = [Path(p) for p in args.prompts] if args.prompts else None
    limit = args.limit
    if prompt_files is None:
        from streamspec.models.prompts import harvest

        folder = out.parent / f"{out.stem}.prompts"
        counts = harvest(folder, limit=limit)
        prompt_files = [folder / "train.jsonl", folder / "heldout.jsonl"]
        limit = None  # the harvest already applied it
        print(f"Harvested {counts['train']} train and {counts['heldout']} held-out prompts into {folder}.")
    written = skipped = 0
    for path in prompt_files:
        stats = distill(args.base, path, out, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        limit=limit, progress=not args.no_progress, threads=args.threads)
        written += stats["written"]
        skipped += stats["skipped"]
    print(f"Wrote {written} answers to {out}" + (f" ({skipped} were already there)." if skipped else "."))
    return 0
