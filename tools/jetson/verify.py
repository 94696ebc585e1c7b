"""Check that ONNX Runtime runs on the GPU and that the TreeAttention op loads and computes.

    python -m streamspec.tools.jetson.verify [--provider cuda|cpu]

`tools/jetson/setup` ends with this. Two tiny models run on the chosen provider: a
one-node `Mul` (does the execution provider itself work: CUDA, cuDNN and cuBLAS
libraries found, kernels for this GPU) and one `streamspec.TreeAttention` node on a
two-node tree with one stream (does the custom-op library load, was it built for this
GPU, and does it compute what its contract says, against a numpy reference).

A board has no `onnx` package (the edge runtime does not need it), so the two models
are written here directly in ONNX's protobuf wire format: a few dozen bytes each.
Exit status 0 when both pass; otherwise one sentence on stderr and status 1.
"""

from __future__ import annotations

import argparse
import struct
import sys
from typing import Optional, Sequence

import numpy as np

from streamspec.errors import first_line

# ONNX TensorProto element types and AttributeProto types used below.
FLOAT, INT32, INT64 = 1, 6, 7
ATTR_FLOAT, ATTR_INT = 1, 2

# The tiny TreeAttention case: 2 query heads sharing 1 key/value head (grouped-query
# attention, as in real models), head size 4, a root with one child, 1 stream each.
HEADS, KV_HEADS, HEAD_DIM, STREAMS = 2, 1, 4, 1
TREE_PARENT = np.array([-1, 0], dtype=np.int32)
PAST, MAX_LEN = 3, 8
TREE_INPUTS = ("query", "key", "value", "key_cache", "value_cache", "past_length", "tree_parent", "compact_src")
TREE_OUTPUTS = ("output", "key_cache_out", "value_cache_out")


class VerifyError(Exception):
    """A failed check, told in one sentence."""


# ------------------------------------------------------------------ protobuf writing
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)  # wire type 0


def _bytes_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _str_field(number: int, text: str) -> bytes:
    return _bytes_field(number, text.encode())


def _float_field(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", value)


def value_info(name: str, elem_type: int, dims: Sequence) -> bytes:
    """ValueInfoProto: name, and a tensor type whose dims are numbers or symbolic names."""
    shape = b"".join(_bytes_field(1, _str_field(2, d) if isinstance(d, str) else _int_field(1, d)) for d in dims)
    tensor_type = _int_field(1, elem_type) + _bytes_field(2, shape)
    return _str_field(1, name) + _bytes_field(2, _bytes_field(1, tensor_type))


def attribute(name: str, value) -> bytes:
    if isinstance(value, float):
        return _str_field(1, name) + _float_field(2, value) + _int_field(20, ATTR_FLOAT)
    return _str_field(1, name) + _int_field(3, value) + _int_field(20, ATTR_INT)


def node(op_type: str, inputs: Sequence[str], outputs: Sequence[str], domain: str = "", **attrs) -> bytes:
    return (b"".join(_str_field(1, i) for i in inputs) + b"".join(_str_field(2, o) for o in outputs)
            + _str_field(4, op_type) + b"".join(_bytes_field(5, attribute(k, v)) for k, v in attrs.items())
            + (_str_field(7, domain) if domain else b""))


def model(nodes: Sequence[bytes], inputs: Sequence[bytes], outputs: Sequence[bytes],
          opsets: dict[str, int]) -> bytes:
    """ModelProto (IR version 8, read by onnxruntime >= 1.10) around one graph."""
    graph = (b"".join(_bytes_field(1, n) for n in nodes) + _str_field(2, "verify")
             + b"".join(_bytes_field(11, v) for v in inputs) + b"".join(_bytes_field(12, v) for v in outputs))
    opset_ids = b"".join(_bytes_field(8, (_str_field(1, d) if d else b"") + _int_field(2, v)) for d, v in opsets.items())
    return _int_field(1, 8) + _str_field(2, "streamspec-verify") + _bytes_field(7, graph) + opset_ids


def mul_model() -> bytes:
    """y = x * x on a float vector of 4."""
    return model([node("Mul", ["x", "x"], ["y"])], [value_info("x", FLOAT, [4])], [value_info("y", FLOAT, [4])],
                 {"": 17})


def tree_attention_model() -> bytes:
    rows = len(TREE_PARENT) * (1 + STREAMS)
    q_width, kv_width = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    cache = [1, KV_HEADS, MAX_LEN, HEAD_DIM]
    inputs = [value_info("query", FLOAT, [1, rows, q_width]), value_info("key", FLOAT, [1, rows, kv_width]),
              value_info("value", FLOAT, [1, rows, kv_width]), value_info("key_cache", FLOAT, cache),
              value_info("value_cache", FLOAT, cache), value_info("past_length", INT64, [1]),
              value_info("tree_parent", INT32, ["N"]), value_info("compact_src", INT32, ["M"])]
    outputs = [value_info("output", FLOAT, [1, rows, q_width]), value_info("key_cache_out", FLOAT, cache),
               value_info("value_cache_out", FLOAT, cache)]
    attention = node("TreeAttention", TREE_INPUTS, TREE_OUTPUTS, domain="streamspec", num_heads=HEADS,
                     kv_num_heads=KV_HEADS, scale=0.0, num_streams=STREAMS)
    return model([attention], inputs, outputs, {"": 17, "streamspec": 1})


# ------------------------------------------------------------------ reference
def tree_attention_feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = len(TREE_PARENT) * (1 + STREAMS)

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return {"query": rand(1, rows, HEADS * HEAD_DIM), "key": rand(1, rows, KV_HEADS * HEAD_DIM),
            "value": rand(1, rows, KV_HEADS * HEAD_DIM), "key_cache": rand(1, KV_HEADS, MAX_LEN, HEAD_DIM),
            "value_cache": rand(1, KV_HEADS, MAX_LEN, HEAD_DIM), "past_length": np.array([PAST], np.int64),
            "tree_parent": TREE_PARENT,
            # Row PAST - 1 moves onto itself: compaction that changes nothing.
            "compact_src": np.array([PAST - 1], np.int32)}


def tree_attention_reference(feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The op's contract (custom_ops/tree_attention.h) in plain numpy, one row at a time."""
    n = len(TREE_PARENT)
    q = feeds["query"][0].reshape(-1, HEADS, HEAD_DIM)
    k = feeds["key"][0].reshape(-1, KV_HEADS, HEAD_DIM)
    v = feeds["value"][0].reshape(-1, KV_HEADS, HEAD_DIM)
    k_cache, v_cache = feeds["key_cache"][0], feeds["value_cache"][0]  # [kv_heads, max_len, dim]

    def ancestors_or_self(i):
        while i >= 0:
            yield i
            i = int(TREE_PARENT[i])

    out = np.zeros_like(q)
    for row in range(q.shape[0]):
        if row < n:
            own, streams = row, []
        else:
            own, j = divmod(row - n, STREAMS)
            streams = [n + own * STREAMS + s for s in range(j + 1)]
        seen = sorted(ancestors_or_self(own)) + streams
        for h in range(HEADS):
            kv = h // (HEADS // KV_HEADS)
            keys = np.concatenate([k_cache[kv, :PAST], k[seen, kv]])
            values = np.concatenate([v_cache[kv, :PAST], v[seen, kv]])
            scores = keys @ q[row, h] / np.sqrt(HEAD_DIM)
            weights = np.exp(scores - scores.max())
            out[row, h] = weights / weights.sum() @ values
    return out.reshape(1, q.shape[0], HEADS * HEAD_DIM)


# ------------------------------------------------------------------ checks
def _session(ort, graph: bytes, provider: str, options=None):
    options = options or ort.SessionOptions()
    options.log_severity_level = 3
    if provider == "cuda":
        # Fail instead of quietly running nodes on the CPU.
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(graph, options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise VerifyError(f"onnxruntime could not create a session: {first_line(exc)}") from None
    if session.get_providers()[0] != providers[0]:
        raise VerifyError(f"{providers[0]} did not load (onnxruntime fell back to {session.get_providers()[0]}): "
                          "check that CUDA and cuDNN match the onnxruntime-gpu build (its log above says which "
                          "library is missing)")
    return session


def check_provider(ort, provider: str) -> str:
    available = ort.get_available_providers()
    if provider == "cuda" and "CUDAExecutionProvider" not in available:
        raise VerifyError(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (it offers "
                          f"{', '.join(available)}): install a Jetson build of onnxruntime-gpu with tools/jetson/setup")
    session = _session(ort, mul_model(), provider)
    x = np.array([1.0, -2.0, 3.0, 0.5], np.float32)
    (y,) = session.run(None, {"x": x})
    if not np.allclose(y, x * x):
        raise VerifyError(f"a Mul on {session.get_providers()[0]} gave {y.tolist()}, not {(x * x).tolist()}")
    return f"{session.get_providers()[0]} runs a model"


def check_custom_op(ort, provider: str) -> str:
    from streamspec.custom_ops import CustomOpError, register

    options = ort.SessionOptions()
    try:
        library = register(options, provider)
    except CustomOpError as error:
        raise VerifyError(str(error)) from None
    session = _session(ort, tree_attention_model(), provider, options)
    feeds = tree_attention_feeds()
    try:
        output, key_cache, _ = session.run(None, feeds)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise VerifyError(f"TreeAttention failed on {provider}: {first_line(exc)}") from None
    error = float(np.abs(output - tree_attention_reference(feeds)).max())
    if not error < 1e-4:
        raise VerifyError(f"TreeAttention on {provider} differs from the reference by {error:.3g}: the library in "
                          f"{library} may be built for another GPU; rebuild it with `streamspec build-ops --cuda --force`")
    # The tree's main rows are written to the cache at rows PAST, PAST + 1, ...
    written = key_cache[0, :, PAST:PAST + len(TREE_PARENT)]
    expected = feeds["key"][0, :len(TREE_PARENT)].reshape(len(TREE_PARENT), KV_HEADS, HEAD_DIM).transpose(1, 0, 2)
    if not np.allclose(written, expected):
        raise VerifyError(f"TreeAttention on {provider} did not write the tree's keys to the cache")
    return f"TreeAttention ({library}) matches the reference (max error {error:.1e})"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamspec.tools.jetson.verify",
                                     description="Check that onnxruntime runs on the GPU and the TreeAttention "
                                                 "custom op loads and computes correctly.")
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda",
                        help="execution provider to check (cpu: check this tool on a machine without a GPU)")
    parser.add_argument("--no-custom-op", action="store_true", help="check only the execution provider")
    args = parser.parse_args(argv)
    try:
        try:
            import onnxruntime as ort
        except ImportError:
            raise VerifyError("onnxruntime is not installed: run tools/jetson/setup") from None
        print(f"onnxruntime {ort.__version__}: {', '.join(ort.get_available_providers())}")
        print("ok:", check_provider(ort, args.provider))
        if not args.no_custom_op:
            print("ok:", check_custom_op(ort, args.provider))
    except VerifyError as error:
        print(f"verify: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
