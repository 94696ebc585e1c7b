"""Per-step latency of the two attention backends, `custom` (streamspec.TreeAttention)
against `portable` (GroupQueryAttention + tree bias): whole steps, and the attention op
alone per layer kind.

    streamspec bench attention                   # SmolLM2 with 3 streams, CPU
    streamspec bench attention --model tiny      # a quick check
    streamspec bench attention --provider cuda   # GPU (tools/gpu_check.sh runs it)

(`python -m streamspec.tools.bench_attention ...` runs the same command.)

The model is exported once per backend into <cache>/bench/attention/ (the weights are
the base model's plus randomly initialised stream adapters: latency does not depend on
their values). One step = one `StepSession.run` of a random tree of T nodes, every node
with its γ stream rows and its outputs (what the engine runs while drafting), over a
cache of P committed rows. Both backends are loaded side by side; after a warm-up each
repeat runs them in turn, alternating which goes first (`harness.time_steps`), so that
drifting machine load hits both alike; the medians of the repeats are reported, and the speed-up is the median
of the per-repeat ratios (two steps run back to back), which drifting load disturbs least.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

from streamspec.errors import StreamspecError, first_line
from streamspec.tools.cli import bench_main
from streamspec.tools.harness import time_steps

BACKENDS = ("portable", "custom")
TREE_SIZES = (1, 8, 16, 32, 64)
PAST_LENGTHS = (128, 1024, 4096)
NUM_STREAMS = 3
# (query heads, kv heads, head_dim) of the benchmarked models.
HEADS = {"smollm2": (9, 3, 64), "tiny": (4, 2, 16)}


# ------------------------------------------------------------------------------ folders
def _tiny_base(root: Path) -> Path:
    """A 4-layer random Llama with SmolLM2's tokenizer (the exporter needs a real one)."""
    import shutil

    import transformers

    from streamspec.models.loading import resolve_base

    folder = root / "tiny-base"
    if (folder / "config.json").is_file():
        return folder
    smollm2 = resolve_base("default", progress=False)
    config = transformers.LlamaConfig(vocab_size=transformers.AutoConfig.from_pretrained(str(smollm2)).vocab_size,
                                      hidden_size=HEADS["tiny"][0] * HEADS["tiny"][2], intermediate_size=128,
                                      num_hidden_layers=4, num_attention_heads=HEADS["tiny"][0],
                                      num_key_value_heads=HEADS["tiny"][1], max_position_embeddings=8192,
                                      tie_word_embeddings=True)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (smollm2 / name).is_file() and not (folder / name).is_file():
            shutil.copy(smollm2 / name, folder / name)
    return folder


def export_folders(model_name: str, max_length: int, force: bool) -> dict[str, Path]:
    """backend -> deployable folder of the same MSA model, exported once into the cache."""
    import torch

    from streamspec.exporter import export_model
    from streamspec.models.config import StreamConfig
    from streamspec.models.loading import cache_root, resolve_base
    from streamspec.models.model import build_model

    root = cache_root() / "bench" / "attention"
    base = _tiny_base(root) if model_name == "tiny" else resolve_base("default", progress=False)
    folders = {b: root / f"{model_name}-{b}-{max_length}" for b in BACKENDS}
    missing = [b for b, folder in folders.items() if force or not (folder / "streamspec.json").is_file()]
    if missing:
        layers = 2 if model_name == "tiny" else StreamConfig().num_msa_layers
        model = build_model(base, StreamConfig(num_streams=NUM_STREAMS, num_msa_layers=layers))
        torch.manual_seed(0)  # adapters away from zero, as after training
        with torch.no_grad():
            for param in model.trainable_parameters().values():
                param.normal_(0.0, 0.02)
        for backend in missing:
            export_model(model.eval(), base, folders[backend], backend=backend, max_length=max_length, force=True,
                         source={"kind": "base", "name": f"{model_name} (bench-attention)"}, base_dir=base)
    return folders


# ------------------------------------------------------------------------------ timing
def random_parents(rng: np.random.Generator, nodes: int) -> np.ndarray:
    """int32 [nodes]: a random tree's parent indices, -1 for the root, each before its children."""
    return np.array([-1] + [int(rng.integers(0, i)) for i in range(1, nodes)], dtype=np.int32)


def tree_feeds(rng: np.random.Generator, nodes: int, past: int, vocab: int) -> dict[str, np.ndarray]:
    """Greedy feeds for a random tree of `nodes` nodes after `past` committed rows."""
    parents = random_parents(rng, nodes)
    mask = np.eye(nodes, dtype=bool)
    depth = np.zeros(nodes, dtype=np.int64)
    for i in range(1, nodes):  # parents come first, so their rows are complete
        mask[i] |= mask[parents[i]]
        depth[i] = depth[parents[i]] + 1
    all_nodes, none = np.arange(nodes, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return dict(input_ids=rng.integers(0, vocab, nodes).astype(np.int64), positions=past + depth, tree_mask=mask,
                tree_parent=parents, past_length=np.array([past], dtype=np.int64), compact_src=none,
                stream_nodes=all_nodes, output_nodes=all_nodes, sample_rows=none, exit_nodes=none,
                temperature=np.ones(1, np.float32), top_k=np.zeros(1, np.int64), top_p=np.ones(1, np.float32),
                uniform=np.zeros(0, np.float32))


# ------------------------------------------------------------------------------ the ops alone
OP_INPUTS = {"custom": ["query", "key", "value", "key_cache", "value_cache", "past_length", "tree_parent",
                        "compact_src"],
             "portable": ["query", "key", "value", "key_cache", "value_cache", "seqlens_k", "total_sequence_length",
                          "", "", "", "attention_bias"]}


def op_model(backend: str, num_heads: int, kv_num_heads: int, head_dim: int, num_streams: int = 0,
             dtype: Any = np.float32, scale: float = 0.0, max_len: Optional[int] = None) -> Any:
    """A one-node ONNX graph of one backend's attention op: streamspec.TreeAttention
    ("custom") or com.microsoft.GroupQueryAttention with an attention bias ("portable").
    Rows are [1, S, heads * head_dim], caches [1, kv_num_heads, max_len (or "L"), head_dim]."""
    from onnx import TensorProto, helper

    elem = TensorProto.FLOAT if np.dtype(dtype) == np.float32 else TensorProto.FLOAT16
    cache = [1, kv_num_heads, max_len or "L", head_dim]
    tensors = {"query": (elem, [1, "S", num_heads * head_dim]), "key": (elem, [1, "S", kv_num_heads * head_dim]),
               "value": (elem, [1, "S", kv_num_heads * head_dim]), "key_cache": (elem, cache),
               "value_cache": (elem, cache), "past_length": (TensorProto.INT64, [1]),
               "tree_parent": (TensorProto.INT32, ["N"]), "compact_src": (TensorProto.INT32, ["M"]),
               "seqlens_k": (TensorProto.INT32, [1]), "total_sequence_length": (TensorProto.INT32, []),
               "attention_bias": (elem, [1, 1, "S", "T"]), "output": (elem, [1, "S", num_heads * head_dim]),
               "key_cache_out": (elem, cache), "value_cache_out": (elem, cache)}
    outputs = ["output", "key_cache_out", "value_cache_out"]
    if backend == "custom":
        node = helper.make_node("TreeAttention", OP_INPUTS[backend], outputs, domain="streamspec", num_heads=num_heads,
                                kv_num_heads=kv_num_heads, scale=float(scale), num_streams=num_streams)
        domain = "streamspec"
    else:
        node = helper.make_node("GroupQueryAttention", OP_INPUTS[backend], outputs, domain="com.microsoft",
                                num_heads=num_heads, kv_num_heads=kv_num_heads, scale=float(scale))
        domain = "com.microsoft"
    values = [helper.make_tensor_value_info(name, *tensors[name]) for name in OP_INPUTS[backend] if name]
    graph = helper.make_graph([node], f"{backend}_attention", values,
                              [helper.make_tensor_value_info(name, *tensors[name]) for name in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)],
                             ir_version=8)


class BoundOp:
    """One op session on `provider` ("cpu" or "cuda") with every input on that device and
    the caches bound in place (as the runtime binds them); `run(feeds)` ignores `feeds`,
    so `measure` can time it like a step."""

    def __init__(self, backend: str, model: Any, feeds: dict[str, np.ndarray], threads: Optional[int],
                 provider: str = "cpu"):
        import onnxruntime as ort

        from streamspec import custom_ops

        options = ort.SessionOptions()
        options.log_severity_level = 3
        # An op takes well under a millisecond at short caches: the other session's
        # threads, spinning after its run, would still be stealing the cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        if backend == "custom":
            custom_ops.register(options, provider)
        device = "cuda" if provider == "cuda" else "cpu"
        providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        self.binding = self.session.io_binding()
        # The OrtValues must outlive the runs: kept on the object.
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(feeds[name]), device, 0)
                       for name in filter(None, OP_INPUTS[backend])}
        for name, value in self.values.items():
            self.binding.bind_ortvalue_input(name, value)
        self.binding.bind_output("output", device)
        self.binding.bind_ortvalue_output("key_cache_out", self.values["key_cache"])
        self.binding.bind_ortvalue_output("value_cache_out", self.values["value_cache"])

    def run(self, feeds: Any = None) -> None:
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()


def op_feeds(rng: np.random.Generator, heads: tuple[int, int, int], nodes: int, num_streams: int, past: int,
             max_len: int, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Both ops' inputs for one layer of a random tree step; the bias has GroupQueryAttention's
    full [rows, past + rows] shape (its values do not change the op's work)."""
    num_heads, kv_num_heads, head_dim = heads
    rows = nodes * (1 + num_streams)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(dtype)

    parents = random_parents(rng, nodes)
    bias = np.zeros((1, 1, rows, past + rows), dtype=dtype)
    bias[..., past:] = np.where(np.tri(rows, dtype=bool), 0.0, -np.inf)
    return dict(query=rand(1, rows, num_heads * head_dim), key=rand(1, rows, kv_num_heads * head_dim),
                value=rand(1, rows, kv_num_heads * head_dim), key_cache=rand(1, kv_num_heads, max_len, head_dim),
                value_cache=rand(1, kv_num_heads, max_len, head_dim), past_length=np.array([past], dtype=np.int64),
                tree_parent=parents, compact_src=np.zeros(0, dtype=np.int32),
                seqlens_k=np.array([past + rows - 1], dtype=np.int32),
                total_sequence_length=np.array(past + rows, dtype=np.int32), attention_bias=bias)


def measure(sessions: dict[str, Any], feeds: dict[str, np.ndarray], warmup: int,
            repeats: int) -> tuple[dict[str, float], Optional[float]]:
    """Median step milliseconds per backend, the backends interleaved, and the median
    of the per-repeat ratios portable / custom (each ratio compares two steps run back
    to back, so load that drifts between repeats cancels out). Each timed step follows
    an untimed one of the same session (`time_steps(settle=True)`): ops this short would
    otherwise share the cores with the other session's spinning threads."""
    times = time_steps({name: lambda s=session: s.run(feeds) for name, session in sessions.items()}, repeats,
                       warmup=warmup, settle=True)
    medians = {name: 1000 * statistics.median(values) for name, values in times.items()}
    if "portable" not in times:
        return medians, None
    ratio = statistics.median(p / c for p, c in zip(times["portable"], times["custom"]))
    return medians, ratio


def step_table(folders: dict[str, Path], args: Any, max_length: int, console: Any) -> list[dict]:
    """Whole step graphs of both backends, side by side: one row per (past, tree)."""
    from streamspec.runtime.folder import read_folder
    from streamspec.runtime.session import StepSession

    sessions = {b: StepSession(read_folder(folders[b]), args.provider, max_length, args.threads) for b in BACKENDS}
    config = read_folder(folders["custom"])
    if (config.num_heads, config.num_kv_heads, config.head_dim) != HEADS[args.model]:
        raise StreamspecError(f"{folders['custom']} does not have {args.model}'s attention shape; use --force-export.")
    vocab = config.vocab_size
    rng = np.random.default_rng(0)
    rows = []
    for past in args.pasts:
        for nodes in args.trees:
            with console.status(f"step: past {past}, tree {nodes}"):
                ms, ratio = measure(sessions, tree_feeds(rng, nodes, past, vocab), args.warmup, args.repeats)
            rows.append({"past_length": past, "tree_size": nodes, "portable_ms": ms["portable"],
                         "custom_ms": ms["custom"], "speedup": ratio})
            console.log(f"step: past {past:5d} tree {nodes:3d}: portable {ms['portable']:.2f} ms, "
                        f"custom {ms['custom']:.2f} ms")
    return rows


def op_table(args: Any, max_length: int, console: Any) -> list[dict]:
    """The attention op alone with the model's head shapes: one row per (past, tree, layer
    kind), lower layers with the tree's rows, MSA layers with its stream rows too. Needs
    neither torch nor an export (tools/gpu_check.sh runs it with onnxruntime-gpu alone)."""
    heads = HEADS[args.model]
    dtype = np.float16 if args.op_dtype == "float16" else np.float32
    rng = np.random.default_rng(0)
    backends = list(BACKENDS)
    rows = []
    for past in args.pasts:
        for nodes in args.trees:
            for layer, gamma in (("lower", 0), ("MSA", NUM_STREAMS)):
                feeds = op_feeds(rng, heads, nodes, gamma, past, max_length, dtype)
                ops = {b: BoundOp(b, op_model(b, *heads, gamma, dtype, max_len=max_length), feeds, args.threads,
                                  args.provider) for b in backends}
                if "portable" in ops:
                    try:
                        ops["portable"].run()
                    except Exception as error:  # onnxruntime raises several unrelated types
                        # e.g. onnxruntime-gpu before mid-2026: GroupQueryAttention's CUDA
                        # kernel rejects attention_bias. Time TreeAttention alone then.
                        console.print(f"GroupQueryAttention with an attention bias does not run on {args.provider} "
                                      f"with this onnxruntime ({first_line(error, 200)}); timing TreeAttention alone.")
                        backends.remove("portable")
                        del ops["portable"]
                with console.status(f"op alone: past {past}, tree {nodes}, {layer} layer"):
                    ms, ratio = measure(ops, feeds, args.warmup, args.repeats)
                rows.append({"past_length": past, "tree_size": nodes, "layer": layer, "rows": nodes * (1 + gamma),
                             "portable_ms": ms.get("portable"), "custom_ms": ms["custom"], "speedup": ratio})
    return rows


def render(title: str, rows: list[dict], console: Any) -> None:
    from rich.table import Table

    table = Table(title=title)
    layers = rows and "layer" in rows[0]
    columns = ["past", "tree"] + (["layer (rows)"] if layers else []) + ["portable", "custom",
                                                                         "custom speedup (paired)"]
    for column in columns:
        table.add_column(column, justify="right")
    digits = 3 if layers else 2
    for row in rows:
        cells = [str(row["past_length"]), str(row["tree_size"])]
        if layers:
            cells.append(f"{row['layer']} ({row['rows']})")
        cells += ["n/a" if row["portable_ms"] is None else f"{row['portable_ms']:.{digits}f}",
                  f"{row['custom_ms']:.{digits}f}", "n/a" if row["speedup"] is None else f"{row['speedup']:.2f}x"]
        table.add_row(*cells)
    console.print(table)


def run(args: Any, console: Any) -> dict[str, Any]:
    """Both tables (or the chosen ones) as a JSON-ready report, printed as they complete."""
    import onnxruntime as ort

    from streamspec import custom_ops

    if args.provider == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise StreamspecError("onnxruntime has no CUDAExecutionProvider here: install onnxruntime-gpu.")
        # Not built here (that takes minutes per architecture): a missing or mismatched
        # CUDA library raises its one sentence (how to build it) now, before the exports.
        custom_ops.register(ort.SessionOptions(), "cuda")
    else:
        custom_ops.build()  # cached: a no-op unless the kernels changed
    # Room for the largest tree's main and stream rows after the longest past.
    needed = max(args.pasts) + max(args.trees) * (1 + NUM_STREAMS)
    max_length = -(-needed // 256) * 256
    report: dict[str, Any] = {"model": args.model, "provider": args.provider, "op_dtype": args.op_dtype,
                              "num_streams": NUM_STREAMS, "repeats": args.repeats, "warmup": args.warmup,
                              "threads": args.threads, "onnxruntime": ort.__version__, "machine": platform.machine(),
                              "cpu_count": os.cpu_count()}
    if "steps" in args.tables:
        with console.status(f"Exporting {args.model} with both backends (once, cached)"):
            folders = export_folders(args.model, max_length, args.force_export)
        report["folders"] = {b: str(f) for b, f in folders.items()}
        report["results"] = step_table(folders, args, max_length, console)
        render(f"Step latency on {args.provider}, {args.model}, γ={NUM_STREAMS} (median of {args.repeats}, ms)",
               report["results"], console)
    if "ops" in args.tables:
        report["op_results"] = op_table(args, max_length, console)
        render(f"The attention op alone, one layer, {args.op_dtype} on {args.provider}: GroupQueryAttention + bias "
               f"(portable) vs TreeAttention (custom) (median of {args.repeats}, ms)", report["op_results"], console)
    return report


main = bench_main("attention")  # python -m streamspec.tools.bench_attention ARGS: streamspec bench attention ARGS

if __name__ == "__main__":
    sys.exit(main())
