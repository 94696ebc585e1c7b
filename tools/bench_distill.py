"""Distillation throughput: answers per hour of three ways to get greedy answers.

    streamspec bench distill --prompts P.jsonl --num-prompts 32 --json distill-bench.json

(`python -m streamspec.tools.bench_distill ...` runs the same command.) On the same
prompts, in one process, alternating the systems each round (A B C, then C B A: the
harness's loop with a round's prompts as one turn) so that drifting machine load hits
all alike:

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

import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from streamspec.errors import StreamspecError
from streamspec.tools.cli import bench_main
from streamspec.tools.harness import Arm, Output, Turn, measure

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
    arms = [Arm(name, lambda chunk, answer=runners[name]: Output(answer(chunk))) for name in SYSTEMS]
    rounds_of_prompts = [prompts[r * num_prompts:(r + 1) * num_prompts] for r in range(rounds)]

    def show(turn: Turn) -> None:
        say(f"round {turn.prompt + 1}/{rounds}: {turn.arm} ({len(rounds_of_prompts[turn.prompt])} prompts)")

    measured = measure(arms, rounds_of_prompts, repeats=1, show=show)
    reference = [a for run in measured.firsts(SYSTEMS[0]) for a in run.ids]
    rows = []
    for name in SYSTEMS:
        answers = [a for run in measured.firsts(name) for a in run.ids]
        seconds = sum(run.seconds for run in measured.firsts(name))
        tokens = sum(len(a) for a in answers)
        rows.append({"system": name, "answers": len(answers), "seconds": seconds,
                     "answers_per_hour": 3600 * len(answers) / seconds, "tokens_per_second": tokens / seconds,
                     "equal_to_one_at_a_time": sum(a == b for a, b in zip(answers, reference))})
    base_rate = rows[0]["answers_per_hour"]
    for row in rows:
        row["speedup"] = row["answers_per_hour"] / base_rate
    return {"date": time.strftime("%Y-%m-%d"), "prompts": str(prompts_path), "num_prompts": num_prompts,
            "rounds": rounds, "max_new_tokens": max_new_tokens, "padded_batch": padded_batch, "slots": slots,
            "threads": threads, "systems": rows}


main = bench_main("distill")  # python -m streamspec.tools.bench_distill ARGS: streamspec bench distill ARGS

if __name__ == "__main__":
    sys.exit(main())
