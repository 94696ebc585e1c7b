"""The checkpoint format: what training writes and the exporter reads.

A checkpoint is a folder:

    streamspec.json          format version, base model reference and hash, every
                             hyper-parameter (model, streams, training), metrics,
                             sha256 of the weights file
                             and optionally `deploy`: export defaults chosen by
                             measurement ({"budget", "streams"}), and `draft_vocab`:
                             {file, size, train_coverage, heldout_coverage, sha256}
                             (chosen by models/vocab.py)
    streams.safetensors      the trained parameters only (stream embeddings, LoRA,
                             exit adapter), under `Transformer.named_parameters` names
    draft_vocab.safetensors  optional: the drafting vocabulary's sorted token ids
    tokenizer.json, tokenizer_config.json (chat template), ...
                             the base model's tokenizer files, copied as they are, so
                             the folder is also a tokenizer folder

The base weights are not copied: the checkpoint names the base (its spec and folder)
and its fingerprint (`loading.base_fingerprint`), and loading refuses a base whose
fingerprint differs. Only JSON and safetensors are written: no pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from streamspec.files import write_atomic, write_json

from .config import ModelConfig, StreamConfig
from .errors import StreamspecError, read_json_file
from .model import Transformer, load_base_weights

FORMAT = "streamspec-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "streamspec.json"
WEIGHTS_FILE = "streams.safetensors"
VOCAB_FILE = "draft_vocab.safetensors"  # the reduced drafting vocabulary (chosen by models/vocab.py)
# Files of a Hugging Face folder that make up its tokenizer and chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


@dataclass
class CheckpointInfo:
    """What `streamspec.json` says, with the paths resolved on this machine."""

    folder: Path
    base_folder: Path  # the base model's Hugging Face folder (fingerprint checked)
    base_sha256: str
    model: ModelConfig
    streams: StreamConfig
    training: dict = field(default_factory=dict)  # every training hyper-parameter
    metrics: dict = field(default_factory=dict)  # held-out metrics of the saved step
    base_source: Optional[str] = None  # the --base the run was given ("default", a path)
    weights_sha256: str = ""
    # Export defaults measured for the checkpoint (optional): {"budget": draft nodes,
    # "streams": streams to deploy}; `streamspec export` options override them.
    deploy: dict = field(default_factory=dict)
    draft_vocab: dict = field(default_factory=dict)  # the reduced drafting vocabulary's entry (see below)

    @property
    def tokenizer_folder(self) -> Path:
        """Folder with tokenizer.json and tokenizer_config.json (chat template) to ship."""
        return self.folder

    @property
    def weights_path(self) -> Path:
        return self.folder / WEIGHTS_FILE


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    contiguous = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    write_atomic(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def copy_tokenizer(base_folder: Path, dest: Path) -> None:
    """Copy the base's tokenizer files into dest (files replaced)."""
    if not (base_folder / "tokenizer.json").is_file():
        raise StreamspecError(f"{base_folder} has no tokenizer.json, the fast-tokenizer file the runtime needs.")
    for name in TOKENIZER_FILES:
        source = base_folder / name
        if source.is_file():
            write_atomic(dest / name, lambda tmp, source=source: shutil.copyfile(source, tmp))


def save_checkpoint(folder: Union[str, Path], model: Transformer, base_folder: Union[str, Path],
                    base_sha256: str, base_source: Optional[str] = None,
                    training: Optional[dict] = None, metrics: Optional[dict] = None) -> Path:
    """Write `model`'s trained parameters and description into `folder`.

    Files are replaced one by one, streamspec.json last (it holds the weights' hash), so
    a reader sees either the old checkpoint or the new one, or a hash mismatch.
    """
    if model.streams is None:
        raise StreamspecError("Only a model with speculative streams can be saved as a checkpoint.")
    folder, base_folder = Path(folder), Path(base_folder)
    folder.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(base_folder, folder)
    save_tensors(folder / WEIGHTS_FILE, dict(model.trainable_parameters()), {"format": FORMAT})
    description = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "streamspec_version": _version(),
        "base": {
            "source": base_source if base_source is not None else str(base_folder),
            "folder": str(base_folder.resolve()),
            "sha256": base_sha256,
        },
        "model": model.config.to_dict(),
        "streams": model.streams.to_dict(),
        "training": training or {},
        "metrics": metrics or {},
        "weights": {"file": WEIGHTS_FILE, "sha256": _sha256(folder / WEIGHTS_FILE)},
    }
    write_json(folder / CONFIG_FILE, description)
    return folder


def _version() -> str:
    from streamspec import __version__

    return __version__


def read_checkpoint_info(folder: Union[str, Path], base: Union[str, os.PathLike, None] = None) -> CheckpointInfo:
    """Check `streamspec.json` and find the base model; weights are not read.

    base: where the base model is now, if not where training found it (a folder, a
    .gguf file or "default"); its fingerprint must match the recorded one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise StreamspecError(f"The checkpoint folder {folder} does not exist.")
    config_path = folder / CONFIG_FILE
    meta = read_json_file(
        config_path, missing=f"{folder} is not a streamspec checkpoint (it has no {CONFIG_FILE}).",
        corrupt=f"{config_path} is corrupt (not valid JSON).", fmt=FORMAT,
        wrong_format=f"{folder} is not a streamspec training checkpoint ({CONFIG_FILE} names another format).",
        version=FORMAT_VERSION,
        wrong_version=f"{folder} is in checkpoint format version {{found}}, but this streamspec reads version "
                      f"{FORMAT_VERSION}.")
    try:
        recorded = meta["base"]
        model = ModelConfig.from_dict(meta["model"])
        streams = StreamConfig.from_dict(meta["streams"])
        base_sha, base_source = str(recorded["sha256"]), recorded.get("source")
        weights_sha = str(meta["weights"]["sha256"])
    except (KeyError, TypeError):
        raise StreamspecError(f"{config_path} is corrupt (a required entry is missing).") from None
    base_folder = _find_base(base, recorded, folder)
    from .loading import base_fingerprint

    actual = base_fingerprint(base_folder)
    if actual != base_sha:
        raise StreamspecError(
            f"The base model in {base_folder} (sha256 {actual[:12]}…) is not the one {folder} "
            f"was trained on (sha256 {base_sha[:12]}…)."
        )
    return CheckpointInfo(folder, base_folder, base_sha, model, streams, meta.get("training", {}),
                          meta.get("metrics", {}), base_source, weights_sha, meta.get("deploy") or {},
                          meta.get("draft_vocab") or {})


def _find_base(base, recorded: dict, folder: Path) -> Path:
    """The base named by the caller, else the recorded folder, else the recorded spec."""
    from .loading import resolve_base

    if base is not None:
        return resolve_base(base)
    recorded_folder = Path(str(recorded.get("folder", "")))
    if recorded.get("folder") and recorded_folder.is_dir():
        return resolve_base(recorded_folder)
    source = recorded.get("source")
    try:
        return resolve_base(source)
    except StreamspecError:
        raise StreamspecError(
            f"The base model of {folder} ({source}) is not on this machine; pass its folder or .gguf file as the base."
        ) from None


def load_checkpoint(folder: Union[str, Path], base: Union[str, os.PathLike, None] = None,
                    device: Union[str, torch.device] = "cpu") -> tuple[Transformer, CheckpointInfo]:
    """The trained model (eval mode, fp32) and its description.

    Refuses, in one sentence, another format version, a base whose fingerprint differs
    and a corrupt or incomplete weights file.
    """
    from .loading import load_base_state_dict

    info = read_checkpoint_info(folder, base)
    if not (info.tokenizer_folder / "tokenizer.json").is_file():
        raise StreamspecError(f"{info.folder} lacks its tokenizer (tokenizer.json).")
    model = Transformer(info.model, info.streams)
    load_base_weights(model, load_base_state_dict(info.base_folder))
    load_trained(model, read_trained(info), str(info.weights_path))
    model.draft_vocab = load_draft_vocab(info.folder, info.draft_vocab, info.model.vocab_size)
    return model.to(device).eval(), info


def read_trained(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """The checkpoint's trained tensors (stream embeddings, adapters), checked against the
    sha256 that its streamspec.json records."""
    from safetensors.torch import load_file

    weights = info.weights_path
    if not weights.is_file() or _sha256(weights) != info.weights_sha256:
        raise StreamspecError(f"{weights} is missing or corrupt (its sha256 differs from {CONFIG_FILE}).")
    try:
        return load_file(str(weights))
    except Exception:
        raise StreamspecError(f"{weights} is not a readable safetensors file (corrupt or truncated).") from None


def load_trained(model: Transformer, trained: dict[str, torch.Tensor], where: str) -> None:
    """Copy trained parameters into `model`; names and shapes must match exactly."""
    ours = model.trainable_parameters()
    if set(trained) != set(ours):
        missing = sorted(set(ours) - set(trained)) or sorted(set(trained) - set(ours))
        raise StreamspecError(f"{where} does not fit this model (e.g. {missing[0]}).")
    with torch.no_grad():
        for name, parameter in ours.items():
            if trained[name].shape != parameter.shape:
                raise StreamspecError(
                    f"{where} does not fit this model ({name} has shape {tuple(trained[name].shape)}, "
                    f"expected {tuple(parameter.shape)})."
                )
            parameter.copy_(trained[name])


# ------------------------------------------------------------------ the drafting vocabulary
# Its file is part of the checkpoint format (models/vocab.py chooses the tokens).
def save_draft_vocab(folder: Union[str, Path], ids: torch.Tensor, train_coverage: float,
                     heldout_coverage: Optional[float] = None) -> None:
    """Store `ids` (sorted token ids [V']) in the checkpoint folder and describe it in its
    streamspec.json."""
    folder = Path(folder)
    save_tensors(folder / VOCAB_FILE, {"draft_vocab": ids})
    description = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    description["draft_vocab"] = {"file": VOCAB_FILE, "size": len(ids), "train_coverage": train_coverage,
                                  "heldout_coverage": heldout_coverage, "sha256": _sha256(folder / VOCAB_FILE)}
    write_json(folder / CONFIG_FILE, description)


def load_draft_vocab(folder: Path, entry: Optional[dict], vocab_size: int) -> Optional[torch.Tensor]:
    """The checkpoint's drafting vocabulary [V'] (None when it has none); one sentence when corrupt."""
    from safetensors.torch import load_file

    if not entry:
        return None
    path = folder / str(entry.get("file", VOCAB_FILE))
    if not path.is_file() or _sha256(path) != entry.get("sha256"):
        raise StreamspecError(f"{path} is missing or corrupt (its sha256 differs from streamspec.json).")
    ids = load_file(str(path)).get("draft_vocab")
    if ids is None or ids.dtype != torch.int64 or ids.ndim != 1 or not len(ids) or int(ids.max()) >= vocab_size:
        raise StreamspecError(f"{path} does not hold a drafting vocabulary for this model.")
    return ids
