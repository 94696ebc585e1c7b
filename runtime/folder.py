"""The deployable folder that `streamspec export` writes and `Engine` reads.

    model.onnx (+ model.onnx.data)   the step graph (exporter/step.py documents it)
    streamspec.json                  everything else the runtime needs (schema below)
    tokenizer.json                   the `tokenizers` file
    chat_template.jinja              the chat template, when the model has one

streamspec.json, format_version 1:

    format            "streamspec-deployable"
    format_version    1
    exporter_version  streamspec version that wrote it
    model             family, model_type, vocab_size, hidden_size, num_layers, num_heads,
                      num_kv_heads, head_dim, intermediate_size (newer folders),
                      max_position_embeddings
    streams           null (plain base model) or {num_streams, num_msa_layers, mode}
    attention         {backend: "portable" | "custom", op, stream_nodes: "any" | "all",
                       trees: false for an autoregressive-only graph (`export --autoregressive`:
                       no tree inputs, one chain of new rows per step; absent: true)}
    graph             {file, external_data, dtype: "fp32" | "fp16", candidates (K),
                       full_logits, max_length, inputs, outputs, cache_inputs, cache_outputs,
                       parts: absent, or (--pruning) {lower, upper}: the step cut at the
                       first MSA layer, each {file, external_data, inputs, outputs,
                       cache_inputs, cache_outputs} (exporter/step.py),
                       quantization: null | {method, bits, block_size, ...} (exporter/quantize.py),
                       kv_dtype: null | "int8" | "int4" (exporter/kv_cache.py; null: the cache
                       has `dtype`)}; the last two are optional (older folders lack them)
    tokens            {eos_token_ids, bos_token_id, pad_token_id}
    tokenizer         {file, chat_template (file name or null), bos_token, eos_token}
    tree              {budget, lookup, prune, tuned}: the default number of draft nodes,
                      of prompt-lookup draft tokens and the pruning threshold (0: off)
                      (runtime/tree_settings.py; `streamspec tune` writes them)
    source            {kind: "base" | "checkpoint", name}

`read_folder` is the one reader: every key the runtime uses is checked for its type and
range (`SCHEMA`), the numbers are checked against each other (the cache names follow
the layer counts), and every file it names must lie inside the folder. A hand-edited
file that breaks a rule is one sentence naming the key, never a traceback later.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Optional, Union

from streamspec.errors import StreamspecError, read_json_file

from .checks import is_integer, is_number
from .tree_settings import MAX_NODES, TreeSettings

FORMAT = "streamspec-deployable"
FORMAT_VERSION = 1
CONFIG_FILE = "streamspec.json"


@dataclass
class DeployConfig:
    """streamspec.json of a deployable folder, checked."""

    folder: Path
    raw: dict[str, Any]

    # -- model shape
    @property
    def num_layers(self) -> int:
        return int(self.raw["model"]["num_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.raw["model"]["num_heads"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.raw["model"]["num_kv_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.raw["model"]["head_dim"])

    @property
    def vocab_size(self) -> int:
        return int(self.raw["model"]["vocab_size"])

    @property
    def num_streams(self) -> int:
        streams = self.raw.get("streams")
        return int(streams["num_streams"]) if streams else 0

    @property
    def num_msa_layers(self) -> int:
        streams = self.raw.get("streams")
        return int(streams["num_msa_layers"]) if streams else 0

    # -- graph
    @property
    def graph(self) -> dict[str, Any]:
        return self.raw["graph"]

    @property
    def model_path(self) -> Path:
        return self.folder / self.graph["file"]

    @property
    def max_length(self) -> int:
        return int(self.graph["max_length"])

    @property
    def dtype(self) -> str:
        return self.graph["dtype"]

    @property
    def candidates(self) -> int:
        return int(self.graph["candidates"])

    @property
    def backend(self) -> str:
        return self.raw["attention"]["backend"]

    @property
    def streams_for_all_nodes(self) -> bool:
        """The custom op's row layout has stream rows for every node."""
        return self.raw["attention"].get("stream_nodes") == "all"

    # -- tokens
    @property
    def eos_token_ids(self) -> list[int]:
        return [int(t) for t in self.raw["tokens"].get("eos_token_ids") or []]

    @property
    def tokenizer(self) -> dict[str, Any]:
        return self.raw["tokenizer"]

    @property
    def path(self) -> Path:
        """The folder's streamspec.json."""
        return self.folder / CONFIG_FILE

    @property
    def tree(self) -> TreeSettings:
        """The default tree settings (`tree`; runtime/tree_settings.py)."""
        return TreeSettings.from_entry(self.raw.get("tree"))

    @property
    def default_budget(self) -> int:
        return self.tree.budget

    @property
    def default_lookup(self) -> int:
        """Prompt-lookup draft tokens per step (0: off)."""
        return self.tree.lookup

    @property
    def can_tree(self) -> bool:
        """The graph takes trees (draft budgets, prompt lookup); False: exported with
        --autoregressive, one token per step."""
        return self.raw["attention"].get("trees", True)

    @property
    def can_prune(self) -> bool:
        """Exported with --pruning: the step also comes cut in two (`graph.parts`)."""
        return bool(self.graph.get("parts"))

    @property
    def default_prune(self) -> float:
        """The tree-pruning threshold (0: off; `streamspec tune` writes it)."""
        return self.tree.prune

    def fingerprint(self) -> str:
        """A short hash that tells exported models apart (a saved conversation carries it):
        streamspec.json, and the size and 64 evenly spread 64 KiB blocks of each graph
        file (hashing whole weight files would take seconds on a device)."""
        digest = hashlib.sha256(self.path.read_bytes())
        for name in filter(None, (self.graph["file"], self.graph.get("external_data"))):
            with open(self.folder / name, "rb") as file:
                size = file.seek(0, os.SEEK_END)
                digest.update(str(size).encode())
                for block in range(_BLOCKS):
                    file.seek(block * max(size - _BLOCK, 0) // (_BLOCKS - 1))
                    digest.update(file.read(_BLOCK))
        return digest.hexdigest()[:32]


_BLOCKS, _BLOCK = 64, 1 << 16  # blocks of a graph file that the fingerprint hashes


# ------------------------------------------------------------------ the checked reader
@dataclass(frozen=True)
class Rule:
    """What one key of streamspec.json must hold: `test(value)`, worded as `expected`."""

    expected: str
    test: Callable[[Any], bool]


def integer(low: int, high: Optional[int] = None) -> Rule:
    words = f"an integer between {low} and {high}" if high is not None else f"an integer >= {low}"
    return Rule(words, lambda v: is_integer(v) and v >= low and (high is None or v <= high))


def number(low: float, high: float) -> Rule:
    """A finite number in [low, high) (json reads NaN and Infinity; they fail here)."""
    return Rule(f"a number in [{low}, {high})", lambda v: is_number(v) and low <= v < high)


def choice(*values: Any) -> Rule:
    return Rule(" or ".join(json.dumps(v) for v in values),
                lambda v: any(v == c and type(v) is type(c) for c in values))


def optional(rule: Rule) -> Rule:
    return Rule(f"{rule.expected} or null", lambda v: v is None or rule.test(v))


def _is_inside(name: str) -> bool:
    """A relative path without "..": it names a file inside the folder (symbolic links
    are checked against the real folder by `_confined`)."""
    path = PurePosixPath(name.replace("\\", "/"))
    return bool(name) and not path.is_absolute() and ".." not in path.parts and not PureWindowsPath(name).drive


OBJECT = Rule("an object", lambda v: isinstance(v, dict))
STRING = Rule("a string", lambda v: isinstance(v, str))
NAMES = Rule("a list of strings", lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v))
FILE = Rule("a file name inside the folder", lambda v: isinstance(v, str) and _is_inside(v))
TOKEN_IDS = Rule("a list of token ids", lambda v: isinstance(v, list) and all(is_integer(t) and t >= 0 for t in v))
MAX_DIM = 1 << 20  # far above any real model; it keeps arithmetic on these numbers sane

# Every key the runtime reads, with its rule; "?" marks one that may be absent (older
# folders lack it). A section is checked before its keys.
SCHEMA: dict[str, Rule] = {
    "model": OBJECT,
    "model.num_layers": integer(1, 4096),
    "model.num_heads": integer(1, 4096),
    "model.num_kv_heads": integer(1, 4096),
    "model.head_dim": integer(1, 65536),
    "model.vocab_size": integer(1, 1 << 24),
    "model.hidden_size?": optional(integer(1, MAX_DIM)),
    "model.intermediate_size?": optional(integer(1, MAX_DIM)),
    "model.max_position_embeddings?": optional(integer(1, MAX_DIM)),
    "streams?": optional(OBJECT),
    "attention": OBJECT,
    "attention.backend": choice("portable", "custom"),
    "attention.stream_nodes?": choice("any", "all"),
    "attention.trees?": choice(True, False),
    "graph": OBJECT,
    "graph.file": FILE,
    "graph.external_data?": optional(FILE),
    "graph.dtype": choice("fp32", "fp16"),
    "graph.candidates": integer(1, 1 << 16),
    "graph.max_length": integer(16, MAX_DIM),
    "graph.inputs": NAMES,
    "graph.outputs": NAMES,
    "graph.cache_inputs": NAMES,
    "graph.cache_outputs": NAMES,
    "graph.kv_dtype?": optional(choice("int8", "int4")),
    "graph.parts?": optional(OBJECT),
    "tokens": OBJECT,
    "tokens.eos_token_ids?": optional(TOKEN_IDS),
    "tokenizer": OBJECT,
    "tokenizer.file": FILE,
    "tokenizer.chat_template?": optional(FILE),
    "tokenizer.bos_token?": optional(STRING),
    "tokenizer.eos_token?": optional(STRING),
    "tree?": OBJECT,
    "tree.budget?": integer(0, MAX_NODES),  # the ranges of TreeSettings
    "tree.lookup?": integer(0, MAX_NODES),
    "tree.prune?": number(0.0, 1.0),
    "source?": optional(OBJECT),
}
STREAMS_SCHEMA: dict[str, Rule] = {  # when "streams" is not null
    "streams.num_streams": integer(1, 64),
    "streams.num_msa_layers": integer(1, 4096),
}
PART_SCHEMA: dict[str, Rule] = {  # each of graph.parts.lower and graph.parts.upper
    "file": FILE, "external_data?": optional(FILE), "inputs": NAMES, "outputs": NAMES,
    "cache_inputs": NAMES, "cache_outputs": NAMES,
}


def read_folder(folder: Union[str, os.PathLike]) -> DeployConfig:
    """Read and check a deployable folder: every key the runtime uses has its type and
    range, file names stay inside the folder, and the numbers agree with each other. One
    clear sentence, naming the key, when something is wrong (a hand-edited file)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise StreamspecError(f"{folder} is not a folder; pass the folder written by `streamspec export`.")
    config_path = folder / CONFIG_FILE
    raw = read_json_file(
        config_path, missing=f"{folder} has no {CONFIG_FILE}, so it is not a folder written by `streamspec export`.",
        corrupt=f"{config_path} is not valid JSON (corrupt or truncated).", fmt=FORMAT,
        wrong_format=f"{config_path} does not describe a streamspec deployable folder.")
    _check_version(raw, folder, config_path)
    _check(raw, SCHEMA, config_path)
    if raw.get("streams") is not None:
        _check(raw, STREAMS_SCHEMA, config_path)
    for name in ("lower", "upper") if raw["graph"].get("parts") else ():
        _check(raw["graph"]["parts"], {f"{name}": OBJECT, **{f"{name}.{k}": r for k, r in PART_SCHEMA.items()}},
               config_path, prefix="graph.parts.")
    config = DeployConfig(folder, raw)
    _check_agreement(config, config_path)
    parts = config.graph.get("parts") or {}
    graph_files = [f for entry in [config.graph, *parts.values()] for f in (entry["file"], entry.get("external_data"))]
    for name in filter(None, graph_files + [config.tokenizer["file"], config.tokenizer.get("chat_template")]):
        _confined(folder, name, config_path)
        if not (folder / name).is_file():
            raise StreamspecError(f"{folder} lacks {name}; export the model again.")
    return config


def _check_version(raw: dict[str, Any], folder: Path, config_path: Path) -> None:
    found = raw.get("format_version")
    if not is_integer(found):  # "1" is not 1, and saying "version 1, but this reads version 1" helps nobody
        raise StreamspecError(f"{config_path}: format_version must be the integer {FORMAT_VERSION}, got "
                              f"{_shown(found)}; export the model again.")
    if found != FORMAT_VERSION:
        raise StreamspecError(f"{folder} was exported in format version {found}, but this streamspec reads version "
                              f"{FORMAT_VERSION}; export the model again with this version.")


def _check(raw: dict[str, Any], schema: dict[str, Rule], config_path: Path, prefix: str = "") -> None:
    """Apply `schema` (dotted keys, "?" for optional ones) to `raw`; the first key that
    is missing or wrong is one sentence."""
    for spec, rule in schema.items():
        key = spec.rstrip("?")
        *sections, last = key.split(".")
        holder: Any = raw
        for section in sections:  # checked already (sections precede their keys)
            holder = holder.get(section) or {}
        if last not in holder:
            if spec.endswith("?"):
                continue
            raise StreamspecError(f"{config_path} lacks {prefix}{key} (corrupt file); export the model again.")
        if not rule.test(holder[last]):
            raise StreamspecError(f"{config_path}: {prefix}{key} must be {rule.expected}, got "
                                  f"{_shown(holder[last])}; fix it or export the model again.")


def _check_agreement(config: DeployConfig, config_path: Path) -> None:
    """Numbers that must agree: the heads, the stream layers, the cache names per layer
    (a layer count edited by hand no longer matches the graph's cache inputs)."""
    if config.num_heads % config.num_kv_heads:
        raise StreamspecError(f"{config_path}: model.num_heads ({config.num_heads}) must be a multiple of "
                              f"model.num_kv_heads ({config.num_kv_heads}); export the model again.")
    if config.num_msa_layers > config.num_layers:
        raise StreamspecError(f"{config_path}: streams.num_msa_layers ({config.num_msa_layers}) exceeds "
                              f"model.num_layers ({config.num_layers}); export the model again.")
    positions = config.raw["model"].get("max_position_embeddings")
    if positions is not None and config.max_length > positions:
        raise StreamspecError(f"{config_path}: graph.max_length ({config.max_length}) exceeds the model's "
                              f"{positions} positions (model.max_position_embeddings); export the model again.")
    if config.graph.get("kv_dtype") == "int4" and config.head_dim % 2:
        raise StreamspecError(f"{config_path}: an int4 cache needs an even model.head_dim, got {config.head_dim}.")
    first_upper = config.num_layers - config.num_msa_layers
    entries = {"graph": (config.graph, 0, config.num_layers)}
    for name, (first, last) in (("lower", (0, first_upper)), ("upper", (first_upper, config.num_layers))):
        if config.graph.get("parts"):
            entries[f"graph.parts.{name}"] = (config.graph["parts"][name], first, last)
    for where, (entry, first, last) in entries.items():
        for key, suffix in (("cache_inputs", ""), ("cache_outputs", "_out")):
            expected = [f"{kind}_cache{suffix}.{i}" for i in range(first, last) for kind in ("key", "value")]
            if entry[key] != expected:
                names = f"{expected[0]} to {expected[-1]}" if expected else "no names"
                raise StreamspecError(
                    f"{config_path}: {where}.{key} must list {names} (the caches of {last - first} layers, by "
                    f"model.num_layers and streams.num_msa_layers), but it lists {len(entry[key])} names; "
                    "export the model again.")


def _confined(folder: Path, name: str, config_path: Path) -> None:
    """The file `name` must be inside the folder, symbolic links followed: a folder
    from elsewhere must not make the runtime read /etc/passwd or ../secrets."""
    try:
        (folder / name).resolve().relative_to(folder.resolve())
    except ValueError:
        raise StreamspecError(f"{config_path} names {name!r}, which is outside {folder}; "
                              "refusing to read it.") from None


def _shown(value: Any) -> str:
    """A JSON value as the file shows it (NaN included), cut to a readable length."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def chat_template(config: DeployConfig) -> Optional[str]:
    name = config.tokenizer.get("chat_template")
    return (config.folder / name).read_text(encoding="utf-8") if name else None
