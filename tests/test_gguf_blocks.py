"""GGUF blocks carried into MatMulNBits / GatherBlockQuantized (exporter/gguf_blocks.py).

Random GGUF blocks of every carried type: the codes, scales and zero points reproduce
gguf-py's own de-quantization (which the GGUF conversion uses), and ONNX Runtime's ops
over them compute the same products as fp32 over the de-quantized weights."""

from __future__ import annotations

import numpy as np
import pytest

from streamspec.exporter.gguf_blocks import LAYOUTS, blocks_of, llama_row_order

# bytes per GGUF block: the scale fields first (fp16), then the codes
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q4_K": 144, "Q6_K": 210}
FP16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}


def random_tensor(kind: str, rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """Raw bytes [rows, bytes per row] of random blocks with finite, small fp16 scales
    (and some all-zero scales: constant blocks)."""
    rng = np.random.default_rng(seed)
    per_block = LAYOUTS[kind][0]
    blocks = rows * columns // per_block
    raw = rng.integers(0, 256, size=(blocks, BLOCK_BYTES[kind]), dtype=np.uint8)
    for offset in FP16_FIELDS[kind]:
        values = rng.uniform(-0.05, 0.05, size=blocks).astype(np.float16)
        values[::7] = 0  # scale 0: a constant block
        raw[:, offset:offset + 2] = values.view(np.uint8).reshape(blocks, 2)
    return raw.reshape(rows, -1)


def gguf_dequantize(kind: str, raw: np.ndarray, rows: int, columns: int) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(raw, GGMLQuantizationType[kind]).reshape(rows, columns).astype(np.float32)


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_blocks_reproduce_gguf_dequantization(kind):
    rows, columns = 6, 512
    raw = random_tensor(kind, rows, columns)
    blocks = blocks_of(kind, raw, rows, columns)
    expected = gguf_dequantize(kind, raw, rows, columns)
    assert blocks.codes.max() < 2 ** blocks.bits
    got = blocks.dequantize()
    if kind in ("Q4_0", "Q8_0", "Q6_K"):  # integer zero points: the same products
        np.testing.assert_array_equal(got, expected)
    else:  # float zero points (−m/d): float rounding only
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(got, np.zeros_like(got))


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
@pytest.mark.parametrize("activations", ["fp32", "int8"])
def test_matmul_over_carried_blocks(kind, activations):
    """A MatMul whose weight is a de-quantized GGUF tensor, carried by `quantize_weights`,
    equals x @ W^T: within float rounding with fp32 activations, within int8 activation
    rounding with int8. It never uses the CPU kernels that are far slower than fp32:
    no float zero points (fractional ones go in as the default zero point plus an offsets
    product), no zero-point input where every block has the default (which is also where
    fractional codes are centred), and 8-bit blocks only with int8 activations (else the
    fp32 weight stays)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from streamspec.exporter.gguf_blocks import carried_weights
    from streamspec.exporter.quantize import quantize_weights

    rows, columns = 64, 512  # N, K
    raw = random_tensor(kind, rows, columns, seed=1)
    weight = gguf_dequantize(kind, raw, rows, columns)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="up")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, columns])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, rows])],
        [numpy_helper.from_array(np.ascontiguousarray(weight.T), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    carried, _ = carried_weights([("blk.0.ffn_up.weight", kind, raw, rows, columns)], num_heads=4, num_kv_heads=4)
    quantized, record = quantize_weights(onnx.ModelProto.FromString(model.SerializeToString()), "int4", 32,
                                         activations=activations, gguf_blocks=carried)
    ops = [n.op_type for n in quantized.graph.node]
    bits = blocks_of(kind, raw, rows, columns).bits
    if bits == 8 and activations == "fp32":
        assert ops == ["MatMul"] and record.get("gguf_blocks") is None
    else:
        assert ops.count("MatMulNBits") == 1 and record["gguf_blocks"] == {kind: 1}
        initializers = {t.name: t for t in quantized.graph.initializer}
        nbits = next(n for n in quantized.graph.node if n.op_type == "MatMulNBits")
        fractional = kind in ("Q4_1", "Q4_K")
        default_zero = kind in ("Q4_0", "Q8_0") or fractional  # Q6_K's zero point 32 is no default
        assert (len(nbits.input) == 3) == default_zero
        if not default_zero:
            assert initializers[nbits.input[3]].data_type == TensorProto.UINT8
        assert ("Add" in ops) == fractional and ops.count("MatMul") == 2 * fractional
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).standard_normal((5, columns)).astype(np.float32)
    (y,) = session.run(None, {"x": x})
    reference = x.astype(np.float64) @ weight.T.astype(np.float64)
    scale = np.abs(reference).max()
    tolerance = 1e-5 if activations == "fp32" else 2e-2  # int8 activations: ~1/127 of each block's range
    assert np.abs(y - reference).max() <= tolerance * scale


def test_llama_row_order_undoes_the_gguf_interleave():
    """transformers de-interleaves llama.cpp's rotary halves per head; the row order does
    the same to an index, so blocks can follow their rows."""
    heads, dim = 3, 8
    rows = heads * dim
    interleaved = np.arange(rows).reshape(heads, 2, dim // 2).swapaxes(1, 2).reshape(rows)  # GGUF row j holds HF row interleaved[j]
    order = llama_row_order(rows, heads)
    assert sorted(order.tolist()) == list(range(rows))
    np.testing.assert_array_equal(interleaved[order], np.arange(rows))


def test_quantize_weights_carries_matching_weights():
    """A graph whose weights are exactly de-quantized GGUF tensors (an embedding table in
    Q8_0, tied to the head, and an MLP's up projection in Q4_1): every one of them takes
    its own blocks, and the outputs equal the fp32 graph's within float rounding. A
    weight that matches no tensor is quantized as usual."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from streamspec.exporter.gguf_blocks import carried_weights
    from streamspec.exporter.quantize import quantize_weights
    from builders import tied_graph

    vocab, hidden = 96, 256
    tensors = [("token_embd.weight", "Q8_0", random_tensor("Q8_0", vocab, hidden, 3), vocab, hidden),
               ("blk.0.ffn_up.weight", "Q4_1", random_tensor("Q4_1", vocab, hidden, 4), vocab, hidden),
               ("blk.0.attn_v.weight", "Q4_K", random_tensor("Q4_K", 8, 256, 5), 8, 256),  # in no MatMul
               ("blk.0.ffn_gate.weight", "IQ2_XS", np.zeros((8, 66), np.uint8), 8, 256)]  # a type not carried
    table = gguf_dequantize("Q8_0", tensors[0][2], vocab, hidden)  # [V, D]
    up = gguf_dequantize("Q4_1", tensors[1][2], vocab, hidden)  # [N=V, K=D]
    proto, _, _ = tied_graph(vocab, hidden)
    initializers = {t.name: t for t in proto.graph.initializer}
    initializers["table"].CopyFrom(numpy_helper.from_array(table, "table"))
    initializers["mlp"].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(up.T), "mlp"))  # MatMul weight [K, N]
    carried, skipped = carried_weights(tensors, num_heads=4, num_kv_heads=4)
    assert skipped == {"IQ2_XS": 1}
    reference = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    quantized, record = quantize_weights(onnx.ModelProto.FromString(proto.SerializeToString()), "int4", 32,
                                         vocab_size=vocab, gguf_blocks=carried)
    ops = [node.op_type for node in quantized.graph.node]
    # The two heads keep the fp32 weight (8-bit blocks need int8 activations to be fast);
    # the up projection: its blocks with zero 0, plus the block sums times its offsets.
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 2 and ops.count("MatMul") == 4
    assert record["gguf_blocks"] == {"Q8_0": 1, "Q4_1": 1}  # the embedding; the up projection
    assert record["matmuls"] == 1  # "down" matched no GGUF tensor: re-quantized (round to nearest)
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([1, 5, 90], np.int64)
    (want_logits, _, _), (got_logits, _, _) = reference.run(None, {"ids": ids}), session.run(None, {"ids": ids})
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5 * np.abs(want_logits).max())


def test_sibling_products_merge_with_their_offsets():
    """Three Q4_1 weights read by one input (q, k, v): carried, then merged by the export
    fusions into one MatMulNBits, one offsets product, one Add and one Split, with the
    outputs of the unmerged graph."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from streamspec.exporter.fusions import add_before_split, merge_sibling_matmuls
    from streamspec.exporter.gguf_blocks import carried_weights
    from streamspec.exporter.quantize import quantize_weights

    columns, widths = 256, (64, 32, 32)
    raws = [random_tensor("Q4_1", rows, columns, seed=10 + i) for i, rows in enumerate(widths)]
    weights = [gguf_dequantize("Q4_1", raw, rows, columns) for raw, rows in zip(raws, widths)]
    names = ("q", "k", "v")
    nodes = [helper.make_node("MatMul", ["x", f"w{n}"], [n], name=n) for n in names]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, columns])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, rows]) for n, rows in zip(names, widths)],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{n}") for n, w in zip(names, weights)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    tensors = [(f"blk.0.ffn_up{i}.weight", "Q4_1", raw, rows, columns) for i, (raw, rows) in enumerate(zip(raws, widths))]
    carried, _ = carried_weights(tensors, num_heads=4, num_kv_heads=4)
    quantized, _ = quantize_weights(onnx.ModelProto.FromString(model.SerializeToString()), "int4", 32,
                                    gguf_blocks=carried)
    before = [n.op_type for n in quantized.graph.node]
    assert before.count("MatMulNBits") == 3 and before.count("Add") == 3
    x = np.random.default_rng(4).standard_normal((3, columns)).astype(np.float32)
    want = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert merge_sibling_matmuls(quantized) == 2 + 2  # MatMulNBits 3 -> 1, offsets products 3 -> 1
    assert add_before_split(quantized) == 3  # 2 Splits + 3 Adds -> 1 Add + 1 Split
    after = [n.op_type for n in quantized.graph.node]
    assert (after.count("MatMulNBits"), after.count("Add"), after.count("Split")) == (1, 1, 1)
    got = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


def test_norm_weights_fold_into_the_norms():
    """The norm weight that a carried MatMul could not absorb: Mul(SkipSimplifiedLayer-
    Normalization(scale 1), w) -> the norm with scale w, bit for bit; a Mul whose
    other operand is no constant of the scale's shape, or a norm output read twice,
    stays."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from streamspec.exporter.fusions import fold_norm_scales

    hidden = 48
    rng = np.random.default_rng(5)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, hidden]) for n in ("x", "skip")]
    nodes = [
        helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "ones"], ["normed", "", "", "sum"],
                         domain="com.microsoft", epsilon=1e-5),
        helper.make_node("Mul", ["w", "normed"], ["y"]),
        helper.make_node("SimplifiedLayerNormalization", ["sum", "ones2"], ["normed2"], axis=-1, epsilon=1e-5),
        helper.make_node("Mul", ["normed2", "w2"], ["y2"]),
        helper.make_node("Mul", ["normed2", "x"], ["z"]),  # normed2 read twice: not folded
    ]
    constants = {"ones": np.ones(hidden, np.float32), "ones2": np.ones(hidden, np.float32),
                 "w": rng.standard_normal(hidden).astype(np.float32),
                 "w2": rng.standard_normal(hidden).astype(np.float32)}
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, hidden])
                                                   for n in ("y", "sum", "y2", "z")],
                              [numpy_helper.from_array(v, k) for k, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    feeds = {"x": rng.standard_normal((2, hidden)).astype(np.float32),
             "skip": rng.standard_normal((2, hidden)).astype(np.float32)}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    folded = onnx.ModelProto.FromString(model.SerializeToString())
    assert fold_norm_scales(folded) == 1
    assert [n.op_type for n in folded.graph.node].count("Mul") == 2
    assert "ones" not in {t.name for t in folded.graph.initializer}
    got = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_int8_head_carries_the_8bit_head_and_keeps_the_rest_fp32():
    """--quant-activations int8-head: the LM head (N = vocabulary) takes its Q8_0 blocks at
    accuracy level 4, every other MatMul computes with fp32 activations (level 1)."""
    import onnx
    from onnx import numpy_helper

    from streamspec.exporter.gguf_blocks import carried_weights
    from streamspec.exporter.quantize import quantize_weights
    from builders import tied_graph

    vocab, hidden = 96, 256
    tensors = [("token_embd.weight", "Q8_0", random_tensor("Q8_0", vocab, hidden, 3), vocab, hidden),
               ("blk.0.ffn_up.weight", "Q4_1", random_tensor("Q4_1", vocab, hidden, 4), vocab, hidden)]
    proto, _, _ = tied_graph(vocab, hidden)
    initializers = {t.name: t for t in proto.graph.initializer}
    initializers["table"].CopyFrom(numpy_helper.from_array(gguf_dequantize("Q8_0", tensors[0][2], vocab, hidden),
                                                           "table"))
    up = gguf_dequantize("Q4_1", tensors[1][2], vocab, hidden)
    initializers["mlp"].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(up.T), "mlp"))
    carried, _ = carried_weights(tensors, num_heads=4, num_kv_heads=4)
    quantized, record = quantize_weights(onnx.ModelProto.FromString(proto.SerializeToString()), "int4", 32,
                                         vocab_size=vocab, gguf_blocks=carried, activations="int8-head")
    assert (record["accuracy_level"], record["head_accuracy_level"]) == (1, 4)
    levels = {}
    for node in quantized.graph.node:
        if node.op_type == "MatMulNBits":
            attributes = {a.name: a.i for a in node.attribute}
            levels.setdefault((attributes["bits"], attributes["accuracy_level"]), []).append(node.name)
    assert len(levels.get((8, 4), [])) == 2  # the two heads: 8-bit blocks, int8 activations
    assert not any(level == 4 for (bits, level) in levels if bits == 4)  # the rest: fp32 activations
