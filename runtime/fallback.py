"""Automatic fallback: speculate only while it pays on this device.

A tree step costs more than a one-token step, and it pays only when it commits enough
tokens to make up for it. How much more it costs depends on the device (on a CPU a
tree of 16 nodes costs ~1.8 one-token steps, on a GPU barely more than one) and on the
text (how many drafts get accepted), so the engine measures both as it runs:

    autoregressive cost   seconds per one-token step (no streams), a running average
    speculative speed     tokens committed per second by speculative steps, totalled
                          over a window of `window` steps

and decodes autoregressively while a window's speculative tokens/s fall below
autoregressive tokens/s. Whole windows are judged, not single steps: acceptance varies
a lot from step to step (1 token, then 4), and a per-step average flips on one bad step. Each fall back lasts `backoff` steps, doubled after each consecutive loss (up
to `max_backoff`), then a window of `window` speculative steps probes again. The
autoregressive cost is measured with `calibration` steps when the engine starts and one
step every `refresh` speculative steps, because both costs grow with the cache.

Exactness does not depend on any of this: an autoregressive step commits exactly the
token a tree step would have committed first (see `tree.accept`).

The policy lives as long as its engine (the device does not change between
generations); each decision is returned to the engine, which lists it in the
generation's statistics (`GenerationStats.decisions`).
"""

from __future__ import annotations

from typing import Any, Optional

SPECULATIVE, AUTOREGRESSIVE = "speculative", "autoregressive"


class Fallback:
    """Per-step choice between a speculative and an autoregressive step, from measured costs.

    The engine asks `speculate()` before each decode step and reports the step with
    `record(...)` after it.
    """

    def __init__(self, window: int = 16, backoff: int = 32, max_backoff: int = 512, refresh: int = 64,
                 calibration: int = 2, smoothing: float = 0.3):
        if min(window, backoff, refresh, calibration) < 1 or max_backoff < backoff or not 0 < smoothing <= 1:
            raise ValueError("Fallback needs window, backoff, refresh, calibration >= 1, max_backoff >= backoff "
                             "and 0 < smoothing <= 1.")
        self.window, self.base_backoff, self.max_backoff = window, backoff, max_backoff
        self.refresh, self.smoothing = refresh, smoothing
        self.mode = SPECULATIVE
        self.ar_seconds: Optional[float] = None  # running average, seconds per one-token step
        self.spec_seconds: Optional[float] = None  # the last judged window: seconds and tokens
        self.spec_tokens: Optional[float] = None  # of its speculative steps, totalled
        self._window_seconds = self._window_tokens = 0.0  # the current window so far
        self.backoff = backoff
        self._measure = calibration  # one-token steps still to take to measure the AR cost
        self._window_steps = 0  # speculative steps in the current window
        self._since_measure = 0  # speculative steps since the AR cost was last measured
        self._hold = 0  # autoregressive steps left before the next probe
        self._judged = False  # the current window has already produced its decision

    # ---------------------------------------------------------------- figures
    @property
    def ar_tokens_per_second(self) -> Optional[float]:
        return 1.0 / self.ar_seconds if self.ar_seconds else None

    @property
    def spec_tokens_per_second(self) -> Optional[float]:
        return self.spec_tokens / self.spec_seconds if self.spec_seconds else None

    def summary(self) -> dict[str, Any]:
        """The current mode and estimates (for statistics, a health endpoint, logs)."""
        return dict(mode=self.mode, speculative_tokens_per_second=self.spec_tokens_per_second,
                    autoregressive_tokens_per_second=self.ar_tokens_per_second, backoff_steps=self.backoff)

    # ---------------------------------------------------------------- the policy
    def speculate(self) -> bool:
        """Whether the next step should speculate (a tree with streams) or take one token."""
        return self.mode == SPECULATIVE and self._measure == 0

    def record(self, speculative: bool, seconds: float, tokens: int) -> Optional[dict[str, Any]]:
        """Account one decode step: whether it speculated, its wall time and the tokens it
        produced (accepted drafts + correction). Returns a decision when the mode changes
        or a probe window confirms speculation, else None."""
        if speculative:
            return self._record_speculative(seconds, tokens)
        self.ar_seconds = self._average(self.ar_seconds, seconds)
        self._measure = max(self._measure - 1, 0)
        if self.mode == AUTOREGRESSIVE:
            self._hold -= 1
            if self._hold <= 0:
                self._start_window()
                return self._decision(SPECULATIVE, "probe: measuring speculation again")
        return None

    def _record_speculative(self, seconds: float, tokens: int) -> Optional[dict[str, Any]]:
        self._window_seconds += seconds
        self._window_tokens += tokens
        self._window_steps += 1
        self._since_measure += 1
        if self._since_measure >= self.refresh:  # the AR cost grows with the cache: measure it again
            self._since_measure, self._measure = 0, 1
        if self._window_steps < self.window or self.ar_seconds is None:
            return None
        self.spec_seconds, self.spec_tokens = self._window_seconds, self._window_tokens
        self._window_steps, self._window_seconds, self._window_tokens = 0, 0.0, 0.0  # the next window
        spec, ar = self.spec_tokens_per_second, self.ar_tokens_per_second
        if spec < ar:
            self.mode, self._hold = AUTOREGRESSIVE, self.backoff
            decision = self._decision(AUTOREGRESSIVE, f"speculation loses: autoregressive for {self.backoff} steps")
            self.backoff = min(2 * self.backoff, self.max_backoff)
            return decision
        if not self._judged:
            self._judged, self.backoff = True, self.base_backoff
            return self._decision(SPECULATIVE, "speculation pays")
        return None

    def _start_window(self) -> None:
        self.mode = SPECULATIVE
        self.spec_seconds = self.spec_tokens = None  # judge the probe on its own steps only
        self._window_steps, self._window_seconds, self._window_tokens = 0, 0.0, 0.0
        self._judged = False

    def _average(self, current: Optional[float], value: float) -> float:
        return value if current is None else (1 - self.smoothing) * current + self.smoothing * value

    def _decision(self, mode: str, reason: str) -> dict[str, Any]:
        return dict(mode=mode, reason=reason, speculative_tokens_per_second=self.spec_tokens_per_second,
                    autoregressive_tokens_per_second=self.ar_tokens_per_second)
