"""Distillation throughput: answers per hour of three ways to get greedy answers.

    python -m streamspec.tools.bench_distill --prompts P.jsonl --num-prompts 32 --json distill-bench.json

On the same prompts, in one process, alternating the systems each round (A B C, then
C B A) so that drifting machine load hits all alike:

    one-at-a-time   transformers `generate`, one prompt per call (what a simple script does)
    padded-batch    transformers `generate` on left-padded batches (`--padded-batch` prompts)
    continuous      `models/batched.SlotDecoder` (what `streamspec distill` uses):
                    `--slots` sequences per step, a finished answer's slot refilled at once

Every system answers with the same greedy rule, EOS and `--max-new-tokens`; the report
gives answers/hour and generated tokens/s per system (over all rounds), and how many
answers equal the one-at-a-time ones (a difference is allowed only at a near-tie of the
top two logits; this command counts, the test suite checks).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from streamspec.errors import StreamspecError

SYSTEMS = ("one-at-a-time", "padded-batch", "continuous")


def _hf_generate(model: Any, prompts: list[list[int]], max_new_tokens: int, eos: list[int], pad: int) -> list[list[int]]:
    """Greedy answers of a left-padded batch, each cut after its first EOS."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=pad)
    answers = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        answers.append(row[:cut])
    return answers


def run(base: Optional[str], prompts_path: Path, num_prompts: int, rounds: int, max_new_tokens: int,
        padded_batch: int, slots: int, threads: int, say: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    from streamspec.models.batched import Job, SlotDecoder
    from streamspec.models.distill import _eos_ids, prompt_ids, read_prompts
    from streamspec.models.loading import load_base_model, load_tokenizer, resolve_base
    from streamspec.models.model import build_model

    if min(num_prompts, rounds, max_new_tokens, padded_batch, slots, threads) < 1:
        raise StreamspecError("--num-prompts, --rounds, --max-new-tokens, --padded-batch, --slots and --threads "
                              "must be at least 1.")
    torch.set_num_threads(threads)
    folder = resolve_base(base)
    tokenizer = load_tokenizer(folder)
    records = read_prompts(prompts_path, num_prompts * rounds)
    if len(records) < num_prompts * rounds:
        raise StreamspecError(f"{prompts_path} holds {len(records)} prompts; {num_prompts} x {rounds} rounds are needed.")
    prompts = [prompt_ids(tokenizer, r["messages"], r["id"]) for r in records]
    eos = _eos_ids(folder, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    hf = load_base_model(folder)
    ours = build_model(folder)

    def continuous(chunk: list[list[int]]) -> list[list[int]]:
        decoder = SlotDecoder(ours, min(slots, len(chunk)), max(len(p) for p in chunk) + max_new_tokens)
        done = dict((job.key, tokens) for job, tokens in decoder.decode(
            [Job(i, p, max_new_tokens) for i, p in enumerate(chunk)], eos))
        return [done[i] for i in range(len(chunk))]

    runners: dict[str, Callable[[list[list[int]]], list[list[int]]]] = {
        "one-at-a-time": lambda chunk: [_hf_generate(hf, [p], max_new_tokens, eos, pad)[0] for p in chunk],
        "padded-batch": lambda chunk: [a for i in range(0, len(chunk), padded_batch)
                                       for a in _hf_generate(hf, chunk[i:i + padded_batch], max_new_tokens, eos, pad)],
        "continuous": continuous,
    }
    seconds = {name: 0.0 for name in SYSTEMS}
    answers: dict[str, list[list[int]]] = {name: [] for name in SYSTEMS}
    for r in range(rounds):
        chunk = prompts[r * num_prompts:(r + 1) * num_prompts]
        order = SYSTEMS if r % 2 == 0 else tuple(reversed(SYSTEMS))
        for name in order:
            say(f"round {r + 1}/{rounds}: {name} ({len(chunk)} prompts)")
            start = time.perf_counter()
            answers[name].extend(runners[name](chunk))
            seconds[name] += time.perf_counter() - start
    reference = answers["one-at-a-time"]
    rows = []
    for name in SYSTEMS:
        tokens = sum(len(a) for a in answers[name])
        rows.append({"system": name, "answers": len(answers[name]), "seconds": seconds[name],
                     "answers_per_hour": 3600 * len(answers[name]) / seconds[name],
                     "tokens_per_second": tokens / seconds[name],
                     "equal_to_one_at_a_time": sum(a == b for a, b in zip(answers[name], reference))})
    base_rate = rows[0]["answers_per_hour"]
    for row in rows:
        row["speedup"] = row["answers_per_hour"] / base_rate
    return {"date": time.strftime("%Y-%m-%d"), "prompts": str(prompts_path), "num_prompts": num_prompts,
            "rounds": rounds, "max_new_tokens": max_new_tokens, "padded_batch": padded_batch, "slots": slots,
            "threads": threads, "systems": rows}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamspec.tools.bench_distill", description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="default", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--prompts", required=True, type=Path, help="a prompts file as `streamspec distill` reads")
    parser.add_argument("--num-prompts", type=int, default=32, help="prompts per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each on new prompts, systems alternated")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer")
    parser.add_argument("--padded-batch", type=int, default=16, help="prompts per padded transformers batch")
    parser.add_argument("--slots", type=int, default=48, help="sequences decoded together by continuous batching")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", type=Path, default=Path("distill-bench.json"), help="where to write the report")
    args = parser.parse_args(argv)
    try:
        report = run(args.base, args.prompts, args.num_prompts, args.rounds, args.max_new_tokens, args.padded_batch,
                     args.slots, args.threads, say=lambda m: print(m, file=sys.stderr))
        from streamspec.files import write_json

        write_json(args.json, report)
    except StreamspecError as error:
        print(f"bench_distill: {error}", file=sys.stderr)
        return 1
    print(f"{'system':<15} {'answers/h':>10} {'tok/s':>7} {'speed-up':>8} {'same as one-at-a-time':>22}")
    for row in report["systems"]:
        print(f"{row['system']:<15} {row['answers_per_hour']:>10.0f} {row['tokens_per_second']:>7.1f} "
              f"{row['speedup']:>7.2f}x {row['equal_to_one_at_a_time']:>14}/{row['answers']}")
    print(f"report written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
