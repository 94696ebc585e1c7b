"""How much memory a deployable folder needs, estimated from streamspec.json and the
file sizes before anything is loaded (torch-free: the exporter prints it, a device can
check it against its free memory before it builds a session).

    estimate = estimate_memory(read_folder("smollm2-onnx"), max_length=1024, budget=8)
    print(estimate.summary())      # weights 538 MiB + KV cache 90 MiB + activations ~9 MiB ...

- weights: the graph files as written (model.onnx + model.onnx.data). ONNX Runtime may
  hold a second, repacked copy of some weights (prepacked MatMul weights on CPU), so
  the resident size can exceed this.
- KV cache: 2 (keys, values) * layers * kv_heads * max_length * head_dim * bytes per
  value of the cache dtype, allocated once per session (runtime/session.py).
- activations: a rough upper estimate of the transient buffers of one step of a tree
  of `budget` draft nodes (+ the root) with every node carrying its γ stream rows,
  attending to a full cache: one layer's buffers (ONNX Runtime reuses them from layer
  to layer), the tree bias, and the LM-head logits. It is the order of magnitude, not a
  measurement; `python -m streamspec.tools.bench_precision` measures peak RSS.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from streamspec.errors import StreamspecError

from .folder import DeployConfig

MIB = 1 << 20
# Bytes per cached value; int4 packs two values per byte.
CACHE_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
ACTIVATION_BYTES = {"fp32": 4, "fp16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes; see the module docstring for what each part counts."""

    weights: int
    kv_cache: int
    activations: int
    max_length: int
    budget: int
    cache_dtype: str

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def as_dict(self) -> dict[str, int | str]:
        return {**asdict(self), "total": self.total}

    def summary(self) -> str:
        """One line for a person: 'weights 538 MiB + KV cache 90 MiB (1024 tokens, fp32) + ...'."""
        return (f"weights {_mib(self.weights)} + KV cache {_mib(self.kv_cache)} ({self.max_length} tokens, "
                f"{self.cache_dtype}) + activations ~{_mib(self.activations)} (tree of {self.budget} nodes) "
                f"= {_mib(self.total)}")


def cache_dtype(config: DeployConfig) -> str:
    """The KV cache's value type: graph.kv_dtype when the export quantized it, else the
    graph's dtype."""
    return config.graph.get("kv_dtype") or config.dtype


def kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, max_length: int, dtype: str) -> int:
    """Keys and values of every layer at `max_length` rows."""
    return int(2 * num_layers * num_kv_heads * max_length * head_dim * CACHE_BYTES[dtype])


def activation_bytes(config: DeployConfig, max_length: int, budget: int) -> int:
    """Rough transient bytes of one tree step (module docstring)."""
    model = config.raw["model"]
    width = ACTIVATION_BYTES.get(config.dtype, 4)
    hidden = int(model.get("hidden_size") or config.num_kv_heads * config.head_dim)
    heads = int(model.get("num_heads") or config.num_kv_heads)
    intermediate = int(model.get("intermediate_size") or 4 * hidden)  # older folders lack it
    nodes = budget + 1
    rows = nodes * (1 + config.num_streams)
    keys = max_length
    per_layer = (6 * rows * hidden + 3 * rows * intermediate) * width  # residual, q, k, v, ...; MLP
    per_layer += heads * rows * keys * 4  # attention scores (fp32 in ONNX Runtime's CPU kernel)
    bias = rows * keys * (width + 1)  # the additive tree bias and its boolean mask
    head = 2 * (2 * nodes + config.num_streams) * config.vocab_size * 4  # logits + softmax: main, exit, streams
    return per_layer + bias + head


def weights_bytes(config: DeployConfig, split: bool = False) -> int:
    """The sizes of the graph files an engine loads: the step graph, or (split, tree
    pruning) its lower and upper parts."""
    entries = list(config.graph["parts"].values()) if split and config.can_prune else [config.graph]
    names = [name for entry in entries for name in (entry["file"], entry.get("external_data")) if name]
    return sum((config.folder / name).stat().st_size for name in names)


def estimate_memory(config: DeployConfig, max_length: Optional[int] = None,
                    budget: Optional[int] = None, split: bool = False) -> MemoryEstimate:
    """Weights, KV cache and activations of a folder (defaults: its max length and budget;
    split: the engine runs the pruning graphs)."""
    max_length = int(max_length or config.max_length)
    budget = config.default_budget if budget is None else int(budget)
    dtype = cache_dtype(config)
    return MemoryEstimate(
        weights=weights_bytes(config, split),
        kv_cache=kv_cache_bytes(config.num_layers, config.num_kv_heads, config.head_dim, max_length, dtype),
        activations=activation_bytes(config, max_length, budget),
        max_length=max_length, budget=budget, cache_dtype=dtype)


def _mib(size: int) -> str:
    return f"{size / MIB:.1f} MiB" if size < 10 * MIB else f"{size / MIB:.0f} MiB"


MIN_LENGTH = 64  # below this a deployment is of no use: refuse instead
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": MIB, "MB": MIB, "MIB": MIB,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def parse_size(value: "int | float | str") -> int:
    """Bytes from 1500000000, "1.5G", "800MiB", "2 GB" (binary units)."""
    text = str(value).strip().upper().replace(" ", "")
    number = text.rstrip("KMGIB")
    unit = text[len(number):]
    try:
        size = float(number)
    except ValueError:
        size = -1.0
    if unit not in _UNITS or not 0 < size < float("inf"):  # NaN fails both comparisons
        raise StreamspecError(f"A memory size must be a positive number with an optional unit (e.g. 1.5G, 800M), "
                              f"got {value!r}.")
    return int(size * _UNITS[unit])


def fit_to_memory(config: DeployConfig, memory_budget: int, max_length: Optional[int] = None,
                  budget: Optional[int] = None, split: bool = False) -> MemoryEstimate:
    """The longest cache (at most `max_length`, default the exported maximum) whose
    weights + KV cache + activations at the tree `budget` fit in `memory_budget` bytes;
    one sentence when not even MIN_LENGTH tokens fit."""
    longest = config.max_length if max_length is None else int(max_length)  # 0 is refused later, not the default
    fits = lambda length: estimate_memory(config, length, budget, split).total <= memory_budget  # noqa: E731
    if not fits(min(MIN_LENGTH, longest)):
        need = estimate_memory(config, min(MIN_LENGTH, longest), budget, split)
        raise StreamspecError(
            f"{config.folder} does not fit in {_mib(memory_budget)}: even {need.max_length} tokens need "
            f"{need.summary()}; allow more memory, a smaller tree budget or a quantized export.")
    low, high = min(MIN_LENGTH, longest), longest  # fits(low) holds; find the largest length that fits
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return estimate_memory(config, low, budget, split)
