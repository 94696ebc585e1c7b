"""Graph rewrites for ONNX Runtime after tracing: fewer, fused nodes per layer.

A 135M-parameter model on a CPU spends much of a one-token step between kernels, not in
them (2,000+ nodes per step), so every node a rewrite removes is time saved. Each rule
replaces a traced pattern with one ONNX Runtime kernel that computes the same numbers
(CPU and CUDA):

- RMSNorm -> `SimplifiedLayerNormalization`. The traced `Transformer` normalises as
  x * Reciprocal(Sqrt(ReduceMean(Pow(x, 2), [-1]) + eps)), and the graph optimiser
  folds the norm's weight into the next MatMul, so onnxscript's own RMS fusion (which
  wants the weight multiply) does not match; our rule uses a unit scale: six nodes
  become one, 2 * layers + 1 times per step.
- residual Add + RMSNorm -> `SkipSimplifiedLayerNormalization` (onnxscript's ORT rule),
  which also returns the sum for the next residual.
- RoPE -> `com.microsoft.RotaryEmbedding`. The traced rotation is
  x * cos + cat(-x2, x1) * sin with cos, sin = cos/sin(cat(f, f)) and
  f = positions * inv_freq (models/model.py `Transformer.rope`); the kernel takes the
  positions and a [max_positions, D/2] table of cos(p * inv_freq), computed here once
  in float32 the way the graph computed it, shared by every layer. Ten nodes per
  rotated tensor become one, plus the per-step cos/sin computation.

`merge_sibling_matmuls` (run after quantization, so that a GGUF's blocks are still
matched weight by weight) turns MatMuls that read the same input (q, k, v; gate, up;
the stream adapters' down-projections) into one MatMul over the concatenated weights
and a Split: one kernel with a wider N instead of two or three. `add_before_split`
then adds two such merged products before splitting them (a GGUF's offsets product,
quantize.py), rather than part by part. `fold_norm_scales` gives a norm the weight that
a GGUF's blocks kept out of the next MatMul, instead of a Mul of its own.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .graph_edits import drop_dead_nodes, drop_unused_initializers, drop_unused_inputs


def _rms_rule():
    import onnx_ir as ir
    from onnxscript.rewriter import _ir_utils, pattern

    def rms(op, x, two, axes, eps):
        mean = op.ReduceMean(op.Pow(x, two), axes, keepdims=1, noop_with_empty_axes=0)
        return op.Mul(x, op.Reciprocal(op.Sqrt(op.Add(mean, eps))))

    def check(context, x, two, axes, eps, **_):
        axes_value = _ir_utils.get_numpy_value(axes)
        return (_ir_utils.get_singleton_value(two) == 2.0 and axes_value is not None
                and axes_value.reshape(-1).tolist() == [-1]
                and isinstance(_ir_utils.get_singleton_value(eps), float)
                and x.dtype == ir.DataType.FLOAT and x.shape is not None and isinstance(x.shape[-1], int))

    def fused(op, x, two, axes, eps, **_):
        scale = op.Constant(value=ir.tensor(np.ones(x.shape[-1], dtype=np.float32)))
        return op.SimplifiedLayerNormalization(x, scale, axis=-1, epsilon=_ir_utils.get_singleton_value(eps),
                                               stash_type=1)

    return pattern.RewriteRule(rms, fused, check, name="RmsNormFoldedScale")


def rope_tables(inv_freq: np.ndarray, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [max_positions, D/2] float32 of positions * inv_freq, computed in
    float32 as the traced graph computes them (Cast(position) * inv_freq, then Cos/Sin)."""
    angles = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _rope_rule(max_positions: int):
    """onnxscript's RotaryEmbeddingFusion leaves RotaryEmbedding(x, cos, sin) with cos, sin
    [B, 1, R, D] computed from the positions; this rule turns the computation into
    position ids and constant tables: com.microsoft.RotaryEmbedding(x, positions,
    cos_table, sin_table), x [B, H, R, D] float32, positions [B, R] int64.

    The graph's positions input is [R]; a model with stream rows unsqueezes it to
    [1, R] first, a plain model's graph (after onnxslim) unsqueezes [R] straight to
    [1, R, 1] with axes [0, 2]: both forms match, the second gets one shared Unsqueeze."""
    import onnx_ir as ir
    from onnxscript.rewriter import _ir_utils, pattern

    tables: dict[bytes, tuple] = {}  # inv_freq bytes -> (cos, sin) values, one pair for all layers
    rows: dict[str, object] = {}  # a rank-1 positions value's name -> its [1, R] form

    def rope(op, x, positions, last, inv_freq, heads_axis):
        freqs = op.Mul(op.Cast(op.Unsqueeze(positions, last), to=ir.DataType.FLOAT), inv_freq)  # [B, R, D/2]
        angles = op.Concat(freqs, freqs, axis=-1)
        cos, sin = op.Unsqueeze(op.Cos(angles), heads_axis), op.Unsqueeze(op.Sin(angles), heads_axis)
        return op.RotaryEmbedding(x, cos, sin, interleaved=0, _allow_other_attributes=True,
                                  _domain="ai.onnxruntime._fusion")

    def axes_fit(positions, last) -> bool:
        """Unsqueeze(positions, last) is positions [B, R] -> [B, R, 1], or [R] -> [1, R, 1]."""
        axes = _ir_utils.get_numpy_value(last)
        if axes is None or positions.shape is None:
            return False
        axes = axes.reshape(-1).tolist()
        return (len(positions.shape) == 2 and axes in ([-1], [2])) or (len(positions.shape) == 1
                                                                       and axes in ([0, 2], [0, -1]))

    def check(context, x, positions, last, inv_freq, heads_axis, **_):
        frequencies = _ir_utils.get_numpy_value(inv_freq)
        return (x.dtype == ir.DataType.FLOAT and frequencies is not None
                and x.shape is not None and len(x.shape) == 4 and frequencies.size * 2 == x.shape[3]
                and positions.dtype == ir.DataType.INT64 and axes_fit(positions, last)
                and _ir_utils.get_singleton_value(heads_axis) == 1)

    def fused(op, x, positions, inv_freq, **_):
        if len(positions.shape) == 1:  # [R] -> [1, R], once for every layer
            if positions.name not in rows:
                rows[positions.name] = op.Unsqueeze(positions, op.Constant(value_ints=[0]))
            positions = rows[positions.name]
        frequencies = _ir_utils.get_numpy_value(inv_freq).reshape(-1)
        key = frequencies.astype(np.float32).tobytes()
        if key not in tables:
            cos, sin = rope_tables(frequencies, max_positions)
            tables[key] = (op.Constant(value=ir.tensor(cos)), op.Constant(value=ir.tensor(sin)))
        cos, sin = tables[key]
        return op.RotaryEmbedding(x, positions, cos, sin, interleaved=0, _domain="com.microsoft")

    # The cos / sin computation is shared by every layer: keep it until all are rewritten.
    return pattern.RewriteRule(rope, fused, check, name="RotaryEmbeddingFromPositions", remove_nodes=False)


def _rope_on_rows_rule():
    """Reshape(Transpose(RotaryEmbedding(Transpose(Reshape(x, [1, -1, H, D])))), [1, -1, H*D])
    -> RotaryEmbedding(x, num_heads=H): the model rotates [B, H, R, D] heads, the
    attention op wants [B, R, H*D] rows, and the kernel takes rows directly; four
    copies of q and k per layer are gone."""
    from onnxscript.rewriter import _ir_utils, pattern

    def rows(op, x, heads_shape, rows_shape, positions, cos, sin):
        heads = op.Transpose(op.Reshape(x, heads_shape, _allow_other_attributes=True), perm=[0, 2, 1, 3])
        rotated = op.RotaryEmbedding(heads, positions, cos, sin, interleaved=0, _domain="com.microsoft")
        return op.Reshape(op.Transpose(rotated, perm=[0, 2, 1, 3]), rows_shape, _allow_other_attributes=True)

    def check(context, x, heads_shape, rows_shape, **_):
        split, joined = _ir_utils.get_numpy_value(heads_shape), _ir_utils.get_numpy_value(rows_shape)
        if split is None or joined is None or split.size != 4 or joined.size != 3:
            return False
        b, r, h, d = split.tolist()
        return (x.shape is not None and len(x.shape) == 3 and x.shape[2] == h * d and b == 1 and r == -1
                and joined.tolist() in ([1, -1, h * d], [b, -1, h * d]))

    def fused(op, x, heads_shape, positions, cos, sin, **_):
        heads = int(_ir_utils.get_numpy_value(heads_shape).reshape(-1)[2])
        return op.RotaryEmbedding(x, positions, cos, sin, interleaved=0, num_heads=heads, _domain="com.microsoft")

    return pattern.RewriteRule(rows, fused, check, name="RotaryEmbeddingOnRows")


def fuse(proto, max_positions: Optional[int] = None):
    """ModelProto -> (ModelProto with the fusions applied, {rule: rewrites}).
    max_positions: rows of the RoPE tables (the export's max length); None leaves RoPE
    unfused."""
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript.rewriter import pattern
    from onnxscript.rewriter.ort_fusions.rotary_embedding import fuse_rotary_embedding
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

    model = ir.from_proto(proto)
    common.ShapeInferencePass()(model)
    counts = {"rms_norm": pattern.RewriteRuleSet([_rms_rule()], commute=True).apply_to_model(model)}
    counts["skip_rms_norm"] = fuse_skip_rms_normalization(model)
    if max_positions:
        fuse_rotary_embedding(model)  # -> RotaryEmbedding(x, cos, sin), a function of onnxscript's
        counts["rotary"] = pattern.RewriteRuleSet([_rope_rule(max_positions)], commute=True).apply_to_model(model)
        # A rotation our rule did not take (fp16, scaled RoPE) goes back to the traced nodes.
        common.InlinePass()(model)
        common.RemoveUnusedNodesPass()(model)
        counts["rotary_on_rows"] = pattern.RewriteRuleSet([_rope_on_rows_rule()]).apply_to_model(model)
    common.RemoveUnusedNodesPass()(model)
    common.RemoveUnusedFunctionsPass()(model)
    return ir.to_proto(model), counts


# ------------------------------------------------------------------------------ sibling MatMuls
def merge_sibling_matmuls(proto) -> int:
    """MatMuls (constant weight [K, N]) and MatMulNBits nodes that read the same input
    with the same settings -> one node over the weights concatenated along N, and a
    Split back into the original outputs. Returns how many nodes were removed."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    groups: dict[tuple, list[int]] = {}
    for index, node in enumerate(graph.node):
        key = _merge_key(node, initializers)
        if key is not None:
            groups.setdefault(key, []).append(index)
    merged, removed = {}, 0
    for key, members in groups.items():
        if len(members) < 2:
            continue
        nodes = [graph.node[i] for i in members]
        arrays = [[numpy_helper.to_array(initializers[name], base_dir="") for name in node.input[1:]] for node in nodes]
        if key[0] == "MatMul":
            weight = np.concatenate([a[0] for a in arrays], axis=1)  # [K, N1 + N2 + ...]
            widths = [a[0].shape[1] for a in arrays]
            name = nodes[0].input[1] + ".merged"
            graph.initializer.append(numpy_helper.from_array(weight, name))
            fused = helper.make_node("MatMul", [nodes[0].input[0], name], [nodes[0].output[0] + ".merged"],
                                     name=nodes[0].name + ".merged")
        else:
            widths = [_attribute(node, "N") for node in nodes]
            names = []
            for slot in range(len(arrays[0])):  # B, scales, zero points: every one is per output column
                parts = [a[slot].reshape(width, -1) for a, width in zip(arrays, widths)]
                joined = np.concatenate(parts, axis=0)
                shape = (sum(widths),) + arrays[0][slot].shape[1:] if arrays[0][slot].ndim > 1 else (-1,)
                names.append(nodes[0].input[1 + slot] + ".merged")
                graph.initializer.append(numpy_helper.from_array(joined.reshape(shape), names[-1]))
            attributes = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
            attributes["N"] = sum(widths)
            fused = helper.make_node("MatMulNBits", [nodes[0].input[0], *names], [nodes[0].output[0] + ".merged"],
                                     name=nodes[0].name + ".merged", domain="com.microsoft", **attributes)
        split_sizes = nodes[0].output[0] + ".split_sizes"
        graph.initializer.append(numpy_helper.from_array(np.array(widths, dtype=np.int64), split_sizes))
        split = helper.make_node("Split", [fused.output[0], split_sizes], [n.output[0] for n in nodes], axis=-1,
                                 name=nodes[0].name + ".split")
        merged[members[0]] = [fused, split]
        for index in members[1:]:
            merged[index] = []
        removed += len(members) - 1
    if not merged:
        return 0
    order = []
    for index, node in enumerate(graph.node):
        order.extend(merged.get(index, [node]))
    graph.ClearField("node")
    graph.node.extend(order)
    drop_unused_initializers(graph)
    return removed


def add_before_split(proto) -> int:
    """Add(Split(a)[i], Split(b)[i]) for every i -> Split(Add(a, b)): a merged MatMul's
    parts plus the matching parts of another merged MatMul (a GGUF's offsets product,
    quantize.py) become one Add and one Split. Returns the nodes removed."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    nodes = list(graph.node)
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    producer = {out: index for index, node in enumerate(nodes) for out in node.output}

    initializers = {t.name: t for t in graph.initializer}

    def setup(node) -> tuple:  # the split sizes' values (each merge names its own) and the axis
        sizes = tuple(numpy_helper.to_array(initializers[name]).tobytes() if name in initializers else name
                      for name in node.input[1:])
        return sizes, tuple((a.name, a.i) for a in node.attribute)

    gone: set[int] = set()
    replacement: dict[int, list] = {}
    for index, first in enumerate(nodes):
        if first.op_type != "Split" or index in gone:
            continue
        users = [consumers.get(out, []) for out in first.output]
        if not all(len(u) == 1 and nodes[u[0]].op_type == "Add" for u in users):
            continue
        adds = [u[0] for u in users]
        others = [nodes[a].input[1] if nodes[a].input[0] == out else nodes[a].input[0]
                  for a, out in zip(adds, first.output)]
        other = producer.get(others[0])
        if (other is None or other == index or other in gone or nodes[other].op_type != "Split"
                or list(nodes[other].output) != others or setup(nodes[other]) != setup(first)
                or any(len(consumers.get(out, [])) != 1 for out in others)):
            continue
        total = first.output[0] + ".plus"
        attributes = {a.name: helper.get_attribute_value(a) for a in first.attribute}
        # The pair takes the first Add's place: both Splits' inputs exist there, and
        # every Add's users come after it.
        replacement[min(adds)] = [
            helper.make_node("Add", [first.input[0], nodes[other].input[0]], [total], name=first.name + ".add"),
            helper.make_node("Split", [total, *first.input[1:]], [nodes[a].output[0] for a in adds],
                             name=first.name + ".after_add", **attributes)]
        gone.update([index, other, *adds])
    if not gone:
        return 0
    order = [n for index, node in enumerate(nodes)
             for n in (replacement.get(index) or ([] if index in gone else [node]))]
    graph.ClearField("node")
    graph.node.extend(order)
    return len(nodes) - len(order)


def fold_norm_scales(proto) -> int:
    """(Skip)SimplifiedLayerNormalization with a unit scale whose normalised output only
    feeds Mul(·, w) by a constant w of the scale's shape -> the norm with scale w. The
    RMS rule above uses a unit scale because the optimiser folds w into the next MatMul;
    where that MatMul carries a GGUF's own blocks (quantize.py) it cannot, and w stays a
    Mul of its own, twice per layer. The kernel multiplies by its scale last, so the
    numbers are the same. Returns the nodes removed."""
    from onnx import numpy_helper

    graph = proto.graph
    constants = {t.name: t for t in graph.initializer}  # and the Constant nodes' values
    constants.update({n.output[0]: a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute
                      if a.name == "value"})
    scale_slot = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {v.name for v in graph.output}
    gone = set()
    for node in graph.node:
        slot = scale_slot.get(node.op_type)
        if slot is None or len(node.input) <= slot or node.input[slot] not in constants:
            continue
        scale = numpy_helper.to_array(constants[node.input[slot]])
        users = consumers.get(node.output[0], [])
        if not np.all(scale == 1) or len(users) != 1 or users[0].op_type != "Mul" or node.output[0] in outputs:
            continue
        mul = users[0]
        weight_name = mul.input[1] if mul.input[0] == node.output[0] else mul.input[0]
        weight = constants.get(weight_name)
        if weight is None or tuple(weight.dims) != scale.shape or weight.data_type != constants[node.input[slot]].data_type:
            continue
        node.input[slot] = weight_name
        node.output[0] = mul.output[0]
        gone.add(id(mul))
    if gone:
        kept = [n for n in graph.node if id(n) not in gone]
        graph.ClearField("node")
        graph.node.extend(kept)
        drop_unused_initializers(graph)
    return len(gone)


def pack_chain_attention(proto) -> int:
    """For an autoregressive-only graph (portable.chain_attention), per layer:

        Split(qkv) -> q, k, v;  RotaryEmbedding(q), RotaryEmbedding(k);  GroupQueryAttention(q', k', v)
        -> GroupQueryAttention(qkv, cos_cache, sin_cache, do_rotary=1)

    qkv [1, R, (H + 2 KV) * D] is the packed layout the kernel reads itself. Valid only
    where the new rows are one chain at positions past_length + i: with no position_ids
    input the kernel rotates row i of a step at exactly that position (a tree step's
    rows share positions and its compacted rows arrive rotated, so tree graphs keep the
    separate nodes). The rotation tables are the ones RotaryEmbedding used. Every layer
    also reads one shared seqlens_k / total_sequence_length, computed from the step's
    input_ids instead of from each layer's query (those that keep their rotations too:
    stream adapters that add to q, k and v). Returns the nodes removed."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    before = len(graph.node)
    producer = {out: node for node in graph.node for out in node.output}
    # Shape(x)[1:2] of a rotated q or k is R, as of the packed rows: such readers move to
    # those, and do not count against removing x.
    row_shapes: dict[str, list] = {}
    readers: dict[str, int] = {}
    for node in graph.node:
        if node.op_type == "Shape" and _attribute(node, "start") == 1 and _attribute(node, "end") == 2:
            row_shapes.setdefault(node.input[0], []).append(node)
            continue
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    constants = {t.name: t for t in graph.initializer}
    constants.update({n.output[0]: a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute
                      if a.name == "value"})

    def rotary(name: str, heads: int):
        """The RotaryEmbedding node that makes `name` (non-interleaved, whole head), or None."""
        node = producer.get(name)
        if (node is None or node.op_type != "RotaryEmbedding" or node.domain != "com.microsoft"
                or readers.get(name) != 1 or _attribute(node, "interleaved") or _attribute(node, "num_heads") != heads
                or _attribute(node, "rotary_embedding_dim") or len(node.input) != 4):
            return None
        return node

    chains = []
    for node in graph.node:
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft" or len(node.input) < 7:
            continue
        if any(len(node.input) > i and node.input[i] for i in range(7, 11)) or _attribute(node, "do_rotary"):
            continue  # already rotates, or has an attention bias (a tree step)
        chains.append(node)
        heads, kv_heads = _attribute(node, "num_heads"), _attribute(node, "kv_num_heads")
        q, k = rotary(node.input[0], heads), rotary(node.input[1], kv_heads)
        split = producer.get(node.input[2])
        if (q is None or k is None or split is None or split.op_type != "Split" or len(split.output) != 3
                or list(split.output) != [q.input[0], k.input[0], node.input[2]] or q.input[1:] != k.input[1:]
                or any(readers.get(out) != 1 for out in split.output) or _attribute(split, "axis") not in (-1, 2)
                or q.input[2] not in constants):
            continue
        half = numpy_helper.to_array(constants[q.input[2]]).shape[-1]  # cos table [positions, D/2]
        sizes = numpy_helper.to_array(constants[split.input[1]]).tolist() if split.input[1] in constants else None
        if sizes is None or sizes != [heads * 2 * half, kv_heads * 2 * half, kv_heads * 2 * half]:
            continue
        for name in (*split.output, node.input[0], node.input[1]):
            for shape in row_shapes.get(name, []):
                shape.input[0] = split.input[0]
        node.input[0], node.input[1], node.input[2] = split.input[0], "", ""
        while len(node.input) < 9:
            node.input.append("")
        node.input[7], node.input[8] = q.input[2], q.input[3]
        node.attribute.extend([helper.make_attribute("do_rotary", 1), helper.make_attribute("rotary_interleaved", 0)])
    if not chains:
        return 0
    if {"input_ids", "past_length"} <= {v.name for v in graph.input}:
        # R = the step's tokens: one computation for every layer instead of one per layer.
        shared = [helper.make_node("Shape", ["input_ids"], ["chain.rows"]),
                  helper.make_node("Add", ["past_length", "chain.rows"], ["chain.total"]),
                  helper.make_node("Constant", [], ["chain.one"], value_ints=[1]),
                  helper.make_node("Sub", ["chain.total", "chain.one"], ["chain.last"]),
                  helper.make_node("Cast", ["chain.last"], ["chain.seqlens_k"], to=TensorProto.INT32),  # [1]
                  helper.make_node("Squeeze", ["chain.total"], ["chain.total_scalar"]),
                  helper.make_node("Cast", ["chain.total_scalar"], ["chain.total_length"], to=TensorProto.INT32)]
        for node in chains:
            node.input[5], node.input[6] = "chain.seqlens_k", "chain.total_length"
        nodes = shared + list(graph.node)
        graph.ClearField("node")
        graph.node.extend(nodes)
    drop_dead_nodes(graph)
    drop_unused_inputs(graph)
    return before - len(graph.node)


def _attribute(node, name: str):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _merge_key(node, initializers) -> Optional[tuple]:
    """What sibling nodes must share to be merged (None: never merged)."""
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
        weight = initializers.get(node.input[1])
        if weight is None or len(weight.dims) != 2:
            return None
        return ("MatMul", node.input[0], weight.dims[0], weight.data_type)
    if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
        if len(node.input) > 4 or any(name not in initializers for name in node.input[1:] if name):
            return None  # g_idx / bias, or weights computed at run time
        if "" in node.input[1:]:
            return None
        kinds = tuple(initializers[name].data_type for name in node.input[1:])
        settings = tuple(sorted((a.name, a.i) for a in node.attribute if a.name != "N"))
        return ("MatMulNBits", node.input[0], len(node.input), kinds, settings)
    return None
