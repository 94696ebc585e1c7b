"""Shared test builders: the tiny tokenizer and models, MSA models with non-zero adapters,
exports of them, random trees, the PyTorch reference of a step, transformers' greedy
output. Test modules import these from here (never from each other); the session-wide
folders built from them are fixtures in conftest.py (`tiny_model_dir`, `shared_export`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from streamspec.models.attention import EagerAttention, KVCache
from streamspec.models.config import StreamConfig
from streamspec.models.model import Transformer, build_model
from streamspec.runtime.session import StepSession
from streamspec.runtime.tree import Tree

# ------------------------------------------------------------------------------ tiny tokenizer and models
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


# ------------------------------------------------------------------------------ MSA models and exports
MAX_LENGTH = 96  # export_tiny's default cache length
CANDIDATES = 6  # export_tiny's default top-K
SHARPEN = 3.0  # sharpened_msa's weight scale


def msa_model(folder: Path, num_streams: int = 2, msa_layers: int = 2, mode: str = "lossless",
              seed: int = 0) -> Transformer:
    """A tiny base model with speculative streams whose adapters are not zero (so that
    stream rows, LoRA on them and the exit adapter all show up in the outputs)."""
    model = build_model(folder, StreamConfig(num_streams=num_streams, num_msa_layers=msa_layers, mode=mode,
                                             lora_rank=4, exit_rank=4))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.trainable_parameters().items():
            param.copy_(torch.randn(param.shape, generator=generator) * (0.3 if "lora_B" in name else 0.5))
    return model.eval()


def sharpened_msa(root: Path, seed: int = 0) -> tuple[Path, Transformer]:
    """A tiny llama with sharpened weights (greedy text varies instead of repeating one
    token, so drafts, acceptance and compaction see different trees at every step), saved
    as a Hugging Face folder under `root`, and its MSA model with 3 streams.
    (`shared_export(seed=seed, sharpen=SHARPEN)` exports the same model once per session.)"""
    hf = save_tiny_model("llama", root / "hf", seed=seed, sharpen=SHARPEN)
    return hf, msa_model(hf, num_streams=3)


def export_tiny(model: Transformer, tokenizer_dir: Path, out: Path, **options) -> Path:
    from streamspec.exporter import export_model

    options.setdefault("max_length", MAX_LENGTH)
    options.setdefault("candidates", CANDIDATES)
    return export_model(model, tokenizer_dir, out, progress=False, **options)


# ------------------------------------------------------------------------------ trees and steps
def random_tree(rng: np.random.Generator, nodes: int, vocab: int):
    """Random parents (each before its children), tokens and depths."""
    parents = np.array([-1] + [int(rng.integers(0, i)) for i in range(1, nodes)], dtype=np.int32)
    depths = np.zeros(nodes, dtype=np.int32)
    for i in range(1, nodes):
        depths[i] = depths[parents[i]] + 1
    return Tree(rng.integers(0, vocab, nodes).astype(np.int64), parents, depths, np.ones(nodes, np.float32))


class Reference:
    """The PyTorch model stepping a KV cache exactly as the engine does."""

    def __init__(self, model: Transformer):
        cfg = model.config
        self.model = model
        self.cache = KVCache(cfg.num_layers, 1, cfg.num_kv_heads, MAX_LENGTH, cfg.head_dim)

    @torch.no_grad()
    def step(self, tree, past: int):
        mask = torch.from_numpy(tree.ancestor_mask())[None]
        attention = EagerAttention(mask, self.model.num_streams, self.cache, past)
        out = self.model(torch.from_numpy(tree.tokens)[None], torch.from_numpy(tree.positions(past))[None], attention)
        streams = None if out.stream_logits is None else out.stream_logits[0].double().numpy()
        exits = None if out.exit_logits is None else out.exit_logits[0].double().numpy()
        return out.main_logits[0].double().numpy(), streams, exits


def run_step(session: StepSession, tree, past: int, compact_src=(), stream_nodes=None, output_nodes=None):
    n = tree.size
    every = np.arange(n, dtype=np.int64)
    feeds = dict(input_ids=tree.tokens, positions=tree.positions(past), tree_mask=tree.ancestor_mask(),
                 tree_parent=tree.parents.astype(np.int32), past_length=np.array([past], dtype=np.int64),
                 compact_src=np.asarray(compact_src, dtype=np.int64),
                 stream_nodes=every if stream_nodes is None else np.asarray(stream_nodes, dtype=np.int64),
                 output_nodes=every if output_nodes is None else np.asarray(output_nodes, dtype=np.int64),
                 temperature=np.array([1.0], np.float32), top_k=np.array([0]), top_p=np.array([1.0], np.float32))
    feeds["sample_rows"] = np.zeros(0, np.int64)
    feeds["exit_nodes"] = feeds["output_nodes"]
    feeds["uniform"] = np.zeros(0, np.float32)
    return session.run(feeds)


# ------------------------------------------------------------------------------ transformers' greedy output
PROMPTS = ([5, 40, 41, 42, 9, 77], [10, 11], [100, 3, 66, 67, 68, 69, 70, 71, 33])


@functools.lru_cache(maxsize=4)
def hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def hf_greedy(folder: Path, prompt: list[int], max_new_tokens: int) -> tuple[list[int], callable]:
    """transformers' greedy tokens (EOS ignored), and its next-token logits function."""
    model = hf_model(folder)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0)

    @torch.no_grad()
    def logits(prefix: list[int]) -> np.ndarray:
        return model(torch.tensor([prompt + prefix])).logits[0, -1].double().numpy()

    return out[0, len(prompt):].tolist(), logits


# ------------------------------------------------------------------------------ graphs
def tied_graph(vocab: int = 96, hidden: int = 64):
    """embedding Gather + a tied head traced as MatMul(x, Transpose(table)) twice (as
    SmolLM2's graph holds it) + an MLP as wide as the vocabulary (up, then down)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    table = rng.normal(0, 0.05, (vocab, hidden)).astype(np.float32)
    mlp = rng.normal(0, 0.05, (hidden, vocab)).astype(np.float32)
    down = rng.normal(0, 0.05, (vocab, hidden)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["x"], name="embed"),
             helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0], name="t"),
             helper.make_node("MatMul", ["x", "table_t"], ["logits"], name="head"),
             helper.make_node("MatMul", ["x", "table_t"], ["logits2"], name="head2"),
             helper.make_node("TopK", ["logits2", "k"], ["top", "top_ids"], name="topk"),
             helper.make_node("MatMul", ["x", "mlp"], ["wide"], name="up"),
             helper.make_node("MatMul", ["wide", "down"], ["narrow"], name="down")]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("logits", "top", "narrow")],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(mlp, "mlp"),
         numpy_helper.from_array(down, "down"),
         numpy_helper.from_array(np.array([3], np.int64), "k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    return model, table, mlp @ down
