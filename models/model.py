"""One compact decoder for the Llama family (Llama, Mistral, Qwen2, SmolLM) and OPT, with
Speculative Streaming's multi-stream attention (MSA) layers on top.

A forward pass takes the N rows of a step (tree nodes or prompt tokens) with their
positions and an attention backend that knows the tree and the KV cache:

    tokens [B, N] ─ embed ─ lower layers (main rows only) ─┬─ exit adapter ─ head ─ exit logits
                                                            └─ + stream embeddings P_j
                                                               ─ MSA layers (N·(1+γ) rows) ─ head
                                                                     ├─ main logits   [B, N, V]
                                                                     └─ stream logits [B, N, γ, V]

Stream rows take their main row's position (RoPE). In lossless mode the adapters touch
stream rows only, so the main rows compute exactly the base model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig, StreamConfig

# (layer index, q [B, H, R, D], k [B, KV, R, D], v [B, KV, R, D], scale) -> [B, H, R, D]
AttentionBackend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass
class StepOutput:
    main_logits: torch.Tensor  # [B, N, V]: row n predicts the token after node n
    stream_logits: Optional[torch.Tensor] = None  # [B, N, γ, V]: stream j predicts n + 1 + j
    exit_logits: Optional[torch.Tensor] = None  # [B, N, V]: early-exit guess of main_logits


class Linear(nn.Linear):
    """nn.Linear with an optional LoRA adapter applied to rows [adapted_from, R) only."""

    lora_A: Optional[nn.Parameter]
    lora_B: Optional[nn.Parameter]

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_A = None
        self.lora_B = None
        self.lora_scale = 1.0

    def add_lora(self, rank: int, alpha: float) -> None:
        # B starts at zero so a fresh adapter leaves the layer unchanged.
        self.lora_A = nn.Parameter(torch.randn(rank, self.in_features) / math.sqrt(self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))
        self.lora_scale = alpha / rank

    def forward(self, x: torch.Tensor, adapted_from: int = 0) -> torch.Tensor:
        """x: [B, R, in] -> [B, R, out]."""
        y = F.linear(x, self.weight, self.bias)
        if self.lora_A is None or adapted_from >= x.shape[1]:
            return y
        delta = F.linear(F.linear(x[:, adapted_from:], self.lora_A), self.lora_B) * self.lora_scale
        if adapted_from == 0:
            return y + delta
        return torch.cat([y[:, :adapted_from], y[:, adapted_from:] + delta], dim=1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.family == "opt":
        return nn.LayerNorm(config.hidden_size, elementwise_affine=config.layer_norm_elementwise_affine)
    return RMSNorm(config.hidden_size, config.rms_norm_eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.q = Linear(d, h * hd, config.attention_bias)
        self.k = Linear(d, kv * hd, config.attention_bias)
        self.v = Linear(d, kv * hd, config.attention_bias)
        self.o = Linear(h * hd, d, config.output_bias)
        self.scale = hd ** -0.5

    def forward(self, x: torch.Tensor, rope: Optional[tuple], attention: AttentionBackend,
                layer: int, adapted_from: int) -> torch.Tensor:
        b, r, _ = x.shape
        # [B, R, H*D] -> [B, H, R, D]
        q = self.q(x, adapted_from).view(b, r, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(x, adapted_from).view(b, r, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x, adapted_from).view(b, r, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = (t.to(q.dtype) for t in rope)  # [B, 1, R, D]; float32 -> the model's dtype
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        out = attention(layer, q, k, v, self.scale)
        return self.o(out.transpose(1, 2).reshape(b, r, -1), adapted_from)


class MLP(nn.Module):
    """SwiGLU (Llama family) or fc1 -> activation -> fc2 (OPT)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gated = config.family == "llama"
        if self.gated:
            self.gate = Linear(d, f, bias)
            self.up = Linear(d, f, bias)
            self.down = Linear(f, d, bias)
        else:
            self.fc1 = Linear(d, f, bias)
            self.fc2 = Linear(f, d, bias)
        self.act = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu}[config.activation]

    def forward(self, x: torch.Tensor, adapted_from: int) -> torch.Tensor:
        if self.gated:
            hidden = self.act(self.gate(x, adapted_from)) * self.up(x, adapted_from)
            return self.down(hidden, adapted_from)
        return self.fc2(self.act(self.fc1(x, adapted_from)), adapted_from)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn = Attention(config)
        self.mlp = MLP(config)
        self.attn_norm = make_norm(config)
        self.mlp_norm = make_norm(config)
        # OPT-350m normalises after the residual add; everything else before.
        self.norm_first = config.family == "llama" or config.do_layer_norm_before

    def forward(self, x, rope, attention: AttentionBackend, layer: int, adapted_from: int):
        if self.norm_first:
            x = x + self.attn(self.attn_norm(x), rope, attention, layer, adapted_from)
            return x + self.mlp(self.mlp_norm(x), adapted_from)
        x = self.attn_norm(x + self.attn(x, rope, attention, layer, adapted_from))
        return self.mlp_norm(x + self.mlp(x, adapted_from))


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [D/2] and attention scaling for the config's RoPE variant.

    Plain RoPE is computed here, as transformers computes it (transformers 5 no longer
    lists it among its initialisers); scaled variants use transformers' own
    initialisers, so every scaling type matches the reference implementation exactly.
    """
    rope_type = (config.rope_scaling or {}).get("rope_type", (config.rope_scaling or {}).get("type", "default"))
    if rope_type == "default":
        dim = config.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (config.rope_theta ** exponents), 1.0
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_heads,
        head_dim=config.head_dim,
        rope_theta=config.rope_theta,
        rope_scaling=config.rope_scaling,
        max_position_embeddings=config.max_position_embeddings,
    )
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")
    return inv_freq.float(), float(scaling)


class Transformer(nn.Module):
    """The base decoder, plus speculative streams when `streams` is given."""

    def __init__(self, config: ModelConfig, streams: Optional[StreamConfig] = None):
        super().__init__()
        self.config = config
        self.streams = streams
        d = config.hidden_size
        opt = config.family == "opt"
        embed_dim = config.word_embed_proj_dim if opt else d
        self.embed = nn.Embedding(config.vocab_size, embed_dim)
        self.pos_embed = nn.Embedding(config.max_position_embeddings + 2, d) if opt else None
        self.project_in = nn.Linear(embed_dim, d, bias=False) if embed_dim != d else None
        self.project_out = nn.Linear(d, embed_dim, bias=False) if embed_dim != d else None
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = make_norm(config) if (not opt or config.final_layer_norm) else None
        self.lm_head = nn.Linear(embed_dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        if not opt:
            inv_freq, scaling = rope_frequencies(config)
            self.register_buffer("inv_freq", inv_freq, persistent=False)
            self.rope_scaling = scaling
        # Reduced drafting vocabulary (models/vocab.py): sorted token ids [V'] that stream
        # rows and the early-exit head score at deployment; None: the whole vocabulary.
        self.draft_vocab: Optional[torch.Tensor] = None
        if streams is not None:
            streams.validate(config)
            self.stream_embed = nn.Parameter(torch.randn(streams.num_streams, d) * 0.02)
            # Early-exit adapter (pruning): h + B(A(h)) at the stream-insertion layer.
            self.exit_A = nn.Parameter(torch.randn(streams.exit_rank, d) / math.sqrt(d))
            self.exit_B = nn.Parameter(torch.zeros(d, streams.exit_rank))
            for block in self.layers[self.msa_start:]:
                for module in block.modules():
                    if isinstance(module, Linear):
                        module.add_lora(streams.lora_rank, streams.lora_alpha)

    # ----------------------------------------------------------------------------------
    @property
    def num_streams(self) -> int:
        return self.streams.num_streams if self.streams else 0

    @property
    def msa_start(self) -> int:
        """Index of the first MSA layer (num_layers when the model has no streams)."""
        return self.config.num_layers - (self.streams.num_msa_layers if self.streams else 0)

    def keep_streams(self, count: int) -> None:
        """Keep only streams 1..count. Exact: stream j attends to main rows and to streams
        1..j of its own row, never to later streams, so the kept streams compute what they
        computed before; fewer stream rows make a tree step cheaper on compute-bound devices."""
        self.stream_embed = nn.Parameter(self.stream_embed.data[:count].clone(), requires_grad=False)
        self.streams = dataclasses.replace(self.streams, num_streams=count)

    def main_stream_only(self) -> "Transformer":
        """A copy that computes the main stream alone, as a plain decoder (what an
        autoregressive-only export traces). In lossless mode the adapters act on stream
        rows only, so the main stream is the base model and they are dropped; in the
        other modes they act on every row and stay, applied in every adapted layer."""
        model = copy.deepcopy(self)
        if model.streams is not None and model.streams.mode == "lossless":
            for module in model.modules():
                if isinstance(module, Linear):
                    module.lora_A = module.lora_B = None
        for name in ("stream_embed", "exit_A", "exit_B"):
            if hasattr(model, name):
                delattr(model, name)
        model.streams, model.draft_vocab = None, None
        return model

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """What Speculative Streaming adds: stream embeddings, LoRA and exit adapters."""
        return {n: p for n, p in self.named_parameters()
                if n in ("stream_embed", "exit_A", "exit_B") or ".lora_" in n}

    def rope(self, positions: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """positions [B, R] -> (cos, sin) [B, 1, R, D], or None for OPT (learned positions)."""
        if self.pos_embed is not None:
            return None
        freqs = positions[..., None].float() * self.inv_freq  # [B, R, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return ((emb.cos() * self.rope_scaling).unsqueeze(1),
                (emb.sin() * self.rope_scaling).unsqueeze(1))

    def head(self, x: torch.Tensor, vocab: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final norm and LM head: [B, R, D] -> [B, R, V], or [B, R, V'] over the token ids
        `vocab` [V'] only (a reduced drafting vocabulary: a smaller matrix to read)."""
        if self.norm is not None:
            x = self.norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        if vocab is not None:
            return F.linear(x, self.lm_head.weight[vocab])
        return self.lm_head(x)

    # ----------------------------------------------------------------------------------
    def lower(self, tokens: torch.Tensor, positions: torch.Tensor,
              attention: AttentionBackend) -> torch.Tensor:
        """Embedding and the layers below the MSA layers: [B, N] -> hidden [B, N, D]."""
        x = self.embed(tokens)
        if self.project_in is not None:
            x = self.project_in(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions + 2)  # OPT's learned positions start at offset 2
        rope = self.rope(positions)
        for i in range(self.msa_start):
            x = self.layers[i](x, rope, attention, i, 0)
        return x

    def upper(self, hidden: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend,
              with_streams: bool = True) -> StepOutput:
        """The MSA layers and the heads, from the hidden state at the insertion layer.

        hidden: [B, N, D] main rows. With streams, γ stream rows per node are appended
        (h + P_j, at the node's position); the attention backend must know that layout.
        """
        b, n, _ = hidden.shape
        g = self.num_streams if with_streams else 0
        exit_logits = self.exit_head(hidden) if g else None
        x = self.msa_layers(hidden, positions, attention, with_streams=bool(g))
        logits = self.head(x)
        stream_logits = logits[:, n:].reshape(b, n, g, -1) if g else None
        return StepOutput(logits[:, :n], stream_logits, exit_logits)

    def msa_layers(self, hidden: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend,
                   stream_nodes: Optional[torch.Tensor] = None, with_streams: bool = True) -> torch.Tensor:
        """The MSA layers over the main rows and, with streams, γ stream rows (h + P_j, at
        the node's position) for each of `stream_nodes` (default: every node).

        hidden, positions: [B, N, D], [B, N] -> [B, N + L*γ, D], rows main first, then
        node by node its γ streams (the layout the attention backends expect)."""
        b, n, d = hidden.shape
        g = self.num_streams if with_streams else 0
        x, row_positions = hidden, positions
        if g:
            chosen, chosen_positions = hidden, positions
            if stream_nodes is not None:
                chosen, chosen_positions = hidden[:, stream_nodes], positions[:, stream_nodes]
            stream_rows = (chosen[:, :, None, :] + self.stream_embed).reshape(b, -1, d)
            x = torch.cat([hidden, stream_rows], dim=1)
            # expand + reshape rather than repeat_interleave: it traces to plain ONNX ops.
            stream_positions = chosen_positions[:, :, None].expand(b, chosen_positions.shape[1], g)
            row_positions = torch.cat([positions, stream_positions.reshape(b, -1)], dim=1)
        rope = self.rope(row_positions) if self.pos_embed is None else None
        # Lossless: adapters act on stream rows only, so main rows stay the base model.
        adapted_from = n if (self.streams and self.streams.mode == "lossless") else 0
        for i in range(self.msa_start, self.config.num_layers):
            x = self.layers[i](x, rope, attention, i, adapted_from)
        return x

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend,
                with_streams: bool = True) -> StepOutput:
        """One step: tokens, positions [B, N]; the backend holds tree mask and KV cache."""
        hidden = self.lower(tokens, positions, attention)
        return self.upper(hidden, positions, attention, with_streams and self.streams is not None)

    def exit_head(self, hidden: torch.Tensor, vocab: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Early-exit logits (tree pruning): hidden [B, N, D] at the insertion layer ->
        [B, N, V] (or [B, N, V'] over `vocab`, see `head`)."""
        return self.head(hidden + F.linear(F.linear(hidden, self.exit_A), self.exit_B), vocab)

    def stream_upper(self, hidden: torch.Tensor, positions: torch.Tensor,
                     attention: AttentionBackend, vocab: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Stream rows alone through the MSA layers (lossless training): -> [B, N, γ, V]
        (or [B, N, γ, V'] over the token ids `vocab`, see `head`).

        hidden: [B, N, D] main rows at the insertion layer, positions [B, N]. The main
        rows are not computed: in lossless mode they are the frozen base model, so the
        backend supplies their keys and values from a pass without gradient (see
        `attention.MainKVAttention`). Rows are laid out as the stream rows of `upper`
        (stream j of node n at n*γ + j - 1); they equal `upper`'s stream logits.
        """
        b, n, d = hidden.shape
        g = self.num_streams
        x = (hidden[:, :, None, :] + self.stream_embed).reshape(b, n * g, d)
        rope = self.rope(positions.repeat_interleave(g, dim=1))
        for i in range(self.msa_start, self.config.num_layers):
            x = self.layers[i](x, rope, attention, i, 0)  # every row is a stream row
        return self.head(x, vocab).reshape(b, n, g, -1)


# --------------------------------------------------------------------------------------
# Hugging Face weight names -> ours.

def _hf_name(name: str, family: str) -> Optional[str]:
    """Map one Hugging Face parameter name to this module's name (None: not a weight we use)."""
    for prefix in ("model.decoder.", "decoder.", "model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    rules = {
        "llama": [("embed_tokens.", "embed."), ("self_attn.q_proj.", "attn.q."),
                  ("self_attn.k_proj.", "attn.k."), ("self_attn.v_proj.", "attn.v."),
                  ("self_attn.o_proj.", "attn.o."), ("mlp.gate_proj.", "mlp.gate."),
                  ("mlp.up_proj.", "mlp.up."), ("mlp.down_proj.", "mlp.down."),
                  ("input_layernorm.", "attn_norm."), ("post_attention_layernorm.", "mlp_norm.")],
        "opt": [("embed_tokens.", "embed."), ("embed_positions.", "pos_embed."),
                ("self_attn.q_proj.", "attn.q."), ("self_attn.k_proj.", "attn.k."),
                ("self_attn.v_proj.", "attn.v."), ("self_attn.out_proj.", "attn.o."),
                ("self_attn_layer_norm.", "attn_norm."), ("fc1.", "mlp.fc1."), ("fc2.", "mlp.fc2."),
                ("final_layer_norm.", "mlp_norm.")],
    }[family]
    if name.startswith("layers."):
        for old, new in rules:
            name = name.replace("." + old, "." + new)
        return name
    if family == "opt" and name.startswith("final_layer_norm."):
        return name.replace("final_layer_norm.", "norm.")
    for old, new in rules:
        if name.startswith(old) and old in ("embed_tokens.", "embed_positions."):
            return new + name[len(old):]
    if name.startswith(("norm.", "lm_head.", "project_in.", "project_out.")):
        return name
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return name


def load_base_weights(model: Transformer, hf_state: dict[str, torch.Tensor]) -> None:
    """Copy a Hugging Face state dict into `model`; every base weight must be present."""
    from .errors import StreamspecError

    ours = {n: p for n, p in model.named_parameters() if n not in model.trainable_parameters()}
    loaded = set()
    for hf_name, tensor in hf_state.items():
        name = _hf_name(hf_name, model.config.family)
        if name is None or name not in ours:
            continue
        if ours[name].shape != tensor.shape:
            raise StreamspecError(
                f"Weight {hf_name} has shape {tuple(tensor.shape)}, expected {tuple(ours[name].shape)}."
            )
        with torch.no_grad():
            ours[name].copy_(tensor.to(ours[name].dtype))
        loaded.add(name)
    if model.config.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = sorted(set(ours) - loaded)
    if missing:
        raise StreamspecError(f"The base checkpoint lacks {len(missing)} weights, e.g. {missing[0]}.")


def build_model(base_folder, streams: Optional[StreamConfig] = None) -> Transformer:
    """A `Transformer` with the weights of a Hugging Face folder (see `loading.resolve_base`)."""
    from transformers import AutoConfig

    from .loading import load_base_state_dict

    model = Transformer(ModelConfig.from_hf(AutoConfig.from_pretrained(str(base_folder))), streams)
    load_base_weights(model, load_base_state_dict(base_folder))
    return model.eval()
