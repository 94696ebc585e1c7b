"""The checkpoint format: round trip, and one-sentence refusals of anything else."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from streamspec.models.attention import EagerAttention, causal_tree_mask
from streamspec.models.checkpoint import (CONFIG_FILE, FORMAT_VERSION, TOKENIZER_FILES, WEIGHTS_FILE,
                                          load_checkpoint, read_checkpoint_info, save_checkpoint)
from streamspec.models.config import StreamConfig
from streamspec.models.errors import StreamspecError
from streamspec.models.loading import base_fingerprint
from streamspec.models.model import build_model

STREAMS = StreamConfig(num_streams=2, num_msa_layers=2, lora_rank=4, exit_rank=2)


def outputs(model):
    tokens = torch.tensor([list(range(5, 25))])
    with torch.no_grad():
        return model(tokens, torch.arange(20)[None], EagerAttention(causal_tree_mask(20), model.num_streams))


@pytest.fixture()
def saved(tiny_llama_dir, tmp_path):
    """A checkpoint of a tiny model with random adapters: (folder, model)."""
    torch.manual_seed(3)
    model = build_model(tiny_llama_dir, STREAMS)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.normal_(0, 0.1)
    folder = save_checkpoint(tmp_path / "ckpt", model, tiny_llama_dir, base_fingerprint(tiny_llama_dir),
                             base_source=str(tiny_llama_dir), training={"lr": 0.001, "steps": 7},
                             metrics={"step": 7, "heldout": {"loss": 1.5}})
    return folder, model


def test_round_trip(saved, tiny_llama_dir):
    folder, model = saved
    loaded, info = load_checkpoint(folder)
    expected, actual = outputs(model), outputs(loaded)
    for name in ("main_logits", "stream_logits", "exit_logits"):
        assert torch.equal(getattr(actual, name), getattr(expected, name)), name
    assert info.streams == STREAMS and info.model == model.config
    assert info.base_folder == tiny_llama_dir.resolve() and info.base_sha256 == base_fingerprint(tiny_llama_dir)
    assert info.training["steps"] == 7 and info.metrics["heldout"]["loss"] == 1.5
    assert info.tokenizer_folder == folder and (folder / "tokenizer.json").is_file()
    assert "chat_template" in json.loads((info.tokenizer_folder / "tokenizer_config.json").read_text())
    meta = json.loads((folder / CONFIG_FILE).read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["streams"]["num_streams"] == 2


def test_no_pickle_anywhere(saved):
    folder, _ = saved
    files = {path.name for path in folder.rglob("*") if path.is_file()}
    assert files <= {CONFIG_FILE, WEIGHTS_FILE, *TOKENIZER_FILES}, files
    for name in files:
        assert not (folder / name).read_bytes().startswith(b"\x80"), name  # pickle protocol header


def test_refuses_another_format_version(saved):
    folder, _ = saved
    meta = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**meta, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(StreamspecError, match=r"format version 2, but this streamspec reads version 1\.$"):
        load_checkpoint(folder)


def test_refuses_another_base(saved, tiny_model_dir):
    folder, _ = saved
    with pytest.raises(StreamspecError, match="is not the one .* was trained on"):
        load_checkpoint(folder, base=tiny_model_dir("llama", seed=1))


def test_finds_a_moved_base_when_told(saved, tiny_llama_dir, tmp_path):
    folder, _ = saved
    moved = tmp_path / "moved-base"
    shutil.copytree(tiny_llama_dir, moved)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    meta["base"].update(folder=str(tmp_path / "gone"), source=str(tmp_path / "gone"))
    (folder / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(StreamspecError, match="not on this machine"):
        read_checkpoint_info(folder)
    assert read_checkpoint_info(folder, base=moved).base_folder == moved.resolve()


def test_refuses_corrupt_files(saved, tmp_path):
    folder, _ = saved
    weights = folder / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(StreamspecError, match="corrupt"):
        load_checkpoint(folder)
    weights.write_bytes(bytes(data[:100]))
    with pytest.raises(StreamspecError, match="corrupt"):
        load_checkpoint(folder)
    (folder / CONFIG_FILE).write_text("{not json")
    with pytest.raises(StreamspecError, match="corrupt"):
        load_checkpoint(folder)
    (folder / CONFIG_FILE).write_text(json.dumps({"format": "streamspec-checkpoint", "format_version": 1}))
    with pytest.raises(StreamspecError, match="corrupt"):
        load_checkpoint(folder)


def test_refuses_what_is_not_a_checkpoint(tiny_llama_dir, tmp_path):
    with pytest.raises(StreamspecError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing")
    with pytest.raises(StreamspecError, match="not a streamspec checkpoint"):
        load_checkpoint(tiny_llama_dir)
    export = tmp_path / "export"
    export.mkdir()
    (export / CONFIG_FILE).write_text(json.dumps({"exporter_version": "0.1.0"}))
    with pytest.raises(StreamspecError, match="not a streamspec training checkpoint"):
        load_checkpoint(export)
