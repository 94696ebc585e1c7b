"""The two custom PyTorch ops that the step graph is traced through.

`torch.export` sees each op as one opaque node with a shape-only ("fake")
implementation; the ONNX translation of each backend (`portable.py`, `custom.py`,
`sampler.py`) then writes the real ONNX nodes. Keeping these two pieces opaque to
PyTorch is what lets their ONNX side use data-dependent shapes (the attention bias is
[rows, past + rows], `TopK` takes K as a tensor) that `torch.export` cannot trace.

    streamspec::tree_attention  one attention layer of a tree step, KV cache in place
    streamspec::sample_tokens   exact sampling from the main stream (inverse CDF)

Neither op has an eager kernel: they exist only to be exported (the PyTorch reference
decoder uses `models.attention.EagerAttention`).
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("streamspec::tree_attention", mutates_args=())
def tree_attention(query: Tensor, key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor,
                   past_length: Tensor, tree_mask: Tensor, tree_parent: Tensor, stream_nodes: Tensor,
                   compact_src: Tensor, num_heads: int, kv_num_heads: int, scale: float,
                   num_streams: int) -> tuple[Tensor, Tensor, Tensor]:
    """Attention of R new rows over [committed cache, compacted rows, new rows].

    query [1, R, H*D] and key, value [1, R, KV*D], RoPE applied. R = N main rows, then
    (MSA layers, num_streams = γ > 0) γ stream rows for each node of `stream_nodes`:
    row N + k*γ + (j - 1) is stream j of node stream_nodes[k].
    key_cache, value_cache [1, KV, C, D]: rows [0, past_length - M) committed; the M
    rows compact_src [M] (absolute rows) move to [past_length - M, past_length) first.
    tree_mask [N, N] bool: node j is node i or an ancestor; tree_parent [N] its parent.
    past_length int64 [1]: committed rows once the compaction is done.
    Returns output [1, R, H*D] and the caches, written in place by the ONNX op: the
    main rows at [past_length, past_length + N); stream rows land after them and are
    never read as committed rows (the next step overwrites them).
    """
    raise NotImplementedError("streamspec::tree_attention exists only to be exported to ONNX")


@tree_attention.register_fake
def _(query, key, value, key_cache, value_cache, past_length, tree_mask, tree_parent, stream_nodes,
      compact_src, num_heads, kv_num_heads, scale, num_streams):
    return torch.empty_like(query), torch.empty_like(key_cache), torch.empty_like(value_cache)


@torch.library.custom_op("streamspec::sample_tokens", mutates_args=())
def sample_tokens(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                  uniform: Tensor) -> Tensor:
    """One token per row drawn exactly from softmax(logits / T) after top-k and top-p.

    logits [O, V] float32; temperature, top_p float32 [1]; top_k int64 [1] (0: off);
    uniform [O] float32 in [0, 1), one random number per row. Returns int64 [O].
    """
    raise NotImplementedError("streamspec::sample_tokens exists only to be exported to ONNX")


@sample_tokens.register_fake
def _(logits, temperature, top_k, top_p, uniform):
    return logits.new_empty(logits.shape[:1], dtype=torch.int64)
