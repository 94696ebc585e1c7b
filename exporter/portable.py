"""The `portable` attention backend: ONNX Runtime's com.microsoft GroupQueryAttention.

Each `streamspec::tree_attention` node becomes, in ONNX:

    Gather(key_cache, compact_src) ──┐   rows to compact, already rotated  [1, M, KV*D]
                             key ────┴─► Concat ─► key_all                 [1, M+R, KV*D]
    zeros [1, M, H*D] ++ query ────────► query_all (the M rows are dummies, dropped after)
    tree_mask, stream_nodes ──► visibility [M+R, past_length+R] ──► additive bias
    GroupQueryAttention(query_all, key_all, value_all, key_cache, value_cache,
                        seqlens_k = past_length+R-1, total = past_length+R, bias)

GroupQueryAttention writes its M + R new rows at [past_length - M, past_length + R)
of the cache buffer that is bound both as past_key and present_key (IO binding), so
the compaction of the previous step's accepted path and this step's rows are one
in-place write, with no copy of the cache and no host round trip. Its causal rule
(row s sees keys up to past + s) is always wider than the tree visibility, because
the rows are ordered ancestors first and each stream row after its main rows.
"""

from __future__ import annotations

import onnx
import onnx.defs
from onnxscript import opset18 as op
from onnxscript.values import Opset

MSFT = Opset("com.microsoft", 1)
_TRUE = onnx.helper.make_tensor("true", onnx.TensorProto.BOOL, [1], [True])
_FALSE = onnx.helper.make_tensor("false", onnx.TensorProto.BOOL, [1], [False])


def register_schema() -> None:
    """Tell ONNX (and so onnxscript) the GroupQueryAttention inputs this backend uses."""
    if onnx.defs.has("GroupQueryAttention", "com.microsoft"):
        return
    single, optional = (onnx.defs.OpSchema.FormalParameterOption.Single,
                        onnx.defs.OpSchema.FormalParameterOption.Optional)
    param = onnx.defs.OpSchema.FormalParameter
    inputs = [param("query", "T"), param("key", "T", param_option=optional),
              param("value", "T", param_option=optional), param("past_key", "T", param_option=optional),
              param("past_value", "T", param_option=optional), param("seqlens_k", "M"),
              param("total_sequence_length", "M"), param("cos_cache", "T", param_option=optional),
              param("sin_cache", "T", param_option=optional),
              param("position_ids", "tensor(int64)", param_option=optional),
              param("attention_bias", "T", param_option=optional)]
    outputs = [param("output", "T", param_option=single), param("present_key", "T", param_option=optional),
               param("present_value", "T", param_option=optional)]
    attr = onnx.defs.OpSchema.Attribute
    attributes = [attr("num_heads", onnx.defs.OpSchema.AttrType.INT),
                  attr("kv_num_heads", onnx.defs.OpSchema.AttrType.INT),
                  attr("scale", onnx.defs.OpSchema.AttrType.FLOAT, required=False)]
    onnx.defs.register_schema(onnx.defs.OpSchema(
        "GroupQueryAttention", "com.microsoft", 1, inputs=inputs, outputs=outputs,
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("M", ["tensor(int32)"], "")],
        attributes=attributes))


def _ones(shape, value):
    return op.ConstantOfShape(shape, value=value)


def _scalar(value):
    return op.Constant(value_int=value)


def new_row_visibility(tree_mask, stream_nodes, num_streams: int):
    """Which new rows each new row sees: bool [R, R], R = N + L*γ (docs/design.md's MSA rule).

    Main row i sees the main rows marked in tree_mask[i]; stream j of node
    stream_nodes[k] (row N + k*γ + j - 1) sees its node's main rows and streams 1..j of
    that node. With γ = 0 (layers below the MSA layers) this is tree_mask itself.
    """
    if num_streams == 0:
        return tree_mask
    g = op.Constant(value_ints=[num_streams])
    n = op.Shape(tree_mask, start=0, end=1)
    lg = op.Mul(op.Shape(stream_nodes), g)
    main_to_stream = _ones(op.Concat(n, lg, axis=0), _FALSE)
    node_view = op.Gather(tree_mask, stream_nodes, axis=0)  # [L, N]
    node_view = op.Expand(op.Unsqueeze(node_view, op.Constant(value_ints=[1])),
                          op.Concat(op.Shape(stream_nodes), g, n, axis=0))  # [L, γ, N]
    node_view = op.Reshape(node_view, op.Concat(lg, n, axis=0))  # [L*γ, N]
    row = op.Range(_scalar(0), op.Squeeze(lg, op.Constant(value_ints=[0])), _scalar(1))
    block, slot = op.Div(row, g), op.Mod(row, g)
    col_axis, row_axis = op.Constant(value_ints=[0]), op.Constant(value_ints=[1])
    same_node = op.Equal(op.Unsqueeze(block, row_axis), op.Unsqueeze(block, col_axis))
    lower_slot = op.LessOrEqual(op.Unsqueeze(slot, col_axis), op.Unsqueeze(slot, row_axis))
    stream_to_stream = op.And(same_node, lower_slot)
    top = op.Concat(tree_mask, main_to_stream, axis=1)
    bottom = op.Concat(node_view, stream_to_stream, axis=1)
    return op.Concat(top, bottom, axis=0)


def tree_attention(query, key, value, key_cache, value_cache, past_length, tree_mask, tree_parent,
                   stream_nodes, compact_src, num_heads: int, kv_num_heads: int, scale: float,
                   num_streams: int):
    """ONNX translation of `streamspec::tree_attention` (see ops.py for the contract)."""
    m = op.Shape(compact_src)  # [1]
    # R from the step's inputs, not from this layer's query: then the bias below is the
    # same expression in every layer and graph optimisation computes it once per step.
    r = op.Shape(tree_mask, start=0, end=1)
    if num_streams:
        r = op.Add(r, op.Mul(op.Shape(stream_nodes), op.Constant(value_ints=[num_streams])))
    total = op.Add(past_length, r)  # keys after this step: past_length - M committed + M + R
    # Rows to compact, gathered before GroupQueryAttention overwrites their old place.
    kv_width = op.Shape(key, start=2, end=3)
    to_rows = op.Concat(op.Constant(value_ints=[1, -1]), kv_width, axis=0)
    moved_key = op.Reshape(op.Transpose(op.Gather(key_cache, compact_src, axis=2), perm=[0, 2, 1, 3]), to_rows)
    moved_value = op.Reshape(op.Transpose(op.Gather(value_cache, compact_src, axis=2), perm=[0, 2, 1, 3]), to_rows)
    key_all = op.Concat(moved_key, key, axis=1)
    value_all = op.Concat(moved_value, value, axis=1)
    zero = op.CastLike(op.Constant(value_float=0.0), query)
    dummy_query = op.Expand(zero, op.Concat(op.Constant(value_ints=[1]), m, op.Shape(query, start=2, end=3), axis=0))
    query_all = op.Concat(dummy_query, query, axis=1)
    # Visibility: every row sees the committed rows [0, past_length) (compacted ones
    # included); the dummy rows see nothing else, the real rows follow the tree.
    dummy_rows = op.Concat(_ones(op.Concat(m, past_length, axis=0), _TRUE),
                           _ones(op.Concat(m, r, axis=0), _FALSE), axis=1)
    real_rows = op.Concat(_ones(op.Concat(r, past_length, axis=0), _TRUE),
                          new_row_visibility(tree_mask, stream_nodes, num_streams), axis=1)
    visible = op.Concat(dummy_rows, real_rows, axis=0)  # [M+R, past_length+R]
    bias = op.Where(visible, zero, op.CastLike(op.Constant(value_float=float("-inf")), query))
    bias = op.Unsqueeze(bias, op.Constant(value_ints=[0, 1]))
    seqlens_k = op.Cast(op.Sub(total, op.Constant(value_ints=[1])), to=onnx.TensorProto.INT32)
    total_length = op.Cast(op.Squeeze(total, op.Constant(value_ints=[0])), to=onnx.TensorProto.INT32)
    output, key_out, value_out = MSFT.GroupQueryAttention(
        query_all, key_all, value_all, key_cache, value_cache, seqlens_k, total_length, None, None, None, bias,
        num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale)
    output = op.Slice(output, m, op.Constant(value_ints=[2 ** 62]), op.Constant(value_ints=[1]))
    return output, key_out, value_out


def chain_attention(query, key, value, key_cache, value_cache, past_length, tree_mask, tree_parent,
                    stream_nodes, compact_src, num_heads: int, kv_num_heads: int, scale: float,
                    num_streams: int):
    """The translation for an autoregressive-only graph (`export --autoregressive`):
    the new rows are one chain (a prompt, or one token), so GroupQueryAttention's own
    causal rule is the visibility, and nothing is ever compacted. No bias, no gathers,
    no dummy rows: the tree inputs drop out of the graph. query [1, R, H*D]."""
    r = op.Shape(query, start=1, end=2)
    total = op.Add(past_length, r)
    seqlens_k = op.Cast(op.Sub(total, op.Constant(value_ints=[1])), to=onnx.TensorProto.INT32)
    total_length = op.Cast(op.Squeeze(total, op.Constant(value_ints=[0])), to=onnx.TensorProto.INT32)
    return MSFT.GroupQueryAttention(query, key, value, key_cache, value_cache, seqlens_k, total_length,
                                    num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale)
