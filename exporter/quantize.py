"""Weight-only quantization of the step graph with ONNX Runtime's own quantizer.

    proto, record = quantize_weights(proto, "int4", block_size=32, vocab_size=V)

Every MatMul with a constant weight [K, N] becomes a `com.microsoft.MatMulNBits`
(`onnxruntime.quantization.matmul_nbits_quantizer`, round to nearest, asymmetric,
blocks of `block_size` along K, one fp32 scale and one zero point per block; or
another of its algorithms, METHODS below), 8 or 4 bits per weight. With `--quantize int4` the embedding Gather becomes a
`GatherBlockQuantized` as well (4 bits only in ONNX Runtime's quantizer).

Why this scheme keeps speculative == autoregressive: a tree step runs many rows
through each MatMul, an autoregressive step one, and the engine promises that greedy
speculative output equals greedy autoregressive output of the same folder. So a row's
result must not depend on the other rows of the batch. MatMulNBits dequantizes the
weights per block and, by default, computes with the fp32 activations
(`accuracy_level` 1): a row's arithmetic is then that of an fp32 MatMul, and a tree
step and one-token steps differ only by float rounding, exactly as for fp32 weights
(divergence at most at near-ties; tests/test_quantize.py checks it).

`quant_activations="int8"` (`accuracy_level` 4) quantizes the activations to int8 per
row and per block of K, MLAS's fast CompInt8 path on CPU. Each row has its own scales,
so a MatMul's rows are still independent bit for bit; but rounding to int8 turns the
1e-7 float differences that other ops (attention over 1 or N rows) leave into a whole
quantization step now and then, so speculative and autoregressive outputs may part at
near-ties of the order of 1e-3 rather than 1e-4 (on SmolLM2 they parted on 10 of 10
prompts, docs/precision.md). It is offered for speed, not default. "int8-head" gives
int8 activations to the LM head only (the largest MatMul of a step, and a GGUF's 8-bit
head is fast only so) and fp32 activations to every other MatMul.

Dynamic int8 quantization (`quantize_dynamic`: DynamicQuantizeLinear + MatMulInteger)
is not used: it picks ONE activation scale per tensor from the largest value over all
rows, so a node's logits would depend on its siblings in the tree, and speculative
output would not be the autoregressive output of any fixed model. docs/precision.md
has the measurements.

The step graph has no graph I/O change, so the runtime needs nothing new: ONNX Runtime
runs MatMulNBits and GatherBlockQuantized on its CPU and CUDA providers.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from typing import Any, Optional

import numpy as np

from streamspec.errors import StreamspecError

from .graph_edits import drop_dead_nodes

QUANTIZATIONS: dict[str, Optional[int]] = {"none": None, "int8": 8, "int4": 4}  # --quantize -> bits
DEFAULT_BLOCK_SIZE = 32
# --quant-activations -> MatMulNBits accuracy_level: how the input A is computed with
# (1: as fp32; 4: quantized to int8 per row and block of K, the fast CPU path).
ACCURACY_LEVELS = {"fp32": 1, "int8": 4, "int8-head": 1}
# int8-head: int8 activations in the LM head only (N = the vocabulary), the rest fp32:
# the head is the largest MatMul of a step, and an 8-bit GGUF head is fast only so.
HEAD_ACCURACY_LEVELS = {"fp32": 1, "int8": 4, "int8-head": 4}
DEFAULT_ACTIVATIONS = "fp32"
# --quant-method: ONNX Runtime's weight-only algorithms (matmul_nbits_quantizer), all
# without calibration data. default: min/max round to nearest per block (MLAS's own);
# symmetric: the same with the zero point fixed at the middle code (8 for 4 bits, as
# onnxruntime-genai's builder does): no zero-point input, a little faster at int8
# activations (the head 7%, a whole step ~5%: docs/precision.md); rtn: round to nearest
# with clipping ratios; k_quant: llama.cpp-style search of each block's scale and
# minimum; hqq: half-quadratic optimisation of scale and zero point.
# rtn, k_quant and hqq are 4-bit only. (GPTQ needs calibration inputs of the step graph
# itself, not offered.)
METHODS = ("default", "symmetric", "rtn", "k_quant", "hqq")
WHOLE_RANGE = ("default", "symmetric")  # the methods that take 8 bits too


def check_quantization(quantize: str, block_size: int, activations: str = DEFAULT_ACTIVATIONS,
                       method: str = "default") -> Optional[int]:
    """The bits for --quantize (None for "none"); one sentence on bad input. Any --dtype
    goes: MatMulNBits and GatherBlockQuantized have fp32 and fp16 kernels on CPU and CUDA."""
    if quantize not in QUANTIZATIONS:
        raise StreamspecError(f"--quantize must be none, int8 or int4, got {quantize!r}.")
    if activations not in ACCURACY_LEVELS:
        raise StreamspecError(f"--quant-activations must be fp32, int8 or int8-head, got {activations!r}.")
    if method not in METHODS:
        raise StreamspecError(f"--quant-method must be one of {', '.join(METHODS)}, got {method!r}.")
    bits = QUANTIZATIONS[quantize]
    if method not in WHOLE_RANGE and bits != 4:
        raise StreamspecError(f"--quant-method {method} quantizes to 4 bits only; use it with --quantize int4.")
    if bits is None:
        return None
    if block_size < 16 or block_size & (block_size - 1):
        raise StreamspecError(f"--block-size must be a power of two and at least 16, got {block_size}.")
    return bits


def quantize_weights(proto, quantize: str, block_size: int = DEFAULT_BLOCK_SIZE, vocab_size: Optional[int] = None,
                     head: bool = True, activations: str = DEFAULT_ACTIVATIONS,
                     gguf_blocks: Optional[dict[str, Any]] = None, method: str = "default"):
    """Quantize the weights of a step graph (ModelProto) in place of its fp32 ones.
    Returns (ModelProto, the `quantization` record for streamspec.json).

    vocab_size: finds the LM head (`_head_matmuls`); head=False keeps it fp32.
    activations: "fp32" (exact like fp32 weights) or "int8" (faster on CPU), see the
    module docstring. gguf_blocks: the base GGUF's own blocks (`gguf_blocks.read_gguf_blocks`):
    every weight that is exactly a de-quantized GGUF tensor takes its blocks as they are;
    the others are quantized as usual, with `method` (METHODS).
    """
    MatMulNBitsQuantizer, QuantFormat = _quantizer()
    bits = QUANTIZATIONS[quantize]
    _name_nodes(proto)
    _fold_transposed_weights(proto)
    _merge_identical_initializers(proto)
    levels = (ACCURACY_LEVELS[activations], HEAD_ACCURACY_LEVELS[activations])  # (other MatMuls, the LM head)
    heads = _head_matmuls(proto, vocab_size)
    carried, carried_fp32 = _carry_gguf_blocks(proto, gguf_blocks, levels, head, heads) \
        if gguf_blocks else ({}, [])
    chosen, kept = _choose_matmuls(proto, block_size, vocab_size, head, set(carried_fp32))
    gathers = _embedding_gathers(proto) if bits == 4 else []
    # The quantizer takes every node of the chosen op types unless it is excluded by name.
    exclude = kept + [n.name for n in proto.graph.node if n.op_type == "Gather" and n.name not in gathers]
    if chosen or gathers:
        quiet = logging.getLogger("onnxruntime.quantization")  # it logs every node at INFO / WARNING
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            for algorithm, op_types in _passes(method, bool(chosen), bool(gathers)):
                skip = exclude + ([n for n in chosen] if "MatMul" not in op_types else []) \
                    + (gathers if "Gather" not in op_types else [])
                quantizer = MatMulNBitsQuantizer(
                    proto, bits=bits, block_size=block_size, is_symmetric=method == "symmetric",
                    accuracy_level=ACCURACY_LEVELS[activations], nodes_to_exclude=skip,
                    quant_format=QuantFormat.QOperator, op_types_to_quantize=op_types,
                    quant_axes=(("MatMul", 0), ("Gather", 1)),
                    algo_config=_algo_config(algorithm, bits, block_size, op_types))
                with contextlib.redirect_stdout(io.StringIO()):  # rtn / k_quant print a progress bar
                    quantizer.process()
                proto = quantizer.model.model
        finally:
            quiet.setLevel(level)
    # Every MatMulNBits computes as --quant-activations says (HQQ leaves it unset); the LM
    # heads as their own setting (ONNX Runtime's quantizer names its nodes NAME_Q4 / _Q8).
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            is_head = node.name in heads or node.name.rsplit("_Q", 1)[0] in heads
            _set_attribute(node, "accuracy_level", levels[1] if is_head else levels[0])
    _drop_duplicate_initializers(proto)
    drop_dead_nodes(proto.graph)
    record = {"method": "MatMulNBits", "algorithm": method, "bits": bits, "block_size": block_size,
              "symmetric": method == "symmetric",
              "activations": activations, "accuracy_level": levels[0], "head_accuracy_level": levels[1],
              "matmuls": len(chosen), "matmuls_kept_fp32": len(kept), "lm_head": head,
              "embedding": "GatherBlockQuantized" if gathers or any(
                  n.op_type == "GatherBlockQuantized" for n in proto.graph.node) else "fp32"}
    if carried:
        record["gguf_blocks"] = carried
    return proto, record


def _carry_gguf_blocks(proto, blocks: dict[str, Any], levels: tuple[int, int], head: bool,
                       lm_heads: set[str]) -> tuple[dict[str, Any], list[str]]:
    """Replace every MatMul (and the embedding Gather) whose constant fp32 weight is a
    de-quantized GGUF tensor by MatMulNBits (GatherBlockQuantized) over that tensor's
    own blocks (exporter/gguf_blocks.py). Returns (what was carried per GGUF type, the
    MatMuls that must stay fp32).

    Two of ONNX Runtime's CPU kernels are far slower than fp32 (measured, docs/precision.md):
    MatMulNBits with float zero points (~30x) and 8-bit weights with fp32 activations
    (~100x). So a block w = q·d + m with a fractional zero point (Q4_1, Q4_K) goes in with
    the kernel's default zero point z = 2**(bits-1) and its offsets from it as a second,
    small product:

        x · Wᵀ = MatMulNBits(x, q, d) + (x · S) · Mᵀ
        S [K, K/block] sums each block of x, M [N, K/block] holds the offsets m + z·d

    the same numbers up to float rounding, at the fast kernel's speed; and an 8-bit
    tensor (Q8_0, Q6_K) feeding a MatMul is carried only with int8 activations
    (accuracy_level 4), else that MatMul keeps the de-quantized fp32 weight (exact).
    levels: the accuracy level of the other MatMuls and of the LM heads `lm_heads` (names;
    head=False keeps them fp32)."""
    from onnx import helper, numpy_helper

    from .gguf_blocks import weight_key

    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    keys: dict[str, Optional[str]] = {}  # initializer -> matching key (None: no match)

    def match(name: str) -> Optional[Any]:
        tensor = initializers.get(name)
        if tensor is None or len(tensor.dims) != 2 or tensor.data_type != 1:  # fp32 2-D only
            return None
        if name not in keys:
            key = weight_key(numpy_helper.to_array(tensor, base_dir=""))
            keys[name] = key if key in blocks else None
        return blocks[keys[name]] if keys[name] else None

    added: set[str] = set()

    def add(name: str, array: np.ndarray) -> str:
        if name not in added:
            graph.initializer.append(numpy_helper.from_array(array, name))
            added.add(name)
        return name

    block_sums: dict[tuple[str, int, int], str] = {}  # (input, K, block) -> its block sums [.., K/block]
    counts: dict[str, int] = {}
    keep_fp32: list[str] = []
    replaced: dict[int, list] = {}
    for index, node in enumerate(graph.node):
        if node.op_type == "MatMul" and (head or node.name not in lm_heads):
            found = match(node.input[1])
            if found is None:
                continue
            w, x, (n, k) = node.input[1], node.input[0], found.codes.shape
            accuracy_level = levels[1] if node.name in lm_heads else levels[0]
            if found.bits == 8 and accuracy_level == 1:
                keep_fp32.append(node.name)  # the de-quantized weight, exactly; see the docstring
                continue
            integer = found.integer_zero_points()
            # Without a zero-point input MatMulNBits uses 2**(bits-1). That input is left out
            # where every block has that zero point (Q4_0, Q8_0), and fractional zero points
            # (Q4_1, Q4_K) take their offsets from it in a second product below: codes centred
            # on it keep int8 activations' rounding error small, since the common part of the
            # weights (m + z·d per block) then goes through the exact fp32 product
            # (docs/precision.md: agreement with fp32 19% -> 54%; the same speed).
            default_zero = 1 << (found.bits - 1)
            inputs = [x, add(f"{w}.gguf_q", found.packed()), add(f"{w}.gguf_scales", found.scales)]
            if integer is not None and not np.all(found.zero_points == default_zero):
                inputs.append(add(f"{w}.gguf_zero_points{found.bits}", integer))
            blocks_out = node.output[0] if integer is not None else f"{node.output[0]}.blocks"
            new = []
            new.append(helper.make_node(
                "MatMulNBits", inputs, [blocks_out], name=node.name, domain="com.microsoft", K=k, N=n,
                bits=found.bits, block_size=found.block_size, accuracy_level=accuracy_level))
            if blocks_out != node.output[0]:
                key = (x, k, found.block_size)
                if key not in block_sums:
                    sums = np.kron(np.eye(k // found.block_size, dtype=np.float32),
                                   np.ones((found.block_size, 1), np.float32))  # S [K, K/block]
                    block_sums[key] = f"{x}.block_sums{found.block_size}"
                    new.insert(0, helper.make_node("MatMul", [x, add(f"block_sums.{k}.{found.block_size}", sums)],
                                                   [block_sums[key]], name=f"{node.name}.block_sums"))
                    keep_fp32.append(f"{node.name}.block_sums")
                offsets = np.ascontiguousarray(found.offsets(default_zero).T)  # Mᵀ [K/block, N]
                new.append(helper.make_node("MatMul", [block_sums[key], add(f"{w}.gguf_offsets", offsets)],
                                            [f"{node.output[0]}.offsets"], name=f"{node.name}.offsets"))
                new.append(helper.make_node("Add", [blocks_out, f"{node.output[0]}.offsets"], list(node.output),
                                            name=f"{node.name}.add_offsets"))
                keep_fp32.append(f"{node.name}.offsets")
        elif node.op_type == "Gather" and _axis(node) == 0:
            found = match(node.input[0])
            if found is None or found.bits != 8:  # 8-bit tables only: a Gather's zero points are uint8
                continue
            w = node.input[0]
            zero = found.zero_points.astype(np.uint8)
            if not np.array_equal(zero, found.zero_points):
                continue
            new = [helper.make_node(
                "GatherBlockQuantized", [add(f"{w}.gguf_q8", found.codes), node.input[1],
                                         add(f"{w}.gguf_scales", found.scales), add(f"{w}.gguf_zero_points8", zero)],
                list(node.output), name=node.name, domain="com.microsoft", bits=8, block_size=found.block_size,
                gather_axis=0, quantize_axis=1)]
        else:
            continue
        replaced[index] = new
        counts[found.gguf_type] = counts.get(found.gguf_type, 0) + 1
    if replaced:
        order = [n for index, node in enumerate(graph.node) for n in replaced.get(index, [node])]
        graph.ClearField("node")
        graph.node.extend(order)
    if replaced and not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return counts, keep_fp32


def _passes(method: str, matmuls: bool, gathers: bool) -> list[tuple[str, tuple[str, ...]]]:
    """(algorithm, op types) per quantizer pass: the embedding Gather always takes the
    default algorithm (the others quantize MatMuls only)."""
    if method in WHOLE_RANGE:
        return [(method, ("MatMul", "Gather") if gathers else ("MatMul",))]
    return ([(method, ("MatMul",))] if matmuls else []) + ([("default", ("Gather",))] if gathers else [])


def _algo_config(method: str, bits: int, block_size: int, op_types: tuple[str, ...]):
    """ONNX Runtime's configuration object of an algorithm (None: its default)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as q

    if method in WHOLE_RANGE:  # the quantizer's own, with its is_symmetric
        return None
    if method == "hqq":
        return q.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, op_types_to_quantize=op_types)
    config = (q.RTNWeightOnlyQuantConfig if method == "rtn" else q.KQuantWeightOnlyQuantConfig)(
        op_types_to_quantize=op_types)
    return config


def _set_attribute(node, name: str, value: int) -> None:
    from onnx import helper

    kept = [a for a in node.attribute if a.name != name]
    node.ClearField("attribute")
    node.attribute.extend(kept + [helper.make_attribute(name, value)])


def _quantizer():
    """ONNX Runtime's quantizer classes. Importing the module calls logging.basicConfig
    at INFO level, which would make every library in the process chatty; undo that."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    return MatMulNBitsQuantizer, QuantFormat


# ------------------------------------------------------------------------------ graph preparation
def _name_nodes(proto) -> None:
    # nodes_to_exclude matches by name; traced graphs name their nodes, but be sure.
    names = set()
    for i, node in enumerate(proto.graph.node):
        if not node.name or node.name in names:
            node.name = f"{node.op_type}_{i}_q"
        names.add(node.name)


def _fold_transposed_weights(proto) -> None:
    """MatMul(x, Transpose(W)) -> MatMul(x, W^T) with W^T a new initializer (one per W).

    A tied LM head is traced as MatMul(x, Transpose(embedding)), which onnxslim leaves
    unfolded for large vocabularies (it would double the file); the quantizer only
    quantizes constant weights, so the head needs its own transposed copy. The copy is
    then quantized, so it costs 1/8 or 1/4 of the fp32 matrix.
    """
    from onnx import numpy_helper

    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    folded: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in producers:
            continue
        transpose = producers[node.input[1]]
        source = transpose.input[0] if transpose.op_type == "Transpose" else None
        if source not in initializers or len(initializers[source].dims) != 2 or _perm(transpose) not in (None, [1, 0]):
            continue
        if source not in folded:
            folded[source] = f"{source}.transposed"
            array = numpy_helper.to_array(initializers[source], base_dir="")
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.T), folded[source]))
        node.input[1] = folded[source]


def _perm(node) -> Optional[list[int]]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def _merge_identical_initializers(proto) -> None:
    """Point every user of a duplicate initializer at one copy (onnxslim folds the head's
    transpose once per consumer: main, stream and exit head), so it is quantized and
    stored once."""
    from onnx import numpy_helper

    graph = proto.graph
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    for tensor in graph.initializer:
        if len(tensor.dims) != 2:
            continue
        array = numpy_helper.to_array(tensor, base_dir="")
        key = (array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest())
        if key in first:
            rename[tensor.name] = first[key]
        else:
            first[key] = tensor.name
    if not rename:
        return
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    kept = [t for t in graph.initializer if t.name not in rename]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)


def _choose_matmuls(proto, block_size: int, vocab_size: Optional[int], head: bool,
                    fp32: frozenset = frozenset()) -> tuple[list[str], list[str]]:
    """(MatMuls to quantize, MatMuls kept fp32). Kept: the head when head=False, the
    names in `fp32`, and matrices with a side shorter than a block (the low-rank stream
    adapters: a few KiB, and quantizing them would only cost accuracy)."""
    initializers = {t.name: t for t in proto.graph.initializer}
    heads = _head_matmuls(proto, vocab_size) if not head else set()
    chosen, kept = [], []
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers:
            continue
        dims = list(initializers[node.input[1]].dims)
        small = len(dims) != 2 or min(dims) < block_size
        (kept if small or node.name in heads or node.name in fp32 else chosen).append(node.name)
    return chosen, kept


def _head_matmuls(proto, vocab_size: Optional[int]) -> set[str]:
    """The LM-head MatMuls: N == vocab_size, and their output reaches a TopK or a graph
    output (the step's outputs) without passing through another MatMul, unlike an MLP
    that happens to be as wide as the vocabulary."""
    graph = proto.graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {t.name: t for t in graph.initializer}
    outputs = {v.name for v in graph.output}

    def reaches_output(node) -> bool:
        seen, todo = set(), list(node.output)
        while todo:
            name = todo.pop()
            if name in outputs:
                return True
            for user in consumers.get(name, []):
                if user.op_type == "TopK":
                    return True
                if user.op_type not in ("MatMul", "MatMulNBits") and user.name not in seen:
                    seen.add(user.name)
                    todo.extend(user.output)
        return False

    return {node.name for node in graph.node
            if node.op_type == "MatMul" and node.input[1] in initializers
            and list(initializers[node.input[1]].dims)[-1:] == [vocab_size] and reaches_output(node)}


def _embedding_gathers(proto) -> list[str]:
    """Gathers of rows of a constant 2-D table (the token embedding)."""
    initializers = {t.name: t for t in proto.graph.initializer}
    return [node.name for node in proto.graph.node
            if node.op_type == "Gather" and node.input[0] in initializers
            and len(initializers[node.input[0]].dims) == 2 and _axis(node) == 0]


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


# ------------------------------------------------------------------------------ clean-up
def _drop_duplicate_initializers(proto) -> None:
    # A weight shared by several MatMuls is quantized once per MatMul, under the same
    # name and with the same bytes; keep the first.
    seen, kept = set(), []
    for tensor in proto.graph.initializer:
        if tensor.name not in seen:
            seen.add(tensor.name)
            kept.append(tensor)
    if len(kept) != len(proto.graph.initializer):
        proto.graph.ClearField("initializer")
        proto.graph.initializer.extend(kept)


def describe(record: Optional[dict[str, Any]]) -> str:
    """One line for the export summary: 'int4 weights (MatMulNBits, blocks of 32)'."""
    if not record:
        return "fp32 weights"
    return f"int{record['bits']} weights ({record['method']}, blocks of {record['block_size']})"
