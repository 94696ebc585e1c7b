"""The step graph: one forward pass of the engine, as a traceable `nn.Module`.

Inputs (N tree nodes, M rows to compact, L nodes whose streams are wanted, O nodes
whose outputs are wanted, C cache rows, γ streams, K candidates):

    input_ids    int64 [N]        tokens of the tree nodes (a prompt is a chain)
    positions    int64 [N]        past_length + depth
    tree_mask    bool  [N, N]     node j is node i or one of its ancestors
    tree_parent  int32 [N]        parent node, -1 for the root
    past_length  int64 [1]        committed cache rows, counting the M compacted ones
    compact_src  int64 [M]        cache rows that move to [past_length - M, past_length)
    stream_nodes int64 [L]        nodes that get stream rows (all for a tree, none for AR)
    output_nodes int64 [O]        nodes whose main-stream outputs come out
    sample_rows  int64 [S]        rows of output_nodes to sample (none when greedy)
    exit_nodes   int64 [E]        nodes whose early-exit outputs come out (tree pruning)
    temperature  float32 [1], top_k int64 [1], top_p float32 [1], uniform float32 [S]
    key_cache.i, value_cache.i  [1, KV, C, D]  per layer, written in place

Outputs:

    main_ids, main_probs      [O, K]      main stream top-K (probabilities at T = 1)
    sampled_ids               [S]         exact draw under temperature / top-k / top-p
    draft_node                [1]         the node whose streams come out (-1: none)
    stream_ids, stream_probs  [γ, K]      stream j of draft_node: the token j after its next
    exit_ids, exit_probs      [E, K]      early-exit top-K (for tree pruning)
    logits                    [O, V]      only when exported with full logits
    key_cache_out.i, value_cache_out.i    the caches (same buffers as the inputs)

Only the selected rows go through the LM head (and the sampler), so a prefill computes
logits for its last token only, greedy decoding samples nothing and autoregressive
steps of an MSA model run no stream rows at all.

The next draft comes from the streams of the last node the step accepts, so the graph
runs the acceptance walk itself (the same rule as `runtime.tree.accept`, with the same
choices: the argmax, or the sampled token where `sample_rows` asks for one) and puts
only that node's γ stream rows through the LM head: the draft node is the deepest
stream node whose ancestors' choices all equal their child's token on its path. Nodes
whose parent has no output (a prompt's) count as accepted, so a prefill drafts from
its last token. The engine checks that `draft_node` is the end of its own path.

Tree pruning (docs/design.md) needs the host between the lower and the upper layers, so a
folder exported with pruning also holds the step cut in two graphs that share the KV
cache buffers (layers [0, m) and [m, L), m = the first MSA layer):

    lower.onnx   input_ids, positions, tree_mask, tree_parent, past_length, compact_src
                 + exit_parents [P] (nodes whose early-exit distribution is needed),
                 exit_nodes [E] (nodes to score), exit_rows [E] (their parent's index in
                 exit_parents) -> hidden [N, D] at the insertion layer, exit_scores [E]:
                 the probability of node e's token under its parent's early-exit
                 distribution, and the lower layers' caches
    upper.onnx   hidden [N, D] and kept_nodes [K] (the nodes that survive pruning), then
                 the step inputs of the K kept nodes (tree re-indexed) -> the step outputs

The lower layers write rows for all N nodes, the upper layers for the K kept ones; the
engine compacts each group with its own indices (runtime/session.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from streamspec.models.model import Transformer

from . import ops  # noqa: F401  (registers torch.ops.streamspec.*)

STEP_INPUTS = ("input_ids", "positions", "tree_mask", "tree_parent", "past_length", "compact_src",
               "stream_nodes", "output_nodes", "sample_rows", "exit_nodes", "temperature", "top_k", "top_p",
               "uniform")


LOWER_INPUTS = ("input_ids", "positions", "tree_mask", "tree_parent", "past_length", "compact_src", "exit_parents",
                "exit_nodes", "exit_rows")
UPPER_INPUTS = ("hidden", "kept_nodes") + tuple(n for n in STEP_INPUTS if n != "exit_nodes")


def cache_names(num_layers: int, suffix: str = "", first: int = 0) -> list[str]:
    """["key_cache.0", "value_cache.0", ...] for layers [first, num_layers) (suffix "_out"
    for the outputs)."""
    return [f"{kind}_cache{suffix}.{i}" for i in range(first, num_layers) for kind in ("key", "value")]


def output_names(model: Transformer, full_logits: bool, part: str = "step") -> list[str]:
    """The outputs of the whole step graph ("step") or of its "lower" / "upper" part."""
    first, last = part_layers(model, part)
    if part == "lower":
        return ["hidden", "exit_scores"] + cache_names(last, "_out")
    names = ["main_ids", "main_probs", "sampled_ids"]
    if model.num_streams:
        names += ["draft_node", "stream_ids", "stream_probs"]
        if part == "step":
            names += ["exit_ids", "exit_probs"]
    if full_logits:
        names.append("logits")
    return names + cache_names(last, "_out", first)


class GraphAttention:
    """Attention backend for tracing: every layer becomes one `streamspec::tree_attention`.

    It records each layer's cache outputs so that the step can return them.
    """

    def __init__(self, caches: list[torch.Tensor], step: dict[str, torch.Tensor], msa_start: int,
                 num_streams: int, first_layer: int = 0):
        self.caches = caches  # layers [first_layer, first_layer + len(caches) / 2)
        self.step = step
        self.msa_start = msa_start
        self.num_streams = num_streams
        self.first_layer = first_layer
        self.present: list[Optional[torch.Tensor]] = [None] * len(caches)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float) -> torch.Tensor:
        """q [1, H, R, D], k, v [1, KV, R, D] -> [1, H, R, D]."""
        _, heads, rows, dim = q.shape
        kv_heads = k.shape[1]
        index = 2 * (layer - self.first_layer)
        key_cache, value_cache = self.caches[index], self.caches[index + 1]
        # RoPE tables are float32, so a float16 model's q and k arrive as float32.
        as_rows = lambda t, h: t.transpose(1, 2).reshape(1, rows, h * dim).to(key_cache.dtype)  # noqa: E731
        s = self.step
        out, key_out, value_out = torch.ops.streamspec.tree_attention(
            as_rows(q, heads), as_rows(k, kv_heads), as_rows(v, kv_heads), key_cache, value_cache,
            s["past_length"], s["tree_mask"], s["tree_parent"], s["stream_nodes"], s["compact_src"],
            heads, kv_heads, float(scale), self.num_streams if layer >= self.msa_start else 0)
        self.present[index], self.present[index + 1] = key_out, value_out
        return out.reshape(1, rows, heads, dim).transpose(1, 2).to(v.dtype)


class StepGraph(nn.Module):
    """`Transformer` -> the step graph described in the module docstring."""

    def __init__(self, model: Transformer, candidates: int = 8, full_logits: bool = False):
        super().__init__()
        self.model = model
        # Stream rows and the early-exit head score the reduced drafting vocabulary when
        # the model has one (models/vocab.py); the main stream always the whole one.
        self.draft_vocab = model.draft_vocab  # [V'] sorted token ids, or None
        draft_size = model.config.vocab_size if self.draft_vocab is None else len(self.draft_vocab)
        self.candidates = min(candidates, draft_size)
        self.full_logits = full_logits

    def _attention(self, caches, past_length, tree_mask, tree_parent, stream_nodes, compact_src,
                   first_layer: int = 0) -> GraphAttention:
        """The tracing attention backend over `caches` (layers from `first_layer` on)."""
        model = self.model
        step = dict(past_length=past_length, tree_mask=tree_mask, tree_parent=tree_parent,
                    stream_nodes=stream_nodes, compact_src=compact_src)
        return GraphAttention(caches, step, model.msa_start, model.num_streams, first_layer)

    def _top(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., V] float32 -> ids [..., K] and their softmax probabilities [..., K].

        TopK runs on the logits, not on probabilities, so the order (and greedy's
        argmax) is never changed by rounding in the softmax.
        """
        ids = torch.topk(logits, self.candidates, dim=-1).indices
        return ids, torch.gather(torch.softmax(logits, dim=-1), -1, ids)

    def _draft_top(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`_top` of drafting logits [..., V'] (stream or early-exit), ids as token ids."""
        ids, probs = self._top(logits)
        return (ids if self.draft_vocab is None else self.draft_vocab[ids]), probs

    def _draft(self, stream_rows, input_ids, positions, tree_mask, tree_parent, stream_nodes, output_nodes,
               choice):
        """The draft node ([1], -1 when no stream node) and its γ final stream rows [γ, D].

        stream_rows [L*γ, D]; choice [O]: the token the main stream picks at each output node.
        """
        g = self.model.num_streams
        node_choice = torch.full_like(input_ids, -1).index_put((output_nodes,), choice)  # [N]
        parent = tree_parent.long()
        parent_choice = node_choice[parent.clamp(min=0)]
        ok = (parent < 0) | (parent_choice < 0) | (input_ids == parent_choice)
        accepted = ~(tree_mask & ~ok[None, :]).any(dim=-1)  # every ancestor-or-self is ok
        depth = torch.where(accepted[stream_nodes], positions[stream_nodes], -1)
        # A sentinel entry makes the choice total: index L (no stream node) picks zeros.
        pick = torch.argmax(torch.cat([depth, depth.new_full((1,), -2)]))
        rows = stream_rows.reshape(stream_nodes.shape[0], g, -1)
        rows = torch.cat([rows, rows.new_zeros((1,) + rows.shape[1:])])
        nodes = torch.cat([stream_nodes, stream_nodes.new_full((1,), -1)])
        return nodes[pick].reshape(1), rows[pick]

    def _outputs(self, hidden, x, input_ids, positions, tree_mask, tree_parent, stream_nodes, output_nodes,
                 sample_rows, temperature, top_k, top_p, uniform) -> list[torch.Tensor]:
        """The step's outputs (without the caches) from the last layer's rows x [1, R, D]."""
        model = self.model
        main_logits = model.head(x[:, output_nodes])[0].float()  # [O, V]
        main_ids, main_probs = self._top(main_logits)
        sampled = torch.ops.streamspec.sample_tokens(main_logits[sample_rows], temperature, top_k, top_p, uniform)
        outputs = [main_ids, main_probs, sampled]
        if model.num_streams:
            choice = main_ids[:, 0].index_put((sample_rows,), sampled)  # [O]
            draft_node, draft_rows = self._draft(x[0, hidden.shape[1]:], input_ids, positions, tree_mask, tree_parent,
                                                 stream_nodes, output_nodes, choice)
            stream_logits = model.head(draft_rows[None], self.draft_vocab)[0].float()  # [γ, V or V']
            outputs += [draft_node, *self._draft_top(stream_logits)]
        if self.full_logits:
            outputs.append(main_logits)
        return outputs

    def forward(self, input_ids, positions, tree_mask, tree_parent, past_length, compact_src, stream_nodes,
                output_nodes, sample_rows, exit_nodes, temperature, top_k, top_p, uniform,
                caches: list[torch.Tensor]):
        model = self.model
        attention = self._attention(caches, past_length, tree_mask, tree_parent, stream_nodes, compact_src)
        tokens, rows = input_ids[None], positions[None]
        hidden = model.lower(tokens, rows, attention)
        x = self.model.msa_layers(hidden, rows, attention, stream_nodes)
        outputs = self._outputs(hidden, x, input_ids, positions, tree_mask, tree_parent, stream_nodes, output_nodes,
                                sample_rows, temperature, top_k, top_p, uniform)
        if model.num_streams:
            exit_logits = model.exit_head(hidden[:, exit_nodes], self.draft_vocab)[0].float()
            outputs[6:6] = self._draft_top(exit_logits)  # after stream_ids, stream_probs
        return tuple(outputs + attention.present)


class LowerGraph(StepGraph):
    """The layers below the MSA layers and the early-exit scores (lower.onnx)."""

    def forward(self, input_ids, positions, tree_mask, tree_parent, past_length, compact_src, exit_parents,
                exit_nodes, exit_rows, caches: list[torch.Tensor]):
        model = self.model
        # The lower layers have no stream rows: an empty stream_nodes.
        attention = self._attention(caches, past_length, tree_mask, tree_parent, exit_nodes[:0], compact_src)
        hidden = model.lower(input_ids[None], positions[None], attention)  # [1, N, D]
        # One exit-head row per parent (siblings share it): [P, V or V'] -> log-probabilities.
        logits = model.exit_head(hidden[:, exit_parents], self.draft_vocab)[0].float()
        exit_logprobs = torch.log_softmax(logits, dim=-1)
        tokens = input_ids[exit_nodes]  # [E]
        if self.draft_vocab is None:
            scores = exit_logprobs[exit_rows, tokens].exp()
        else:  # a token outside the drafting vocabulary scores 0
            column = torch.full((model.config.vocab_size,), -1, dtype=torch.int64)
            column[self.draft_vocab] = torch.arange(len(self.draft_vocab))
            column = column[tokens]
            scores = torch.where(column >= 0, exit_logprobs[exit_rows, column.clamp(min=0)].exp(), 0.0)
        return (hidden[0], scores, *attention.present)


class UpperGraph(StepGraph):
    """The MSA layers and the heads over the kept nodes' hidden rows (upper.onnx)."""

    def forward(self, hidden, kept_nodes, input_ids, positions, tree_mask, tree_parent, past_length, compact_src,
                stream_nodes, output_nodes, sample_rows, temperature, top_k, top_p, uniform,
                caches: list[torch.Tensor]):
        model = self.model
        attention = self._attention(caches, past_length, tree_mask, tree_parent, stream_nodes, compact_src,
                                    first_layer=model.msa_start)
        kept = hidden[kept_nodes][None]  # [1, K, D]
        x = self.model.msa_layers(kept, positions[None], attention, stream_nodes)
        outputs = self._outputs(kept, x, input_ids, positions, tree_mask, tree_parent, stream_nodes, output_nodes,
                                sample_rows, temperature, top_k, top_p, uniform)
        return tuple(outputs + attention.present)


PARTS = {"step": StepGraph, "lower": LowerGraph, "upper": UpperGraph}


def part_layers(model: Transformer, part: str = "step") -> tuple[int, int]:
    """The layers [first, last) whose caches the step graph or its part holds."""
    return {"step": (0, model.config.num_layers), "lower": (0, model.msa_start),
            "upper": (model.msa_start, model.config.num_layers)}[part]


def input_names(model: Transformer, part: str = "step") -> list[str]:
    first, last = part_layers(model, part)
    names = {"step": STEP_INPUTS, "lower": LOWER_INPUTS, "upper": UPPER_INPUTS}[part]
    return list(names) + cache_names(last, first=first)


def example_inputs(model: Transformer, cache_length: int, part: str = "step") -> tuple:
    """Inputs for tracing. Every dynamic size is >= 2 and distinct, so that
    `torch.export` specialises none of them (it does so for sizes 0 and 1)."""
    n, l, o, s, e = 5, 3, 4, 6, 7  # nodes, stream nodes, output nodes, sample rows, exit nodes
    cfg = model.config
    dtype = next(model.parameters()).dtype
    first, last = part_layers(model, part)
    caches = [torch.zeros(1, cfg.num_kv_heads, cache_length, cfg.head_dim, dtype=dtype)
              for _ in range(2 * (last - first))]
    tree = (torch.arange(n, dtype=torch.int64) + 10, torch.arange(n, dtype=torch.int64) + 10,
            torch.tril(torch.ones(n, n, dtype=torch.bool)), torch.arange(-1, n - 1, dtype=torch.int32),
            torch.tensor([10]), torch.tensor([11, 12]))
    sampling = (torch.tensor([1.0]), torch.tensor([0]), torch.tensor([1.0]), torch.full((s,), 0.5))
    selection = (torch.arange(l, dtype=torch.int64), torch.arange(o, dtype=torch.int64), torch.arange(s) % o)
    if part == "lower":  # 3 parents, 4 scored nodes
        return (*tree, torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 2]), caches)
    if part == "upper":  # 8 hidden rows from the lower graph, n of them kept
        hidden = torch.zeros(n + 3, cfg.hidden_size, dtype=dtype)
        return (hidden, torch.arange(n, dtype=torch.int64) + 2, *tree, *selection, *sampling, caches)
    return (*tree, *selection, torch.arange(e) % n, *sampling, caches)


def dynamic_shapes(model: Transformer, part: str = "step") -> tuple:
    """torch.export dynamic dimensions matching `example_inputs`."""
    dim = torch.export.Dim
    n, m = dim("nodes", min=1, max=1 << 16), dim("compacted", min=0, max=1 << 10)
    l, o = dim("stream_nodes", min=0, max=1 << 16), dim("output_nodes", min=1, max=1 << 16)
    s, e = dim("sample_rows", min=0, max=1 << 16), dim("exit_nodes", min=0, max=1 << 16)
    c = dim("cache_length", min=16, max=1 << 20)
    first, last = part_layers(model, part)
    cache = [{2: c} for _ in range(2 * (last - first))]
    tree = ({0: n}, {0: n}, {0: n, 1: n}, {0: n}, None, {0: m})
    sampling = (None, None, None, {0: s})
    selection = ({0: l}, {0: o}, {0: s})
    if part == "lower":
        p = dim("exit_parents", min=0, max=1 << 16)
        return (*tree, {0: p}, {0: e}, {0: e}, cache)
    if part == "upper":
        rows = dim("hidden_rows", min=1, max=1 << 16)
        return ({0: rows}, {0: n}, *tree, *selection, *sampling, cache)
    return (*tree, *selection, {0: e}, *sampling, cache)
