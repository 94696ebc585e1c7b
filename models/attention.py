"""Attention masks and the eager attention backend of the PyTorch model.

The model computes queries, keys and values for the rows of a step and hands them to
an *attention backend*, which owns the KV cache and decides what each row may see.
`EagerAttention` is the PyTorch backend (training, the reference decoder, and the
tracing target of the exporter's backends, which replace it with ONNX Runtime ops).

Row layout of a step with N tree nodes and γ streams (docs/design.md):
  rows [0, N)               main rows, one per tree node
  row  N + n*γ + (j - 1)    stream j (1..γ) of node n   (MSA layers only)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def stream_row_mask(tree_mask: torch.Tensor, num_streams: int) -> torch.Tensor:
    """Visibility among the new rows of an MSA layer.

    tree_mask: [B, N, N] bool, tree_mask[b, i, j] = node j is an ancestor of node i or i itself.
    Returns [B, R, R] bool with R = N * (1 + γ):
      main row i   sees main rows j with tree_mask[i, j];
      stream (n,j) sees main rows m with tree_mask[n, m] and streams (n, 1..j).
    """
    batch, n, _ = tree_mask.shape
    g = num_streams
    rows = n * (1 + g)
    mask = torch.zeros(batch, rows, rows, dtype=torch.bool, device=tree_mask.device)
    mask[:, :n, :n] = tree_mask
    if g == 0:
        return mask
    # Stream rows inherit their node's view of the main rows: [B, N*γ, N].
    mask[:, n:, :n] = tree_mask.repeat_interleave(g, dim=1)
    # Stream j of a node sees streams 1..j of the same node: block-diagonal lower triangles.
    within = torch.tril(torch.ones(g, g, dtype=torch.bool, device=tree_mask.device))
    mask[:, n:, n:] = torch.block_diag(*([within] * n)).unsqueeze(0)
    return mask


def attention_bias(visible: torch.Tensor, past_length: int) -> torch.Tensor:
    """Additive bias [B, 1, R, past + R] from the visibility of the new rows [B, R, R].

    Every new row sees the whole committed cache [0, past).
    """
    batch, rows, _ = visible.shape
    new = torch.zeros(visible.shape, dtype=torch.float32, device=visible.device)
    new.masked_fill_(~visible, NEG_INF)
    past = torch.zeros(batch, rows, past_length, dtype=torch.float32, device=visible.device)
    return torch.cat([past, new], dim=-1).unsqueeze(1)


def causal_tree_mask(length: int, batch: int = 1, device=None) -> torch.Tensor:
    """The tree mask of a chain (prefill, training): [B, T, T] lower-triangular."""
    tri = torch.tril(torch.ones(length, length, dtype=torch.bool, device=device))
    return tri.unsqueeze(0).expand(batch, length, length)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """q [B, H, R, D], k and v [B, KV, C, D] (KV divides H), bias [B, 1, R, C] -> [B, H, R, D]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)


def stream_rows_bias(main_visible: torch.Tensor, num_streams: int) -> torch.Tensor:
    """Additive bias [B, 1, N*γ, C + N*γ] of stream rows over C given main rows and themselves.

    main_visible: [B, N, C] bool, main_visible[b, n, m] = node n sees main row m.
    Stream (n, j) sees the main rows node n sees and streams (n, 1..j), as in
    `stream_row_mask`; the main rows themselves are not among the queries.
    """
    batch, n, _ = main_visible.shape
    g = num_streams
    node = torch.arange(n * g, device=main_visible.device) // g
    index = torch.arange(n * g, device=main_visible.device) % g
    within = (node[:, None] == node[None, :]) & (index[None, :] <= index[:, None])  # [N*γ, N*γ]
    visible = torch.cat([main_visible.repeat_interleave(g, dim=1),
                         within.expand(batch, -1, -1)], dim=-1)
    return attention_bias(visible, 0)


class KVCache:
    """Fixed-size key/value buffers, one pair per layer: [B, kv_heads, max_length, head_dim].

    Rows [0, past) are committed. A step writes its main rows at [past, past + N); after
    acceptance `compact` moves the accepted nodes' rows to [past, past + accepted).
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_length: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, device=None):
        shape = (batch, kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_length = max_length

    def compact(self, past_length: int, accepted: list[int]) -> None:
        """Move rows past + accepted[i] to past + i (accepted ascending, accepted[i] >= i)."""
        src = torch.tensor(accepted, dtype=torch.long) + past_length
        dst = torch.arange(len(accepted)) + past_length
        for cache in self.keys + self.values:
            cache[:, :, dst] = cache[:, :, src]


class EagerAttention:
    """Scaled dot-product attention over [committed cache, new rows] with an additive bias.

    One instance serves one forward pass. `bias_for(rows)` gives the bias of a layer with
    that many new rows (N in lower layers, N*(1+γ) in MSA layers). Only the first
    `write_rows` new rows (the main rows) are written to the cache.
    """

    def __init__(self, tree_mask: torch.Tensor, num_streams: int, cache: Optional[KVCache] = None,
                 past_length: int = 0):
        self.cache = cache
        self.past_length = past_length
        self.num_nodes = tree_mask.shape[-1]
        self._bias = {self.num_nodes: attention_bias(tree_mask, past_length)}
        if num_streams:
            rows = self.num_nodes * (1 + num_streams)
            self._bias[rows] = attention_bias(stream_row_mask(tree_mask, num_streams), past_length)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float) -> torch.Tensor:
        """q: [B, H, R, D]; k, v: [B, KV, R, D] (RoPE applied). Returns [B, H, R, D]."""
        n, past = self.num_nodes, self.past_length
        if self.cache is not None:
            key_cache, value_cache = self.cache.keys[layer], self.cache.values[layer]
            key_cache[:, :, past:past + n] = k[:, :, :n]
            value_cache[:, :, past:past + n] = v[:, :, :n]
            k = torch.cat([key_cache[:, :, :past], k], dim=2)
            v = torch.cat([value_cache[:, :, :past], v], dim=2)
        return grouped_attention(q, k, v, self._bias[q.shape[2]], scale)


class MainKVAttention:
    """Stream rows alone over given main-row keys and values (lossless training).

    In lossless mode the main rows of the MSA layers are the frozen base model: their
    keys and values come from one pass without gradient per sequence, and only the
    stream rows (`Transformer.stream_upper`) are computed with gradient.

    main_keys, main_values: MSA layer -> [B, KV, C, D] (RoPE applied), the C main rows
    the nodes may see; main_visible: [B, N, C] bool, which of them node n sees.
    """

    def __init__(self, main_keys: dict[int, torch.Tensor], main_values: dict[int, torch.Tensor],
                 main_visible: torch.Tensor, num_streams: int):
        self.main_keys = main_keys
        self.main_values = main_values
        self.bias = stream_rows_bias(main_visible, num_streams)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float) -> torch.Tensor:
        """q: [B, H, N*γ, D]; k, v: [B, KV, N*γ, D] of the stream rows. Returns [B, H, N*γ, D]."""
        k = torch.cat([self.main_keys[layer], k], dim=2)
        v = torch.cat([self.main_values[layer], v], dim=2)
        return grouped_attention(q, k, v, self.bias, scale)
