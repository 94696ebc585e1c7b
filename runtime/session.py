"""One ONNX Runtime session over the step graph, with its KV cache bound in place.

The cache is allocated once per session: one buffer per layer and kind,
[1, kv_heads, max_length, head_dim], bound with IO binding both as the graph's
`key_cache.i` input and as its `key_cache_out.i` output, so GroupQueryAttention writes
each step's rows into it and nothing else of it moves. Per step only the tree
description is bound as input and only the small outputs (top-K ids and
probabilities, sampled ids) come back to the host.

Accepted-path compaction (rows past + path[i] -> past + i):
  host   (CPU): the buffers are numpy arrays wrapped without copy; the few moved rows
         are copied in place by numpy, all layers in one indexing operation.
  graph  (GPU): the rows are handed to the next step as `compact_src`; the graph
         gathers them and GroupQueryAttention writes them at their new place together
         with the step's own rows (exporter/portable.py), with no host round trip.

What the rows hold is written down in `CacheContents` (`StepSession.contents`), so that
a later generation whose prompt starts with the same tokens (the next turn of a
conversation, a regenerated answer) runs only the rest of its prompt.

Split mode (tree pruning, exporter/step.py): the session runs the folder's lower.onnx
and upper.onnx instead of model.onnx, each bound to its own layers' share of the same
cache; the engine decides between the two runs which nodes the upper layers see.
Every run goes through both (a prefill keeps all its nodes), so only these two graphs
are loaded. The lower layers then hold rows for all of a step's nodes and the upper
layers for the kept ones, so compaction takes a path per group (host compaction only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import onnxruntime as ort

from streamspec.errors import StreamspecError, first_line

from .checks import cpu_cores, is_integer
from .folder import DeployConfig
from .tree import in_place

_NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}
# A quantized cache (streamspec.json graph.kv_dtype, exporter/kv_cache.py): numpy type
# and values per element (int4 packs two per byte).
_CACHE_STORAGE = {"int8": (np.int8, 1), "int4": (np.uint8, 2)}
_NO_ROWS = np.zeros(0, dtype=np.int64)
_NO_EXIT = dict(exit_parents=_NO_ROWS, exit_nodes=_NO_ROWS, exit_rows=_NO_ROWS)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


@dataclass
class CacheContents:
    """Which tokens the cache rows hold: row i holds the keys and values of tokens[i] at
    position i, for i < rows.

    Graph compaction leaves the last accepted path of a generation where its tree step
    wrote it: the last len(pending) of those rows still sit at cache rows `pending`
    ([M] int64), and the next run moves them into place by passing them as compact_src.
    `tokens` may run beyond `rows` (the engine appends to it as it commits tokens).
    """

    tokens: list[int] = field(default_factory=list)
    rows: int = 0
    pending: np.ndarray = field(default_factory=lambda: _NO_ROWS)

    def held(self) -> list[int]:
        """The tokens whose rows the cache holds."""
        return self.tokens[:self.rows]

    def reusable(self, prompt: Sequence[int]) -> int:
        """Prompt tokens whose rows can be reused: the common prefix with the held tokens,
        less the last prompt token, which must run to give the next token's distribution."""
        return min(common_prefix(self.held(), prompt), len(prompt) - 1)

    def keep(self, rows: int) -> np.ndarray:
        """Forget every row from `rows` on; return the compact_src [M] that the next run
        must pass with past_length = rows (the pending rows that are kept)."""
        rows = min(rows, self.rows)
        moved = self.rows - len(self.pending)  # rows already in place
        self.pending = self.pending[:max(rows - moved, 0)]
        self.rows = rows
        return self.pending

    def set(self, tokens: list[int], rows: int, pending: np.ndarray = _NO_ROWS) -> None:
        """After a run: rows [0, rows) hold tokens[:rows] (`pending` as above). A generation
        cut at max_new_tokens may have written rows for drafts it did not commit: those
        are not held."""
        self.tokens, self.rows, self.pending = tokens, rows, pending
        self.keep(len(tokens))

    def row_index(self) -> np.ndarray:
        """[rows] int64: the cache row where each held token's keys and values are now."""
        moved = self.rows - len(self.pending)
        return np.concatenate([np.arange(moved, dtype=np.int64), self.pending.astype(np.int64)])


def check_threads(threads: Any) -> None:
    """None (ONNX Runtime's choice) or 1 to this machine's CPU cores (`cpu_cores`): 0
    and negative counts are no thread count."""
    cores = cpu_cores()
    if threads is not None and (not is_integer(threads) or not 1 <= threads <= cores):
        raise StreamspecError(f"threads must be between 1 and the {cores} CPU cores of this machine, "
                              f"got {threads!r}.")


def resolve_provider(provider: str) -> str:
    """"auto" | "cpu" | "cuda" -> "cpu" or "cuda" (an error when CUDA is asked but absent)."""
    provider = (provider or "auto").lower()
    available = ort.get_available_providers()
    if provider == "auto":
        return "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if provider == "cuda" and "CUDAExecutionProvider" not in available:
        raise StreamspecError(
            "CUDA was asked for, but this onnxruntime has no CUDA provider; install onnxruntime-gpu "
            "or use --provider cpu.")
    if provider not in ("cpu", "cuda"):
        raise StreamspecError(f"The provider must be auto, cpu or cuda, got {provider!r}.")
    return provider


class RunTiming(NamedTuple):
    """Where the last `StepSession.run` spent its time (seconds), for profilers."""

    copy_in: float  # binding the step's inputs
    run: float  # run_with_iobinding: the graph (on CUDA with ORT's input/output device copies)
    copy_out: float  # the small outputs to numpy


def run_failure(error: Exception) -> str:
    """One sentence for an error ONNX Runtime raised while running a step."""
    first = first_line(error)
    if "attention_bias is not supported" in first:
        # onnxruntime-gpu before microsoft/onnxruntime#29525 (2026-07): the CUDA kernel of
        # GroupQueryAttention, which the portable backend uses, takes no attention bias.
        return ("This onnxruntime-gpu cannot run the portable backend on CUDA (its GroupQueryAttention takes no "
                "attention bias); export with --attention custom (streamspec build-ops --cuda) or install a newer "
                "onnxruntime-gpu.")
    return f"onnxruntime failed to run the step ({first})."


class BoundGraph:
    """One ONNX Runtime session with its layers' cache buffers bound in place, both as
    the graph's `key_cache.i` inputs and as its `key_cache_out.i` outputs.

    entry: streamspec.json's `graph` or one of its `parts` (file, inputs, outputs,
    cache_inputs, cache_outputs); cache: OrtValues by cache input name.
    """

    def __init__(self, session: ort.InferenceSession, entry: dict, cache: dict[str, ort.OrtValue]):
        self.session = session
        self.input_names = {i.name for i in session.get_inputs()}
        self.output_names = [name for name in entry["outputs"] if name not in entry["cache_outputs"]]
        self.binding = session.io_binding()
        for name in self.output_names:  # bound first: get_outputs() keeps this order
            self.binding.bind_output(name, "cpu")
        for name_in, name_out in zip(entry["cache_inputs"], entry["cache_outputs"]):
            self.binding.bind_ortvalue_input(name_in, cache[name_in])
            self.binding.bind_ortvalue_output(name_out, cache[name_in])

    def _small_outputs(self) -> list:
        """The bound outputs, the small ones first (bound first), as ONNX Runtime's own
        values. The public IOBinding.get_outputs() wraps every output in a Python OrtValue,
        the 2 x layers caches too: ~70 µs a step for SmolLM2, 1% of an int4 step."""
        inner = getattr(self.binding, "_iobinding", None)
        if inner is None:  # another onnxruntime's layout: the public call
            return [value._ortvalue for value in self.binding.get_outputs()]
        return inner.get_outputs()

    def run(self, feeds: dict[str, np.ndarray], values: dict[str, ort.OrtValue],
            keep: tuple[str, ...] = ()) -> tuple[dict[str, Any], RunTiming]:
        """Bind the inputs the graph has (arrays from the host, OrtValues as they are), run,
        return the small outputs as numpy arrays; those named in `keep` stay OrtValues
        (the lower graph's hidden rows, handed to the upper graph without a copy)."""
        start = time.perf_counter()
        for name, array in feeds.items():
            if name in self.input_names:
                self.binding.bind_cpu_input(name, array)
        for name, value in values.items():
            self.binding.bind_ortvalue_input(name, value)
        for name in self.output_names:  # their shapes change per step: let ORT allocate anew
            self.binding.bind_output(name, "cpu")
        bound = time.perf_counter()
        try:
            self.session.run_with_iobinding(self.binding)
        except Exception as error:  # onnxruntime raises several unrelated types
            raise StreamspecError(run_failure(error)) from None
        ran = time.perf_counter()
        outputs = self._small_outputs()
        out = {name: ort.OrtValue(outputs[i]) if name in keep else outputs[i].numpy()
               for i, name in enumerate(self.output_names)}
        return out, RunTiming(bound - start, ran - bound, time.perf_counter() - ran)


class StepSession:
    """The step graph of a deployable folder, ready to run steps against its own cache.

    split: run the folder's lower and upper graphs (tree pruning; see above) instead of
    the whole step graph. profile: a file prefix that turns on ONNX Runtime's own
    profiler for every run (`end_profiling()` then returns the JSON trace's path); None
    leaves it off.
    """

    def __init__(self, config: DeployConfig, provider: str = "auto", max_length: Optional[int] = None,
                 threads: Optional[int] = None, compaction: str = "auto", profile: Optional[str] = None,
                 split: bool = False):
        self.config = config
        self.last_timing = RunTiming(0.0, 0.0, 0.0)
        self.device = resolve_provider(provider)
        # None is the exported maximum; 0 is refused like any other value out of range
        # (it used to mean the default silently).
        self.max_length = config.max_length if max_length is None else max_length
        if not is_integer(self.max_length) or not 16 <= self.max_length <= config.max_length:
            raise StreamspecError(
                f"max_length must be between 16 and the exported maximum of {config.max_length}, "
                f"got {self.max_length!r}.")
        self.max_length = int(self.max_length)
        check_threads(threads)
        if compaction not in ("auto", "host", "graph"):
            raise StreamspecError(f"compaction must be auto, host or graph, got {compaction!r}.")
        if compaction == "host" and self.device != "cpu":
            raise StreamspecError("Host compaction needs the cache in host memory (provider cpu).")
        self.compaction = compaction if compaction != "auto" else ("host" if self.device == "cpu" else "graph")
        parts = config.graph.get("parts")
        if split and not parts:
            raise StreamspecError(f"{config.folder} was exported without --pruning, so it cannot prune trees; "
                                  "export it again with --pruning or turn pruning off.")
        if split and self.compaction != "host":
            raise StreamspecError("Tree pruning needs host compaction (provider cpu); turn pruning off on "
                                  f"{self.device}.")
        self.split = split
        self._allocate_cache()
        cache = dict(zip(config.graph["cache_inputs"], self.cache))
        entries = {"lower": parts["lower"], "upper": parts["upper"]} if split else {"step": config.graph}
        self.graphs = {name: BoundGraph(self._create_session(entry, threads, profile), entry, cache)
                       for name, entry in entries.items()}
        # The graph whose outputs a step returns (the upper part when split).
        main = self.graphs["upper" if split else "step"]
        self.session, self.binding, self.output_names = main.session, main.binding, main.output_names
        self.first_upper_layer = config.num_layers - config.num_msa_layers
        self.contents = CacheContents()

    def _create_session(self, entry: dict[str, Any], threads: Optional[int],
                        profile: Optional[str] = None) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if profile:
            options.enable_profiling = True
            options.profile_file_prefix = str(profile)
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        if self.split:
            # Two sessions, two thread pools: a pool that spins after its run steals the
            # cores from the other one's (measured: split steps took 2x as long).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if self.device == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        if self.config.backend == "custom":
            from streamspec.custom_ops import CustomOpError, register

            try:
                register(options, self.device)
            except CustomOpError as error:
                raise StreamspecError(f"The custom attention op is unavailable: {error}.") from None
        path = self.config.folder / entry["file"]
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # onnxruntime raises several unrelated types
            first = first_line(error, 200)
            raise StreamspecError(f"onnxruntime could not load {path} ({first}); export the model again.") from None
        self._check_graph(session, entry, path)
        return session

    def _check_graph(self, session: ort.InferenceSession, entry: dict[str, Any], path: Any) -> None:
        """The graph must be the one streamspec.json describes: the same cache inputs and
        outputs, of the cache's head shape. A hand-edited layer or head count (or another
        model.onnx) would otherwise fail deep in onnxruntime, or quietly misbehave."""
        inputs = {value.name: value.shape for value in session.get_inputs()}
        outputs = {value.name for value in session.get_outputs()}
        caches = {name for name in inputs if name.startswith(("key_cache.", "value_cache."))}
        if caches != set(entry["cache_inputs"]) or not set(entry["cache_outputs"]) <= outputs:
            raise StreamspecError(f"{path} holds the caches of {len(caches) // 2} layers, but streamspec.json "
                                  f"describes {len(entry['cache_inputs']) // 2}; export the model again.")
        _, heads, _, width = self.cache[0].shape()
        for name in entry["cache_inputs"]:
            dims = inputs[name]
            fixed = ((dims[1], heads), (dims[3], width)) if len(dims) == 4 else ((None, 0),)
            if len(dims) != 4 or any(isinstance(d, int) and d != want for d, want in fixed):
                raise StreamspecError(f"{path} has caches of shape {dims}, but streamspec.json gives {heads} KV "
                                      f"heads of {width} values (model.num_kv_heads, model.head_dim); export the "
                                      "model again.")

    def _allocate_cache(self) -> None:
        cfg = self.config
        storage, packed = _CACHE_STORAGE.get(cfg.graph.get("kv_dtype"), (_NUMPY_DTYPES[cfg.dtype], 1))
        dtype = self.cache_dtype = np.dtype(storage)
        shape = (1, cfg.num_kv_heads, self.max_length, cfg.head_dim // packed)
        count = 2 * cfg.num_layers
        if self.device == "cpu":
            # One array for all layers, so that compaction is one numpy operation.
            self.host_cache: Optional[np.ndarray] = np.zeros((count, *shape), dtype=dtype)
            self.cache = [ort.OrtValue.ortvalue_from_numpy(self.host_cache[i]) for i in range(count)]
        else:
            self.host_cache = None
            self.cache = [ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, "cuda", 0)
                          for _ in range(count)]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Bind the step's inputs (those the graph has), run, return the small outputs.
        Split, every node goes through both parts. `last_timing` then says where the
        time went."""
        if not self.split:
            out, self.last_timing = self.graphs["step"].run(feeds, {})
            return out
        hidden = self.run_lower(dict(feeds, **_NO_EXIT))["hidden"]  # the step's exit_nodes mean another thing
        nodes = np.arange(len(feeds["input_ids"]), dtype=np.int64)
        return self.run_upper(feeds, hidden, nodes, add_timing=True)

    def run_lower(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        """Split: the lower part over every node of the tree, and the early-exit scores that
        feeds' exit_parents, exit_nodes, exit_rows ask for. Returns hidden (an OrtValue)
        and exit_scores."""
        out, self.last_timing = self.graphs["lower"].run(feeds, {}, keep=("hidden",))
        return out

    def run_upper(self, feeds: dict[str, np.ndarray], hidden: ort.OrtValue, kept: np.ndarray,
                  add_timing: bool = False) -> dict[str, np.ndarray]:
        """Split: the upper part over the `kept` nodes' rows of `hidden`; feeds describe the
        tree of the kept nodes. add_timing: add this run to `last_timing` (the lower run's)."""
        out, timing = self.graphs["upper"].run(dict(feeds, kept_nodes=kept), {"hidden": hidden})
        if add_timing:
            timing = RunTiming(*(a + b for a, b in zip(self.last_timing, timing)))
        self.last_timing = timing
        return out

    def end_profiling(self) -> Optional[str]:
        """Stop ONNX Runtime's profiler (see `profile`) and return its JSON trace's path
        (split: the upper part's; the lower part writes its own file beside it)."""
        paths = [graph.session.end_profiling() for graph in self.graphs.values()]
        return paths[-1] or None

    def compact_on_host(self, past_length: int, path: Sequence[int], lower_path: Optional[Sequence[int]] = None) -> None:
        """Move cache rows past + path[i] to past + i for every layer (path ascending).
        Split with pruning: the lower layers hold rows for the whole tree, so their rows
        move from past + lower_path[i] instead."""
        groups = [(slice(None), path)] if lower_path is None else [
            (slice(0, 2 * self.first_upper_layer), lower_path), (slice(2 * self.first_upper_layer, None), path)]
        for layers, nodes in groups:
            first = in_place(nodes)
            if first < len(nodes):
                src = past_length + np.asarray(nodes[first:], dtype=np.int64)
                dst = past_length + np.arange(first, len(nodes))
                self.host_cache[layers, :, :, dst] = self.host_cache[layers, :, :, src]

    def rows_shape(self, n: int) -> tuple[int, ...]:
        """The shape of `n` rows of every cache buffer, as `read_rows` returns them."""
        _, kv_heads, _, width = self.cache[0].shape()
        return len(self.cache), kv_heads, n, width

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """The keys and values at cache rows `rows` [n] of every layer, as one host array
        `rows_shape(n)`: [2 * layers, kv_heads, n, head_dim] (key_cache.0, value_cache.0, ...)."""
        if self.host_cache is not None:
            return self.host_cache[:, 0][:, :, rows]  # fancy indexing: a copy
        return np.stack([value.numpy()[0][:, rows] for value in self.cache])  # device -> host, whole buffers

    def write_rows(self, kv: np.ndarray) -> None:
        """Put kv [2 * layers, kv_heads, n, head_dim] (from `read_rows`) at rows [0, n)."""
        n = kv.shape[2]
        if self.host_cache is not None:
            self.host_cache[:, 0, :, :n] = kv
            return
        for value, rows in zip(self.cache, kv):  # device buffers: change the rows on the host, copy back
            buffer = value.numpy()
            buffer[0, :, :n] = rows
            value.update_inplace(buffer)
