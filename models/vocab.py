"""The reduced drafting vocabulary: the tokens that stream rows and the early-exit head
score at deployment.

On SmolLM2 the LM head (49,152 × 576, 113 MB in fp32) is read in full by every head
MatMul; the main stream must keep it (verification is exact), but the draft node's
stream rows and the early-exit head only propose candidates, so they may score the
tokens that the training answers use most. A draft outside that set is simply never
proposed; acceptance, not exactness, pays for it.

    python -m streamspec.models.vocab CKPT --data D.jsonl --size 8192

chooses the `size` most frequent answer tokens of the training split (the end-of-
sequence ids always) and stores them in the checkpoint (`draft_vocab.safetensors`,
described in its streamspec.json); `streamspec train --draft-vocab N` does the same at
the end of training. `streamspec export` uses it unless told `--full-draft-vocab`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from .checkpoint import VOCAB_FILE, load_draft_vocab, read_checkpoint_info, save_draft_vocab
from .errors import StreamspecError

# The vocabulary's file in a checkpoint is the checkpoint format's (checkpoint.py): re-exported here.
__all__ = ["VOCAB_FILE", "choose_draft_vocab", "coverage", "load_draft_vocab", "main", "save_draft_vocab"]


def choose_draft_vocab(answers: Sequence[Sequence[int]], vocab_size: int, size: int,
                       always: Sequence[int] = ()) -> tuple[torch.Tensor, float]:
    """The `size` most frequent tokens of `answers` plus `always`, as sorted int64 ids
    [V'], and the share of answer tokens they cover."""
    if not 1 <= size < vocab_size:
        raise StreamspecError(f"The drafting vocabulary must have between 1 and {vocab_size - 1} tokens, got {size}.")
    tokens = torch.tensor([t for answer in answers for t in answer], dtype=torch.int64)
    if not len(tokens):
        raise StreamspecError("There are no answer tokens to choose a drafting vocabulary from.")
    counts = torch.bincount(tokens, minlength=vocab_size)
    chosen = set(torch.argsort(counts, descending=True, stable=True)[:size].tolist()) | {int(t) for t in always}
    ids = torch.tensor(sorted(chosen), dtype=torch.int64)
    return ids, coverage(ids, answers)


def coverage(ids: torch.Tensor, answers: Sequence[Sequence[int]]) -> float:
    """The share of the answers' tokens that are in `ids` (0 when there are none)."""
    tokens = torch.tensor([t for answer in answers for t in answer], dtype=torch.int64)
    return float(torch.isin(tokens, ids).float().mean()) if len(tokens) else 0.0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamspec.models.vocab",
                                     description="Choose a checkpoint's reduced drafting vocabulary.")
    parser.add_argument("checkpoint", help="a checkpoint folder written by `streamspec train`")
    parser.add_argument("--data", required=True, help="the JSONL the checkpoint was trained on (`streamspec distill`)")
    parser.add_argument("--size", type=int, default=8192, help="tokens to keep (most frequent in the answers)")
    args = parser.parse_args(argv)
    try:
        from .data import read_records

        info = read_checkpoint_info(args.checkpoint)
        records = read_records(args.data, info.model.vocab_size)
        train = [r.answer_ids for r in records if r.split == "train"]
        ids, train_share = choose_draft_vocab(train, info.model.vocab_size, args.size, info.model.eos_token_ids)
        heldout = [r.answer_ids for r in records if r.split != "train"]
        heldout_share = coverage(ids, heldout) if heldout else None
        save_draft_vocab(info.folder, ids, train_share, heldout_share)
    except StreamspecError as error:
        print(f"vocab: {error}", file=sys.stderr)
        return 1
    heldout_text = f", {heldout_share:.1%} of the held-out ones" if heldout_share is not None else ""
    print(f"{args.checkpoint}: drafting vocabulary of {len(ids)} tokens, {train_share:.1%} of the training answer "
          f"tokens{heldout_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
