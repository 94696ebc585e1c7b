"""A quantized KV cache (`--kv-dtype int8|int4`) for the portable backend.

ONNX Runtime's GroupQueryAttention (1.32) keeps its past/present buffers as int8, or as
uint8 holding two 4-bit values, with float scales given as inputs (`k_scale`,
`v_scale`) and attributes `k_quant_type` / `v_quant_type` = "PER_CHANNEL",
`kv_cache_bit_width` = 8 | 4. It quantizes each new key and value row as it writes
it and dequantizes the cache as it reads it, on the CPU and CUDA providers. This module
rewrites a traced step graph for that:

- the cache inputs and outputs `key_cache.i` / `value_cache.i` become int8 [1, KV, C, D]
  or uint8 [1, KV, C, D/2] (int4: value + 8 in each nibble, the even element in the low
  nibble), and the runtime allocates them so (runtime/session.py);
- every GroupQueryAttention gets its layer's per-channel scales [1, KV, 1, D] as
  constants, calibrated on the model's own keys and values (`calibrate`): the absolute
  maximum of each channel over a few prompts and their greedy continuations, times a
  headroom for tokens the calibration did not see (2 for int8, which has levels to
  spare; 1.25 for int4, which has not), divided by 127 (int8) or 7 (int4); values
  beyond that saturate;
- the rows that graph compaction gathers from the cache (exporter/portable.py) are
  dequantized before they join the step's new rows; GroupQueryAttention quantizes them
  again as it writes them at their new place, which gives back the same integers.

Exactness: GroupQueryAttention reads every key and value, this step's included, through
the quantized cache, so a row sees the same numbers whether it is written in a tree
step or one step at a time, and speculative == autoregressive still holds
(tests/test_quantize.py). The cost is that the model attends to rounded keys and
values: a different model, whose agreement with fp32 bench_precision reports.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from streamspec.errors import StreamspecError

KV_DTYPES = ("none", "int8", "int4")
QMAX = {"int8": 127, "int4": 7}
HEADROOM = {"int8": 2.0, "int4": 1.25}  # scale = calibrated maximum * headroom / QMAX
CALIBRATION_TOKENS = 48  # greedy tokens generated after each calibration prompt
CALIBRATION_PROMPTS = 4


def check_kv_dtype(kv_dtype: str, backend: str) -> Optional[str]:
    """The cache dtype ("int8" / "int4"), None for "none"; one sentence on bad input."""
    if kv_dtype not in KV_DTYPES:
        raise StreamspecError(f"--kv-dtype must be none, int8 or int4, got {kv_dtype!r}.")
    if kv_dtype == "none":
        return None
    if backend != "portable":
        raise StreamspecError("--kv-dtype needs --attention portable: ONNX Runtime's GroupQueryAttention has the "
                              "quantized cache, the custom TreeAttention op keeps a float one.")
    return kv_dtype


# ------------------------------------------------------------------------------ calibration
def calibration_prompts() -> list[list[dict]]:
    """A few prompts through the exported folder's tokenizer and chat template: held-out
    prompts of the standard-library harvest (the same ones `streamspec bench` uses)."""
    from streamspec.models.prompts import collect_prompts

    records = [r for r in collect_prompts() if r["split"] == "heldout"][:CALIBRATION_PROMPTS]
    return [r["messages"] for r in records]


def calibrate(folder, prompts: Optional[list] = None) -> np.ndarray:
    """Per-layer, per-channel absolute maxima of the cached keys and values of a float
    folder: [2 * layers, KV, D] (key_cache.0, value_cache.0, ...), over `prompts` (chat
    messages or token ids) and their greedy continuations."""
    from streamspec.runtime import Engine

    engine = Engine(folder, provider="cpu", fallback=False)
    rows_cache = engine.session.host_cache  # [2 * layers, 1, KV, max_length, D]
    peak = np.zeros((rows_cache.shape[0], rows_cache.shape[2], rows_cache.shape[4]), dtype=np.float32)
    for prompt in prompts if prompts is not None else calibration_prompts():
        ids = engine.prompt_ids(prompt)[: engine.max_length // 2]
        result = engine.generate(ids, max_new_tokens=min(CALIBRATION_TOKENS, engine.max_length // 4),
                                 speculative=False, ignore_eos=True)
        rows = len(ids) + len(result.token_ids) - 1  # the last token is never run
        peak = np.maximum(peak, np.abs(rows_cache[:, 0, :, :rows]).max(axis=2))
    return peak


def scales(peak: np.ndarray, kv_dtype: str, rotary_pairs: bool) -> np.ndarray:
    """[2 * layers, 1, KV, 1, D] float32 scales from `calibrate`'s maxima. RoPE turns key
    channels i and i + D/2 into each other at other positions, so a key channel takes
    the larger maximum of its pair."""
    peak = peak.astype(np.float32).copy()
    if rotary_pairs:
        half = peak.shape[-1] // 2
        keys = peak[0::2]
        pair = np.maximum(keys[..., :half], keys[..., half:])
        peak[0::2] = np.concatenate([pair, pair], axis=-1)
    peak = np.maximum(peak, 1e-6)  # a channel that is always zero still needs a scale
    return (peak * HEADROOM[kv_dtype] / QMAX[kv_dtype])[:, None, :, None, :]


# ------------------------------------------------------------------------------ graph rewrite
def quantize_cache(proto, kv_dtype: str, layer_scales: np.ndarray, cache_inputs: list[str],
                   cache_outputs: list[str], float_type: int):
    """Rewrite a portable step graph (ModelProto) for a quantized cache; see the module
    docstring. layer_scales: [2 * layers, 1, KV, 1, D] from `scales`."""
    from onnx import TensorProto, numpy_helper

    graph = proto.graph
    storage = TensorProto.INT8 if kv_dtype == "int8" else TensorProto.UINT8
    for value in list(graph.input) + list(graph.output):
        if value.name in cache_inputs or value.name in cache_outputs:
            tensor = value.type.tensor_type
            tensor.elem_type = storage
            if kv_dtype == "int4":
                last = tensor.shape.dim[3]
                last.dim_value = last.dim_value // 2
    scale_of = {}
    for index, name in enumerate(cache_inputs):
        scale_of[name] = f"{name}.scale"
        graph.initializer.append(numpy_helper.from_array(layer_scales[index].astype(np.float32), scale_of[name]))
    new_nodes = []
    for node in graph.node:
        if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft":
            _quantized_attention(node, scale_of, kv_dtype)
        new_nodes.append(node)
        if node.op_type == "Gather" and node.input[0] in scale_of:
            # Rows gathered for compaction: dequantize under the Gather's old output name.
            raw = f"{node.output[0]}.quantized"
            dequantized = node.output[0]
            node.output[0] = raw
            new_nodes += _dequantize(raw, dequantized, scale_of[node.input[0]], kv_dtype, float_type)
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    # Inferred types of the cache tensors, if any were kept, would contradict the new ones.
    stale = set(cache_inputs) | set(cache_outputs)
    kept = [v for v in graph.value_info if v.name not in stale]
    graph.ClearField("value_info")
    graph.value_info.extend(kept)
    return proto


def _quantized_attention(node, scale_of: dict[str, str], kv_dtype: str) -> None:
    """GroupQueryAttention inputs 12, 13 (k_scale, v_scale) and the quantization
    attributes."""
    from onnx import helper

    inputs = list(node.input) + [""] * (14 - len(node.input))
    inputs[12], inputs[13] = scale_of[node.input[3]], scale_of[node.input[4]]
    node.ClearField("input")
    node.input.extend(inputs)
    node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                           helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                           helper.make_attribute("kv_cache_bit_width", 8 if kv_dtype == "int8" else 4)])


def _dequantize(raw: str, out: str, scale: str, kv_dtype: str, float_type: int) -> list:
    """Nodes: quantized rows `raw` [1, KV, M, D or D/2] -> float rows `out` [1, KV, M, D]."""
    from onnx import TensorProto, helper

    def name(suffix: str) -> str:
        return f"{out}.{suffix}"

    nodes = []
    if kv_dtype == "int8":
        nodes.append(helper.make_node("Cast", [raw], [name("float")], to=TensorProto.FLOAT))
        values = name("float")
    else:
        # Two values per byte, value + 8 in each nibble, the even element in the low one.
        nodes += [
            helper.make_node("Constant", [], [name("mask")], value=helper.make_tensor("", TensorProto.UINT8, [],
                                                                                         [15])),
            helper.make_node("Constant", [], [name("four")], value=helper.make_tensor("", TensorProto.UINT8, [],
                                                                                         [4])),
            helper.make_node("BitwiseAnd", [raw, name("mask")], [name("low")]),
            helper.make_node("BitShift", [raw, name("four")], [name("high")], direction="RIGHT"),
            helper.make_node("Constant", [], [name("last")], value=helper.make_tensor("", TensorProto.INT64, [1],
                                                                                         [-1])),
            helper.make_node("Unsqueeze", [name("low"), name("last")], [name("low1")]),
            helper.make_node("Unsqueeze", [name("high"), name("last")], [name("high1")]),
            helper.make_node("Concat", [name("low1"), name("high1")], [name("pairs")], axis=-1),
            # [.., D/2, 2] -> [.., D]; D spelled out, since -1 cannot be inferred for 0 rows.
            helper.make_node("Shape", [raw], [name("shape")], end=3),
            helper.make_node("Shape", [raw], [name("packed")], start=3),
            helper.make_node("Constant", [], [name("two")], value=helper.make_tensor("", TensorProto.INT64, [1],
                                                                                        [2])),
            helper.make_node("Mul", [name("packed"), name("two")], [name("width")]),
            helper.make_node("Concat", [name("shape"), name("width")], [name("unpacked_shape")], axis=0),
            helper.make_node("Reshape", [name("pairs"), name("unpacked_shape")], [name("unpacked")]),
            helper.make_node("Cast", [name("unpacked")], [name("offset")], to=TensorProto.FLOAT),
            helper.make_node("Constant", [], [name("eight")], value=helper.make_tensor("", TensorProto.FLOAT, [],
                                                                                          [8.0])),
            helper.make_node("Sub", [name("offset"), name("eight")], [name("float")]),
        ]
        values = name("float")
    if float_type == TensorProto.FLOAT:
        nodes.append(helper.make_node("Mul", [values, scale], [out]))
    else:
        nodes += [helper.make_node("Mul", [values, scale], [name("scaled")]),
                  helper.make_node("Cast", [name("scaled")], [out], to=float_type)]
    return nodes
