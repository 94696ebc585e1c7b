"""Continuous batching on a CPU: many prompts per forward pass, for self-distillation.

Distillation needs tens of thousands of answers from the base model. One prompt at a
time wastes a CPU on per-layer overhead (a 1-row step of SmolLM2-135M costs nearly as
much as a 16-row one); a padded batch (`transformers` `generate`) wastes it on padding,
on rows whose answer already ended, and on copying its growing cache every step. Here a
fixed number of *slots* share one preallocated KV cache; every step decodes one token
for every slot, and a slot whose answer ended takes the next prompt at once (prefilled
alone, then it joins the batch). Nothing is padded except the unused tail of the cache.

    key cache, value cache per layer: [slots, kv_heads, max_length, head_dim]
    slot s holds one sequence in rows [0, length[s])

A slot's rows only ever see that slot's own cache rows [0, its position], so its logits
are the model's logits for that sequence: greedy answers equal one-at-a-time greedy
decoding up to float rounding (other matrix shapes; a near-tie of the top two logits
may flip, tests/test_distill.py).

`decode` serves both jobs of self-distillation: writing prompts (sampling) and
answering them (greedy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from streamspec.runtime.sampling import SamplingParams, TokenChooser

from .errors import StreamspecError
from .model import Transformer

NEG_INF = float("-inf")
SAMPLE_CANDIDATES = 64  # sampling looks at the 64 best logits; top_k must not exceed it


@dataclass
class Job:
    """One sequence to continue: `key` names it in the results."""

    key: object
    prompt: Sequence[int]
    max_new_tokens: int
    sampling: Optional[SamplingParams] = None  # None: greedy


class SlotAttention:
    """Attention backend of `Transformer` over the slot cache.

    The step's rows of slot slots[b] sit at positions length[b] .. length[b] + R - 1;
    their keys and values are written there, and row r sees the slot's cache rows
    [0, length[b] + r] (causal). Prefill (length 0, R prompt rows) and decode (R = 1)
    are the same call.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor],
                 slots: torch.Tensor, lengths: torch.Tensor, rows: int):
        self.keys, self.values = keys, values
        self.slots, self.lengths, self.rows = slots, lengths, rows
        self.span = int(lengths.max()) + rows  # cache rows any query of the step may see
        key_pos = torch.arange(self.span)
        query_pos = lengths[:, None] + torch.arange(rows)[None]  # [B, R]
        visible = key_pos[None, None, :] <= query_pos[:, :, None]  # [B, R, span]
        self.bias = torch.zeros(visible.shape).masked_fill_(~visible, NEG_INF)[:, None]  # [B, 1, R, span]
        self.contiguous = bool(torch.equal(slots, torch.arange(keys[0].shape[0])))

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float) -> torch.Tensor:
        """q: [B, H, R, D]; k, v: [B, KV, R, D] (RoPE applied). Returns [B, H, R, D]."""
        b, h, r, d = q.shape
        kv = k.shape[1]
        groups = h // kv
        key_cache, value_cache = self.keys[layer], self.values[layer]
        positions = (self.lengths[:, None] + torch.arange(r)[None])  # [B, R]
        # cache[slot, :, position] = k[b, :, row]  (advanced indexing: [B, R, KV, D])
        key_cache[self.slots[:, None], :, positions] = k.transpose(1, 2)
        value_cache[self.slots[:, None], :, positions] = v.transpose(1, 2)
        if self.contiguous:  # every slot in order: a view, no copy
            keys, values = key_cache[:, :, :self.span], value_cache[:, :, :self.span]
        else:
            keys, values = key_cache[self.slots, :, :self.span], value_cache[self.slots, :, :self.span]
        # Grouped-query attention without repeating keys: head h uses kv head h // groups,
        # so the queries of one kv head's group become rows: [B, KV, groups * R, D].
        q = q.reshape(b, kv, groups * r, d)
        bias = self.bias if groups == 1 else self.bias.repeat(1, 1, groups, 1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias.to(q.dtype), scale=scale)
        return out.reshape(b, h, r, d)


class SlotDecoder:
    """Decode many sequences at once with a base `Transformer` (no streams)."""

    def __init__(self, model: Transformer, slots: int, max_length: int):
        if slots < 1:
            raise StreamspecError(f"The batch size must be at least 1, got {slots}.")
        cfg = model.config
        self.model = model.eval()
        self.num_slots = slots
        self.max_length = max_length
        shape = (slots, cfg.num_kv_heads, max_length, cfg.head_dim)
        dtype = model.embed.weight.dtype
        self.keys = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_layers)]

    @torch.inference_mode()
    def _logits(self, tokens: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens [B, R] at positions lengths[b] + r of slots[b] -> last row's logits [B, V]."""
        attention = SlotAttention(self.keys, self.values, slots, lengths, tokens.shape[1])
        positions = lengths[:, None] + torch.arange(tokens.shape[1])[None]
        hidden = self.model.lower(tokens, positions, attention)  # every layer: the model has no streams
        return self.model.head(hidden[:, -1:])[:, 0].float()

    def decode(self, jobs: Iterable[Job], eos_ids: Iterable[int],
               on_start: Optional[Callable[[Job], None]] = None) -> Iterator[tuple[Job, list[int]]]:
        """Yield (job, new tokens) as each job finishes, in finishing order.

        A job ends after its first EOS token (kept) or after max_new_tokens tokens.
        Jobs are taken from `jobs` lazily, one whenever a slot frees up.
        """
        eos = set(eos_ids)
        pending = iter(jobs)
        running: list[Optional[tuple[Job, list[int], Optional[TokenChooser]]]] = [None] * self.num_slots
        lengths = torch.zeros(self.num_slots, dtype=torch.long)
        last = torch.zeros(self.num_slots, dtype=torch.long)  # the token each slot feeds next
        exhausted = False
        while True:
            # Fill free slots: prefill each new prompt alone (its own row count, no padding).
            for slot in range(self.num_slots):
                while running[slot] is None and not exhausted:
                    job = next(pending, None)
                    if job is None:
                        exhausted = True
                        break
                    self._check(job)
                    if on_start:
                        on_start(job)
                    chooser = TokenChooser(job.sampling) if job.sampling else None
                    logits = self._logits(torch.tensor([list(job.prompt)]), torch.tensor([slot]),
                                          torch.zeros(1, dtype=torch.long))
                    token = _choose(logits[0], chooser)
                    if token in eos or job.max_new_tokens == 1:
                        yield job, [token]
                        continue
                    running[slot] = (job, [token], chooser)
                    lengths[slot] = len(job.prompt)
                    last[slot] = token
            active = [s for s in range(self.num_slots) if running[s] is not None]
            if not active:
                return
            # One token for every slot; idle slots decode junk at position 0 (their rows
            # are never read), which keeps the cache a view instead of a gather.
            logits = self._logits(last[:, None], torch.arange(self.num_slots), lengths)
            greedy = logits.argmax(-1).tolist()
            for slot in active:
                job, tokens, chooser = running[slot]
                token = greedy[slot] if chooser is None else _choose(logits[slot], chooser)
                tokens.append(token)
                lengths[slot] += 1
                last[slot] = token
                if token in eos or len(tokens) >= job.max_new_tokens:
                    running[slot] = None
                    lengths[slot] = 0
                    yield job, tokens

    def _check(self, job: Job) -> None:
        if not job.prompt:
            raise StreamspecError(f"Prompt {job.key!r} is empty.")
        if job.max_new_tokens < 1:
            raise StreamspecError(f"max_new_tokens must be at least 1, got {job.max_new_tokens}.")
        if len(job.prompt) + job.max_new_tokens > self.max_length:
            raise StreamspecError(
                f"Prompt {job.key!r} ({len(job.prompt)} tokens) plus {job.max_new_tokens} new tokens does not "
                f"fit in the batch's maximum length of {self.max_length}.")
        if job.sampling and not job.sampling.greedy and not 1 <= job.sampling.top_k <= SAMPLE_CANDIDATES:
            raise StreamspecError(f"Sampling here needs 1 <= top_k <= {SAMPLE_CANDIDATES}.")


def _choose(logits: torch.Tensor, chooser: Optional[TokenChooser]) -> int:
    """Greedy argmax, or the chooser's draw among the SAMPLE_CANDIDATES best logits
    (exact for its top_k <= SAMPLE_CANDIDATES: the others have no mass)."""
    if chooser is None:
        return int(logits.argmax())
    top = torch.topk(logits, SAMPLE_CANDIDATES)
    return int(top.indices[chooser(top.values.numpy().astype(np.float64))])
