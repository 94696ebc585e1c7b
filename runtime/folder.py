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
    attention         {backend: "portable" | "custom", op, stream_nodes: "any" | "all"}
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
    tree              {budget, lookup, prune}: the default number of draft nodes, of
                      prompt-lookup draft tokens and the pruning threshold (0: off)
                      (`streamspec tune` writes them)
    source            {kind: "base" | "checkpoint", name}
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from streamspec.errors import StreamspecError, read_json_file

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
    def default_budget(self) -> int:
        return int(self.raw.get("tree", {}).get("budget", 8))

    @property
    def default_lookup(self) -> int:
        """Prompt-lookup draft tokens per step (0: off)."""
        return int(self.raw.get("tree", {}).get("lookup", 0))

    @property
    def can_prune(self) -> bool:
        """Exported with --pruning: the step also comes cut in two (`graph.parts`)."""
        return bool(self.graph.get("parts"))

    @property
    def default_prune(self) -> float:
        """The tree-pruning threshold (0: off; `streamspec tune` writes it)."""
        return float(self.raw.get("tree", {}).get("prune", 0.0))

    def fingerprint(self) -> str:
        """A short hash that tells exported models apart (a saved conversation carries it):
        streamspec.json, and the size and 64 evenly spread 64 KiB blocks of each graph
        file (hashing whole weight files would take seconds on a device)."""
        digest = hashlib.sha256((self.folder / CONFIG_FILE).read_bytes())
        for name in filter(None, (self.graph["file"], self.graph.get("external_data"))):
            with open(self.folder / name, "rb") as file:
                size = file.seek(0, os.SEEK_END)
                digest.update(str(size).encode())
                for block in range(_BLOCKS):
                    file.seek(block * max(size - _BLOCK, 0) // (_BLOCKS - 1))
                    digest.update(file.read(_BLOCK))
        return digest.hexdigest()[:32]


_BLOCKS, _BLOCK = 64, 1 << 16  # blocks of a graph file that the fingerprint hashes


_REQUIRED = {
    "model": ("num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size"),
    "graph": ("file", "dtype", "candidates", "max_length", "inputs", "outputs", "cache_inputs", "cache_outputs"),
    "attention": ("backend",),
    "tokens": (),
    "tokenizer": ("file",),
}


def read_folder(folder: Union[str, os.PathLike]) -> DeployConfig:
    """Read and check a deployable folder; one clear sentence when something is wrong."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise StreamspecError(f"{folder} is not a folder; pass the folder written by `streamspec export`.")
    config_path = folder / CONFIG_FILE
    raw = read_json_file(
        config_path, missing=f"{folder} has no {CONFIG_FILE}, so it is not a folder written by `streamspec export`.",
        corrupt=f"{config_path} is not valid JSON (corrupt or truncated).", fmt=FORMAT,
        wrong_format=f"{config_path} does not describe a streamspec deployable folder.", version=FORMAT_VERSION,
        wrong_version=f"{folder} was exported in format version {{found}}, but this streamspec reads version "
                      f"{FORMAT_VERSION}; export the model again with this version.")
    for section, keys in _REQUIRED.items():
        if not isinstance(raw.get(section), dict) or any(k not in raw[section] for k in keys):
            raise StreamspecError(f"{config_path} lacks its {section!r} section or part of it (corrupt file).")
    config = DeployConfig(folder, raw)
    parts = config.graph.get("parts") or {}
    graph_files = [f for entry in [config.graph, *parts.values()] for f in (entry["file"], entry.get("external_data"))]
    for name in filter(None, graph_files + [config.tokenizer["file"], config.tokenizer.get("chat_template")]):
        if not (folder / name).is_file():
            raise StreamspecError(f"{folder} lacks {name}; export the model again.")
    if config.backend not in ("portable", "custom"):
        raise StreamspecError(f"{config_path} names an unknown attention backend {config.backend!r}.")
    return config


def chat_template(config: DeployConfig) -> Optional[str]:
    name = config.tokenizer.get("chat_template")
    return (config.folder / name).read_text(encoding="utf-8") if name else None
