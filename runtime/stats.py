"""What a generation did: its result (`Generation`), its numbers (`GenerationStats`)
and the record of each decode step that a profiler receives (`StepRecord`).

Plain dataclasses (standard library only), so that benchmarks, the profiler and the
server can read them without loading a model; `runtime.engine` fills them in and
re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenerationStats:
    """What one generation did; everything a benchmark needs."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    speculative: bool = False
    steps: int = 0  # forward passes after the prefill
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted per step
    tree_sizes: list[int] = field(default_factory=list)  # nodes per step (after pruning)
    drafted_sizes: list[int] = field(default_factory=list)  # nodes per step before pruning
    streamed_sizes: list[int] = field(default_factory=list)  # nodes per step with stream rows (not lookup's)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    model_seconds: float = 0.0  # inside onnxruntime (prefill included)
    stop_reason: str = "length"  # "length" | "eos" | "stop"
    cached_tokens: int = 0  # prompt tokens whose KV rows came from the cache (not prefilled)
    lookup_tokens: int = 0  # accepted draft tokens that came from prompt lookup (the rest: the streams)
    fallback_steps: int = 0  # steps of a speculative generation that the fallback decoded one token at a time
    decisions: list[dict[str, Any]] = field(default_factory=list)  # the fallback's decisions (fallback.py), with step

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens that the prefill ran (the rest came from the cache)."""
        return self.prompt_tokens - self.cached_tokens

    @property
    def forward_passes(self) -> int:
        return self.steps + 1

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per step: 1 (the correction token) + accepted drafts."""
        return 1.0 + (sum(self.accepted) / len(self.accepted) if self.accepted else 0.0)

    @property
    def total_seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def host_seconds(self) -> float:
        """Time outside onnxruntime: tree building, acceptance, binding, decoding text."""
        return max(self.total_seconds - self.model_seconds, 0.0)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_seconds if self.total_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """New tokens after the first (which the prefill gives) per second of decoding."""
        return (self.new_tokens - 1) / self.decode_seconds if self.decode_seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        names = ("prompt_tokens", "cached_tokens", "new_tokens", "speculative", "steps", "forward_passes",
                 "mean_accepted_length", "prefill_seconds", "decode_seconds", "model_seconds", "host_seconds",
                 "tokens_per_second", "decode_tokens_per_second", "stop_reason", "lookup_tokens", "fallback_steps",
                 "decisions")
        return {name: getattr(self, name) for name in names}


@dataclass
class StepRecord:
    """One decode step as a profiler sees it (`Engine.on_step`).

    seconds: tree (building the tree and its feeds), copy_in, run, copy_out (the
    session's split, `RunTiming`), accept (the walk), compaction (host compaction;
    graph compaction runs inside the next step's `run`).
    """

    step: int  # 1-based
    started: float  # time.perf_counter() at the step's start
    tree_nodes: int
    tree_depth: int
    accepted: int  # draft tokens accepted
    committed: int  # tokens committed (accepted + correction, cut at EOS / max_new_tokens)
    cache_rows: int  # committed rows in the KV cache after the step
    seconds: dict[str, float]
    drafted_nodes: int  # tree nodes before pruning (tree_nodes: after)
    lookup_nodes: int = 0  # tree nodes that prompt lookup added (the rest came from the streams)
    lookup_accepted: int = 0  # accepted draft tokens that came from lookup


@dataclass
class Generation:
    """A finished generation: its text, its token ids (without the prompt), its stats."""

    text: str
    token_ids: list[int]
    stats: GenerationStats
