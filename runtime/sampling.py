"""Choosing the next token from the main stream's scores: greedy or exact sampling.

The same chooser serves autoregressive and speculative decoding, so both draw from the
model's own distribution: speculation only decides how many of those draws one
forward pass can confirm (see `tree.accept`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from streamspec.errors import StreamspecError

from .checks import is_integer, is_number


MAX_SEED = 2 ** 64 - 1  # numpy's generators take any non-negative integer; 64 bits is plenty


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit
    seed: Optional[int] = None

    @classmethod
    def checked(cls, temperature: Any, top_p: Any, top_k: Any, seed: Any) -> "SamplingParams":
        """The parameters from caller-supplied values (the Python API, the server, the
        CLI), type- and range-checked; one sentence when one is wrong."""
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if not is_number(value):
                raise StreamspecError(f"{name} must be a number, got {value!r}.")
        params = cls(float(temperature), float(top_p), top_k, seed)
        params.validate()
        return params

    def validate(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise StreamspecError(f"temperature must be >= 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise StreamspecError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not is_integer(self.top_k) or self.top_k < 0:
            raise StreamspecError(f"top_k must be an integer >= 0, got {self.top_k!r}.")
        # A negative seed made numpy raise deep inside a generation (a 500 from the server).
        if self.seed is not None and (not is_integer(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise StreamspecError(f"seed must be an integer between 0 and 2**64 - 1, got {self.seed!r}.")

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
