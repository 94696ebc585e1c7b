"""`streamspec distill`: the base model's own greedy answers, as training data."""

from __future__ import annotations

import argparse
import os

from streamspec.tools.commands.arguments import integer, seed, threads

HELP = ("Self-distillation: write the base model's greedy answers to prompts as JSONL for "
        "`streamspec train` (continuous batching, resumable).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from streamspec.models.self_prompts import ALL_DOMAINS, DOMAINS

    parser.add_argument("--base", default="default",
                        help="base model: 'default' (the embedded SmolLM2-135M-Instruct), a Hugging Face "
                             "folder or a .gguf file")
    parser.add_argument("--prompts", nargs="+", default=None, metavar="P.jsonl",
                        help="prompt files, one {\"id\", \"messages\": [...], \"split\", \"domain\"} object per "
                             "line; without it (and without --self-prompts), prompts are harvested from the "
                             "Python standard library's source into OUT's folder first")
    parser.add_argument("--self-prompts", type=integer(0), default=0, metavar="N",
                        help="first let the base model write N prompts of its own, spread evenly over the "
                             "model-written domains of --domains (kept in OUT.prompts/self.jsonl; resumable)")
    parser.add_argument("--domains", default="all", metavar="LIST",
                        help="comma-separated domains for --self-prompts: "
                             + ", ".join(f"{name} ({spec['what']})" for name, spec in DOMAINS.items())
                             + ", and stdlib (the standard library's source, harvested); 'all' (default): "
                             + ",".join(ALL_DOMAINS))
    parser.add_argument("--stdlib-prompts", type=integer(1), default=None, metavar="M",
                        help="with --self-prompts and the stdlib domain: harvest M standard-library prompts "
                             "(default: the same share as each model-written domain)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the self-written prompts")
    parser.add_argument("--out", required=True, metavar="D.jsonl",
                        help="output JSONL (appended to: prompts already answered there are skipped); the "
                             "mix of domains and splits is recorded next to it in D.mix.json")
    parser.add_argument("--max-new-tokens", type=integer(1), default=128, help="longest answer, in tokens")
    parser.add_argument("--batch-size", type=integer(1), default=48,
                        help="sequences decoded together (continuous batching: a finished answer's slot "
                             "takes the next prompt at once)")
    parser.add_argument("--limit", type=integer(1), default=None,
                        help="at most this many prompts (per prompts file; in all when harvesting)")
    parser.add_argument("--threads", type=threads, default=os.cpu_count() or 1, help="CPU threads for torch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from streamspec.models.distill import distill, write_mix
    from streamspec.models.errors import StreamspecError
    from streamspec.models.self_prompts import DOMAINS, STDLIB_DOMAIN, generate_prompts, parse_domains

    for name in ("self_prompts", "seed"):
        if getattr(args, name) < 0:
            raise StreamspecError(f"--{name.replace('_', '-')} must not be negative.")
    out = Path(args.out)
    domains = parse_domains(args.domains)
    folder = out.parent / f"{out.stem}.prompts"
    prompt_files = [Path(p) for p in args.prompts] if args.prompts else []
    limit = args.limit
    written_domains = [d for d in domains if d in DOMAINS]
    if args.self_prompts:
        if not written_domains:
            raise StreamspecError("--self-prompts needs at least one model-written domain in --domains.")
        self_file = folder / "self.jsonl"
        stats = generate_prompts(args.base, self_file, args.self_prompts, written_domains, seed=args.seed,
                                 batch_size=args.batch_size, threads=args.threads, progress=not args.no_progress)
        print(f"{stats['kept']} self-written prompts in {self_file} ({stats['written']} new, "
              f"{stats['dropped']} candidates dropped: unfinished, too short or repeated).")
        prompt_files.append(self_file)
    harvest_stdlib = (not args.prompts and not args.self_prompts) or (args.self_prompts and STDLIB_DOMAIN in domains)
    if harvest_stdlib:
        from streamspec.models.prompts import harvest

        if args.self_prompts:
            limit = args.stdlib_prompts or -(-args.self_prompts // max(len(written_domains), 1))
        counts = harvest(folder, limit=limit)
        prompt_files += [folder / "heldout.jsonl", folder / "train.jsonl"]
        limit = None  # the harvest already applied it
        print(f"Harvested {counts['train']} train and {counts['heldout']} held-out prompts into {folder}.")
    stats = distill(args.base, prompt_files, out, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    limit=limit, progress=not args.no_progress, threads=args.threads)
    # --domains chooses what is written or harvested; the domains of given prompt files are
    # their own (counted per domain below it in the mix).
    asked = domains if (args.self_prompts or harvest_stdlib) else None
    mix = write_mix(out, {"domains": asked, "self_prompts": args.self_prompts, "seed": args.seed,
                          "max_new_tokens": args.max_new_tokens,
                          "prompt_files": [str(p) for p in prompt_files]})
    print(f"Wrote {stats['written']} answers to {out}"
          + (f" ({stats['skipped']} were already there)" if stats["skipped"] else "") + f"; mix in {mix}.")
    return 0
