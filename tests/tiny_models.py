"""Tiny random Hugging Face models of each supported family, built in code (no downloads)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 64


def hf_configs(vocab: int = VOCAB) -> dict[str, transformers.PretrainedConfig]:
    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=4, num_attention_heads=4)
    return {
        # llama3 RoPE scaling exercises the config's scaling path.
        "llama": transformers.LlamaConfig(
            **common, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "mistral": transformers.MistralConfig(
            **common, intermediate_size=128, num_key_value_heads=1, tie_word_embeddings=False),
        "qwen2": transformers.Qwen2Config(
            **common, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True),
        # OPT with project_in/out (word_embed_proj_dim) and pre-LN, like OPT-350m's head...
        "opt": transformers.OPTConfig(
            **common, ffn_dim=128, word_embed_proj_dim=32, max_position_embeddings=512),
        # ...and OPT-350m's post-LN layers.
        "opt-post-ln": transformers.OPTConfig(
            **common, ffn_dim=128, do_layer_norm_before=False, max_position_embeddings=512),
    }


def tiny_hf_model(family: str, seed: int = 0, vocab: int = VOCAB, sharpen: float = 1.0):
    """A random model; `sharpen` scales weights up for peakier (less tied) distributions."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_configs(vocab)[family]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02).mul_(sharpen)
    return model
