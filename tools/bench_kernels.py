"""One quantized MatMul against fp32, per kernel variant and number of rows: which of ONNX
Runtime's `MatMulNBits` CPU paths are fast, side by side in one run.

    streamspec bench kernels                       # SmolLM2's MLP (576 x 1536) and head (576 x 49152)
    streamspec bench kernels --rows 1 4 12 --threads 2

(`python -m streamspec.tools.bench_kernels ...` runs the same command.)

What decides how the exporter lays out a quantized weight (exporter/quantize.py): the
zero points' type (float, as a GGUF's Q4_1 offsets would need, uint8, or none: the
default 2^(bits-1)), the bits, and `accuracy_level` (1: fp32 activations; 4: int8
activations per row and block). Rows are the tree step's rows (1: an autoregressive
step). Each variant is one single-node graph over random weights (blocks of 32) in its
own session; after a warm-up, each repeat runs every variant in turn, the order reversed
on alternate repeats (`harness.time_steps`); the median per variant is reported.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from streamspec.tools.cli import bench_main
from streamspec.tools.harness import time_steps

# (K, N) of SmolLM2's MLP up-projection, of its gate and up projections merged into one
# (exporter/fusions.py), and of its LM head
SHAPES = {"mlp": (576, 1536), "gate_up": (576, 3072), "head": (576, 49152)}
ROWS = (1, 4, 12)
BLOCK = 32


@dataclass(frozen=True)
class Variant:
    """One MatMul kernel: bits None is the fp32 MatMul."""

    bits: Optional[int]
    zero_points: str = "none"  # "float", "uint8" or "none"
    accuracy_level: int = 1

    @property
    def name(self) -> str:
        if self.bits is None:
            return "fp32 MatMul"
        return f"int{self.bits}, {self.zero_points} zero points, level {self.accuracy_level}"


VARIANTS = (Variant(None), Variant(4, "float", 1), Variant(4, "uint8", 1), Variant(4, "uint8", 4),
            Variant(4, "none", 1), Variant(4, "none", 4), Variant(8, "uint8", 1), Variant(8, "uint8", 4))


def graph(variant: Variant, k: int, n: int):
    """A one-node ModelProto: x [rows, K] -> y [rows, N]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])
    if variant.bits is None:
        weight = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32) * 0.05, "w")
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        return helper.make_model(helper.make_graph([node], "g", [x], [y], [weight]),
                                 opset_imports=[helper.make_opsetid("", 17)])
    blocks = k // BLOCK
    codes = rng.integers(0, 256, (n, blocks, BLOCK * variant.bits // 8), dtype=np.uint8)
    inputs = [numpy_helper.from_array(codes, "q"),
              numpy_helper.from_array(rng.random(n * blocks).astype(np.float32) * 0.01, "scales")]
    if variant.zero_points == "float":
        inputs.append(numpy_helper.from_array(rng.random(n * blocks).astype(np.float32) * 8, "zero_points"))
    elif variant.zero_points == "uint8":
        per_row = (blocks * variant.bits + 7) // 8
        inputs.append(numpy_helper.from_array(rng.integers(0, 256, n * per_row, dtype=np.uint8), "zero_points"))
    node = helper.make_node("MatMulNBits", ["x"] + [t.name for t in inputs], ["y"], domain="com.microsoft", K=k, N=n,
                            bits=variant.bits, block_size=BLOCK, accuracy_level=variant.accuracy_level)
    return helper.make_model(helper.make_graph([node], "g", [x], [y], inputs),
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def run(shapes: dict[str, tuple[int, int]], rows: tuple[int, ...], threads: int, repeats: int,
        variants: tuple[Variant, ...] = VARIANTS, show: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Median microseconds per (shape, variant, rows)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    results = []
    for shape_name, (k, n) in shapes.items():
        sessions = {v: ort.InferenceSession(graph(v, k, n).SerializeToString(), options,
                                            providers=["CPUExecutionProvider"]) for v in variants}
        for count in rows:
            x = np.random.default_rng(1).standard_normal((count, k)).astype(np.float32)
            steps = {v.name: (lambda s=s: s.run(None, {"x": x})) for v, s in sessions.items()}
            times = time_steps(steps, repeats, warmup=3, settle=True)
            fp32 = statistics.median(times[Variant(None).name])
            for v in variants:
                micros = statistics.median(times[v.name]) * 1e6
                results.append({"shape": shape_name, "K": k, "N": n, "rows": count, "kernel": v.name,
                                "bits": v.bits, "zero_points": v.zero_points if v.bits else None,
                                "accuracy_level": v.accuracy_level if v.bits else None,
                                "median_us": micros, "times_fp32": micros / (fp32 * 1e6)})
            show(f"{shape_name} {k}x{n}, {count} rows: done")
    import onnxruntime

    return {"settings": {"shapes": shapes, "rows": list(rows), "threads": threads, "repeats": repeats,
                         "block_size": BLOCK},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                        "onnxruntime": onnxruntime.__version__},
            "method": __doc__.split("What decides")[1].strip(), "results": results}


def render(report: dict[str, Any]):
    """One rich Table per shape: kernels down, rows across (µs and × fp32)."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    tables = []
    rows = report["settings"]["rows"]
    for shape in dict.fromkeys(r["shape"] for r in report["results"]):
        entries = [r for r in report["results"] if r["shape"] == shape]
        first = entries[0]
        title = (f"{shape}: one MatMul [rows, {first['K']}] x [{first['K']}, {first['N']}], median µs "
                 f"(× the fp32 MatMul's), {report['settings']['threads']} threads")
        table = Table(title=escape(title),
                      box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
        table.add_column("kernel", no_wrap=True)
        for count in rows:
            table.add_column(f"{count} row{'s' * (count > 1)}", justify="right", no_wrap=True)
        for kernel in dict.fromkeys(r["kernel"] for r in entries):
            cells = {r["rows"]: r for r in entries if r["kernel"] == kernel}
            table.add_row(kernel, *(f"{cells[c]['median_us']:.0f} ({cells[c]['times_fp32']:.2f}×)" for c in rows))
        tables.append(table)
    return tables


main = bench_main("kernels")  # python -m streamspec.tools.bench_kernels ARGS: streamspec bench kernels ARGS

if __name__ == "__main__":
    sys.exit(main())
