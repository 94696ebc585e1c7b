"""Configuration dataclasses: the base architecture and the speculative streams.

`ModelConfig` describes the base decoder (read from a Hugging Face `config.json`);
`StreamConfig` describes what Speculative Streaming adds on top of it. Both are plain
dataclasses so that they serialise into `streamspec.json` as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from .errors import StreamspecError

# model_type values whose decoder `model.py` implements.
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = LLAMA_FAMILY + ("opt",)


def _rope_settings(d: dict) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling or None) from a config dict of either layout:
    transformers 4 writes `rope_theta` and `rope_scaling`; transformers 5 writes one
    `rope_parameters` dict ({"rope_theta", "rope_type", ...scaling keys}). A folder
    converted by one version may be read by the other (transformers 4 keeps the unknown
    `rope_parameters` key as it is), so `rope_parameters` wins when it is there."""
    parameters = d.get("rope_parameters")
    if isinstance(parameters, dict) and "rope_theta" in parameters:
        scaling = {k: v for k, v in parameters.items() if k != "rope_theta"}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        return float(parameters["rope_theta"]), (None if kind == "default" else scaling)
    return float(d.get("rope_theta", 10000.0)), d.get("rope_scaling")


@dataclass
class ModelConfig:
    """The base decoder. `family` is "llama" (Llama, Mistral, Qwen2, SmolLM) or "opt"."""

    family: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    # Llama family
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    attention_bias: bool = False  # bias on q/k/v (Qwen2: q/k/v only; Llama flag: q/k/v/o)
    output_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False
    # OPT
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int = 0  # != hidden_size means project_in / project_out exist
    final_layer_norm: bool = True
    layer_norm_elementwise_affine: bool = True
    activation: str = "silu"
    bos_token_id: Optional[int] = None
    eos_token_ids: list = field(default_factory=list)

    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        """Build from a `transformers` config object or its `config.json` dict."""
        d = hf if isinstance(hf, dict) else hf.to_dict()
        model_type = d.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise StreamspecError(
                f"Unsupported architecture {model_type!r}: streamspec supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}."
            )
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if model_type == "opt":
            hidden = d["hidden_size"]
            heads = d["num_attention_heads"]
            return cls(
                family="opt",
                model_type=model_type,
                vocab_size=d["vocab_size"],
                hidden_size=hidden,
                num_layers=d["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=heads,
                head_dim=hidden // heads,
                intermediate_size=d["ffn_dim"],
                max_position_embeddings=d["max_position_embeddings"],
                tie_word_embeddings=d.get("tie_word_embeddings", True),
                attention_bias=d.get("enable_bias", True),
                output_bias=d.get("enable_bias", True),
                mlp_bias=d.get("enable_bias", True),
                do_layer_norm_before=d.get("do_layer_norm_before", True),
                word_embed_proj_dim=d.get("word_embed_proj_dim", hidden) or hidden,
                final_layer_norm=d.get("do_layer_norm_before", True)
                and not d.get("_remove_final_layer_norm", False),
                layer_norm_elementwise_affine=d.get("layer_norm_elementwise_affine", True),
                activation=d.get("activation_function", "relu"),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        rope_theta, rope_scaling = _rope_settings(d)
        rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
        if rope_type not in ("default", "linear", "llama3", "yarn"):
            raise StreamspecError(
                f"RoPE scaling {rope_type!r} is not supported: streamspec supports default, "
                "linear, llama3 and yarn (a tree step needs position-independent frequencies)."
            )
        qwen = model_type == "qwen2"
        return cls(
            family="llama",
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            intermediate_size=d["intermediate_size"],
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            attention_bias=True if qwen else d.get("attention_bias", False),
            output_bias=False if qwen else d.get("attention_bias", False),
            mlp_bias=d.get("mlp_bias", False),
            activation=d.get("hidden_act", "silu"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class StreamConfig:
    """What Speculative Streaming adds to the base model.

    num_streams: γ, speculative streams per main row (stream j predicts token t+1+j).
    num_msa_layers: N_s, the top layers that become multi-stream attention layers.
    mode: "lossless" (base frozen, adapters on stream rows only: the main stream is the
      base model bit for bit) or "shared" (adapters on all rows of the MSA layers).
    lora_rank / lora_alpha: adapters on every linear layer of the MSA layers.
    exit_rank: the early-exit adapter at the stream-insertion layer (for tree pruning).
    """

    num_streams: int = 3
    num_msa_layers: int = 10
    mode: str = "lossless"
    lora_rank: int = 32
    lora_alpha: float = 32.0
    exit_rank: int = 8

    def validate(self, model: ModelConfig) -> None:
        if not 1 <= self.num_streams <= 8:
            raise StreamspecError(f"--streams must be between 1 and 8, got {self.num_streams}.")
        if not 1 <= self.num_msa_layers <= model.num_layers:
            raise StreamspecError(
                f"--msa-layers must be between 1 and the model's {model.num_layers} layers, "
                f"got {self.num_msa_layers}."
            )
        if self.mode not in ("lossless", "shared"):
            raise StreamspecError(f"--mode must be lossless or shared, got {self.mode!r}.")
        if self.lora_rank < 1 or self.exit_rank < 1:
            raise StreamspecError("LoRA ranks must be at least 1.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StreamConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
