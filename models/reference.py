"""The PyTorch reference decoder: speculate, verify, prune, in a few dozen lines.

It is the oracle for the ONNX Runtime engine: same tree building and acceptance
(`streamspec.runtime.tree`, numpy), model calls in PyTorch.

    prefill(prompt)                      -> correction token c, draft from the last row's streams
    loop:
      tree  = [c] + best `budget` draft nodes          (runtime.tree.build_tree)
      step  = model(tree tokens, past + depth, tree mask, KV cache)
      path, c = accept(tree, main stream's choice)    (runtime.tree.accept)
      emit tree tokens on the path (after the root) and c
      compact the path's KV rows to [past, past + len(path)); past += len(path)
      draft from the streams of the path's last node
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from streamspec.runtime.sampling import SamplingParams, TokenChooser
from streamspec.runtime.tree import Tree, accept, build_tree, chain_tree, single_node_tree
from streamspec.runtime.tree_settings import TreeSettings

from .attention import EagerAttention, KVCache
from .errors import StreamspecError
from .model import Transformer


@dataclass
class Generation:
    tokens: list[int]  # the generated tokens (without the prompt)
    steps: int = 0  # forward passes after the prefill
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted per step

    @property
    def tokens_per_step(self) -> float:
        return len(self.tokens) / max(self.steps, 1)


class ReferenceDecoder:
    """Greedy or sampling generation with an MSA model (speculative) or any model (AR)."""

    def __init__(self, model: Transformer, max_length: int = 512, budget: int = TreeSettings().budget, top_k: int = 8):
        self.model = model.eval()
        self.max_length = max_length
        self.budget = TreeSettings(budget=budget).budget  # the engine's default and checks
        self.top_k = top_k

    @torch.no_grad()
    def _run(self, tree: Tree, cache: KVCache, past: int, with_streams: bool):
        tree_mask = torch.from_numpy(tree.ancestor_mask())[None]
        attention = EagerAttention(tree_mask, self.model.num_streams if with_streams else 0, cache, past)
        tokens = torch.from_numpy(tree.tokens)[None]
        positions = torch.from_numpy(tree.positions(past))[None]
        out = self.model(tokens, positions, attention, with_streams=with_streams)
        streams = None if out.stream_logits is None else out.stream_logits[0].float()
        return out.main_logits[0].float().numpy(), streams

    def _draft(self, stream_logits: Optional[torch.Tensor], node: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k token ids and probabilities of each stream of `node`: [γ, k] each."""
        probs = torch.softmax(stream_logits[node], dim=-1)
        top = torch.topk(probs, self.top_k, dim=-1)
        return top.indices.numpy(), top.values.numpy()

    def generate(self, prompt: Sequence[int], max_new_tokens: int, speculative: bool = True,
                 eos_ids: Sequence[int] = (), sampling: Optional[SamplingParams] = None) -> Generation:
        if len(prompt) == 0:
            raise StreamspecError("The prompt is empty.")
        if len(prompt) + max_new_tokens + self.budget + 1 > self.max_length:
            raise StreamspecError(
                f"The prompt ({len(prompt)} tokens) plus {max_new_tokens} new tokens and the tree "
                f"do not fit in the maximum length of {self.max_length}."
            )
        speculative = speculative and self.model.num_streams > 0
        choose = TokenChooser(sampling or SamplingParams())
        cfg = self.model.config
        cache = KVCache(cfg.num_layers, 1, cfg.num_kv_heads, self.max_length, cfg.head_dim)
        main, streams = self._run(chain_tree(prompt), cache, 0, speculative)
        past = len(prompt)
        correction = choose(main[-1])
        draft = self._draft(streams, len(prompt) - 1) if speculative else None
        result = Generation(tokens=[correction])
        eos = set(eos_ids)
        while len(result.tokens) < max_new_tokens and not eos.intersection(result.tokens):
            if speculative:
                tree = build_tree(correction, draft[0], draft[1], self.budget)
            else:
                tree = single_node_tree(correction)
            main, streams = self._run(tree, cache, past, speculative)
            path, correction = accept(tree, lambda node: choose(main[node]))
            cache.compact(past, path)
            past += len(path)
            result.steps += 1
            result.accepted.append(len(path) - 1)
            result.tokens.extend(int(t) for t in tree.tokens[path[1:]])
            result.tokens.append(correction)
            if speculative:
                draft = self._draft(streams, path[-1])
        return _truncate(result, max_new_tokens, eos)


def _truncate(result: Generation, max_new_tokens: int, eos: set) -> Generation:
    """Cut at the first end-of-sequence token (kept) and at max_new_tokens."""
    tokens = result.tokens[:max_new_tokens]
    for i, t in enumerate(tokens):
        if t in eos:
            tokens = tokens[:i + 1]
            break
    result.tokens = tokens
    return result
