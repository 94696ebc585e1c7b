"""The `custom` attention backend: our `streamspec.TreeAttention` op (custom_ops/).

The op takes the tree as parent indices and does the compaction, the tree mask and
the stream rule itself (contract in custom_ops/tree_attention.h). Its row layout has
γ stream rows for every node, so an engine running a `custom` folder passes all nodes
as `stream_nodes` (streamspec.json says so with "stream_nodes": "all").
"""

from __future__ import annotations

import onnx
import onnx.defs
from onnxscript.values import Opset

DOMAIN, OP_TYPE, OP_VERSION = "streamspec", "TreeAttention", 1
STREAMSPEC = Opset(DOMAIN, OP_VERSION)


def register_schema() -> None:
    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    param = onnx.defs.OpSchema.FormalParameter
    attr, kind = onnx.defs.OpSchema.Attribute, onnx.defs.OpSchema.AttrType
    onnx.defs.register_schema(onnx.defs.OpSchema(
        OP_TYPE, DOMAIN, OP_VERSION,
        inputs=[param("query", "T"), param("key", "T"), param("value", "T"), param("key_cache", "T"),
                param("value_cache", "T"), param("past_length", "tensor(int64)"),
                param("tree_parent", "tensor(int32)"), param("compact_src", "tensor(int32)")],
        outputs=[param("output", "T"), param("key_cache_out", "T"), param("value_cache_out", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")],
        attributes=[attr("num_heads", kind.INT), attr("kv_num_heads", kind.INT), attr("scale", kind.FLOAT),
                    attr("num_streams", kind.INT)]))


def tree_attention(query, key, value, key_cache, value_cache, past_length, tree_mask, tree_parent,
                   stream_nodes, compact_src, num_heads: int, kv_num_heads: int, scale: float,
                   num_streams: int):
    """ONNX translation of `streamspec::tree_attention` onto `streamspec.TreeAttention`."""
    from onnxscript import opset18 as op

    return STREAMSPEC.TreeAttention(
        query, key, value, key_cache, value_cache, past_length, tree_parent,
        op.Cast(compact_src, to=onnx.TensorProto.INT32),
        num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, num_streams=num_streams)
