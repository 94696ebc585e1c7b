"""Choosing the next token from the main stream's scores: greedy or exact sampling.

The same chooser serves autoregressive and speculative decoding, so both draw from the
model's own distribution: speculation only decides how many of those draws one
forward pass can confirm (see `tree.accept`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from streamspec.errors import StreamspecError


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit
    seed: Optional[int] = None

    def validate(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise StreamspecError(f"temperature must be >= 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise StreamspecError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise StreamspecError(f"top_k must be >= 0, got {self.top_k}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filtered_distribution(ids: np.ndarray, logits: np.ndarray,
                          params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Temperature, top-k and top-p applied to candidates sorted by logit (descending).

    ids, logits: [K]. Returns (ids, probabilities) of the tokens that keep mass.
    """
    scaled = logits.astype(np.float64) / params.temperature
    if params.top_k:
        ids, scaled = ids[:params.top_k], scaled[:params.top_k]
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)
        ids, probs = ids[:keep], probs[:keep] / probs[:keep].sum()
    return ids, probs


class TokenChooser:
    """Greedy argmax, or a seeded draw from the filtered distribution."""

    def __init__(self, params: SamplingParams):
        params.validate()
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """logits: [V] scores of one node's main stream -> the chosen token id."""
        if self.params.greedy:
            return int(np.argmax(logits))
        order = np.argsort(-logits, kind="stable")
        if self.params.top_k:
            order = order[:self.params.top_k]
        ids, probs = filtered_distribution(order, logits[order], self.params)
        return int(ids[self.rng.choice(len(ids), p=probs)])
