"""`streamspec tune`: pick the tree for the device the folder runs on.

Speculation pays when the tokens a step commits grow faster than the step's cost. Both
are measured here, on this device and this folder:

    acceptance   greedy generations on a prompt set at every candidate setting (tree
                 budget, prompt lookup on/off, pruning threshold when the folder was
                 exported with --pruning): tokens committed per forward pass and draft
                 nodes per step (before and after pruning); outputs are checked against
                 autoregressive decoding
    latency      the step-latency curve (median ms of one step vs tree nodes) at a
                 typical cache length (`profiler.measure.latency_curve`); for a pruned
                 setting, the median ms of a pruned step over its mean drafted nodes
                 (lower layers, every draft scored by the exit head) and its mean kept
                 nodes (upper layers); for a prompt-lookup setting, the median ms of a
                 step over its mean nodes of which only the stream-drafted ones have
                 stream rows (the engine gives lookup nodes none)

    expected tokens/s (setting) = tokens per pass / latency(mean nodes per step)

The best setting, when it beats the autoregressive step, is written into the folder's
streamspec.json (`tree`), which the engine uses by default; a setting that never beats
it writes budget 0: the engine then decodes autoregressively. Nothing here imports torch.
"""

from __future__ import annotations

import datetime
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from streamspec.errors import StreamspecError
from streamspec.tools.harness import Measurement, engine_arm, measure, time_steps

DEFAULT_BUDGETS = (1, 2, 4, 6, 8, 12, 16, 24, 32)
DEFAULT_PRUNE = (0.05, 0.1, 0.2)  # thresholds tried on a folder exported with --pruning
AUTOREGRESSIVE = "autoregressive"  # the reference arm every setting's output is checked against


@dataclass
class TuneSettings:
    folder: Path
    budgets: Sequence[int] = DEFAULT_BUDGETS
    lookup: Sequence[int] = (0,)  # prompt-lookup draft lengths to try (0: off)
    prune: Sequence[float] = ()  # pruning thresholds to try beside no pruning (a --pruning folder)
    max_new_tokens: int = 96
    threads: Optional[int] = None
    provider: str = "auto"
    repeats: int = 5  # timed steps per point of the latency curve
    notes: list[str] = field(default_factory=list)


@dataclass
class Candidate:
    budget: int
    lookup: int
    prune: float = 0.0
    tokens_per_pass: float = 0.0
    domain_tokens_per_pass: dict = field(default_factory=dict)  # the same, per prompt domain
    nodes_per_step: float = 0.0  # drafted (before pruning)
    streamed_per_step: float = 0.0  # nodes with stream rows (prompt-lookup nodes have none)
    kept_per_step: float = 0.0  # after pruning: what the upper layers see
    measured_tokens_per_second: float = 0.0  # end-to-end decode, for reference (noisier)
    identical: bool = True
    expected_tokens_per_second: float = 0.0

    @property
    def name(self) -> str:
        return f"budget {self.budget}, lookup {self.lookup}, pruning {self.prune or 'off'}"

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def interpolate(curve: list[dict[str, Any]], nodes: float) -> float:
    """Milliseconds of a drafting step over `nodes` nodes, linear between measured points."""
    points = sorted((p["nodes"], p["median_ms"]) for p in curve if p["drafting"])
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if nodes > xs[-1]:  # extrapolate with the last segment's slope
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0
        return ys[-1] + slope * (nodes - xs[-1])
    return float(np.interp(nodes, xs, ys))


def run_tune(settings: TuneSettings, prompts: list[list[int]],
             progress: Optional[Callable[[str], None]] = None,
             domains: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Measure every candidate setting and the latency curve; returns the report.
    domains: each prompt's domain, for tokens per pass per domain (None: one group)."""
    domains = list(domains) if domains else [""] * len(prompts)
    from streamspec.runtime import Engine
    from streamspec.tools.profiler.measure import latency_curve, system_info

    say = progress or (lambda message: None)
    # No fallback: every setting must be measured as it is, paying or not. No pruning on the
    # whole-graph engine: its settings and the latency curve are the unpruned step.
    engine = Engine(settings.folder, provider=settings.provider, threads=settings.threads, fallback=False, prune=0)
    if not engine.can_speculate:
        raise StreamspecError(f"{settings.folder} holds a plain model without streams; there is nothing to tune.")
    pruning = None  # the split graphs, for the pruned settings
    if settings.prune:
        pruning = Engine(settings.folder, provider=settings.provider, threads=settings.threads, fallback=False,
                         prune=max(settings.prune))
    candidates = [Candidate(budget, lookup, prune) for prune in (0.0, *settings.prune)
                  for lookup in settings.lookup for budget in settings.budgets]
    arms = [engine_arm(AUTOREGRESSIVE, engine, settings.max_new_tokens, speculative=False)]
    arms += [engine_arm(c.name, pruning if c.prune else engine, settings.max_new_tokens, budget=c.budget,
                        lookup=c.lookup, prune=c.prune) for c in candidates]
    # Acceptance is what is measured here (one run per prompt: greedy tokens do not vary);
    # the loop's alternation still spreads machine load over the settings alike.
    measured = measure(arms, prompts, repeats=1, show=lambda turn: say(
        f"prompt {turn.prompt + 1}/{turn.prompts}: {turn.arm}"))
    for c in candidates:
        _acceptance(c, measured, domains)
    ar_speed = [run.stats.decode_tokens_per_second for run in measured.firsts(AUTOREGRESSIVE)]
    # The curve at the mean cache length of a decode step: prompt + half the answer.
    past = int(statistics.mean(len(p) for p in prompts) + settings.max_new_tokens / 2)
    biggest = int(np.ceil(max(c.nodes_per_step for c in candidates)))
    say("step-latency curve")
    curve = latency_curve(engine, past, sizes=sorted({1, 2, 4, 8, 16, 32, 64, biggest}), repeats=settings.repeats)
    ar_ms = next(p["median_ms"] for p in curve if not p["drafting"])
    pruned_ms, lookup_ms = {}, {}
    if pruning is not None:
        say("pruned-step latencies")
        pruned_ms = shaped_latencies(pruning, past, {(round(c.nodes_per_step), round(c.kept_per_step))
                                                     for c in candidates if c.prune}, settings.repeats, "kept")
    # A lookup setting's nodes are cheaper than the curve's (no stream rows for lookup nodes).
    lookup_shapes = {(round(c.nodes_per_step), round(c.streamed_per_step)) for c in candidates
                     if c.lookup and not c.prune and round(c.streamed_per_step) < round(c.nodes_per_step)}
    if lookup_shapes:
        say("prompt-lookup step latencies")
        lookup_ms = shaped_latencies(engine, past, lookup_shapes, settings.repeats, "streamed")
    for c in candidates:
        lookup_shape = (round(c.nodes_per_step), round(c.streamed_per_step))
        ms = (pruned_ms[(round(c.nodes_per_step), round(c.kept_per_step))] if c.prune
              else lookup_ms[lookup_shape] if lookup_shape in lookup_ms and c.lookup
              else interpolate(curve, c.nodes_per_step))
        c.expected_tokens_per_second = 1000.0 * c.tokens_per_pass / ms
    ar_expected = 1000.0 / ar_ms
    exact = [c for c in candidates if c.identical]
    best = max(exact, key=lambda c: c.expected_tokens_per_second, default=None)
    pays = best is not None and best.expected_tokens_per_second > ar_expected
    return dict(
        folder=str(settings.folder), date=datetime.date.today().isoformat(), system=system_info(engine.session.device),
        threads=settings.threads, prompts=len(prompts), max_new_tokens=settings.max_new_tokens, past=past,
        domains={d: domains.count(d) for d in dict.fromkeys(domains)} if len(set(domains)) > 1 else None,
        autoregressive=dict(step_ms=ar_ms, expected_tokens_per_second=ar_expected,
                            measured_tokens_per_second=statistics.mean(ar_speed)),
        candidates=[c.as_dict() for c in candidates], latency_curve=curve,
        pruned_latency=[dict(drafted=n, kept=k, median_ms=ms) for (n, k), ms in sorted(pruned_ms.items())],
        lookup_latency=[dict(nodes=n, streamed=k, median_ms=ms) for (n, k), ms in sorted(lookup_ms.items())],
        choice=dict(budget=best.budget if pays else 0, lookup=best.lookup if pays else 0,
                    prune=best.prune if pays else 0.0,
                    expected_speedup=(best.expected_tokens_per_second / ar_expected) if best else None,
                    reason=("the best exact setting beats the autoregressive step" if pays else
                            "no setting beats the autoregressive step on this device: decode autoregressively")),
        notes=settings.notes)


def shaped_latencies(engine, past: int, pairs: set[tuple[int, int]], repeats: int,
                     kind: str) -> dict[tuple[int, int], float]:
    """Median ms of one step for each (nodes, k) pair, on a balanced binary tree of `nodes`
    nodes (as `latency_curve` uses; its first k nodes are a subtree). kind "kept": a pruned
    step whose first k nodes reach the upper layers; "streamed": a step where only the
    first k nodes have stream rows, the rest being prompt-lookup nodes."""
    from streamspec.runtime.tree import LOOKUP, STREAM, Tree
    from streamspec.tools.profiler.measure import balanced_tree

    out = {}
    for nodes, k in sorted(pairs):
        tree = balanced_tree(nodes, engine.config.vocab_size)
        if kind == "kept":
            step = lambda: engine.forward(tree, past, kept=k)  # noqa: E731
        else:
            sources = np.where(np.arange(nodes) < k, STREAM, LOOKUP).astype(np.int8)
            looked = Tree(tree.tokens, tree.parents, tree.depths, tree.path_probs, sources)
            step = lambda: engine.forward(looked, past)  # noqa: E731
        times = time_steps({"step": step}, repeats)["step"]
        out[(nodes, k)] = 1000 * statistics.median(times)
    return out


def _acceptance(c: Candidate, measured: Measurement, domains: Sequence[str]) -> None:
    """The candidate's figures from its runs: tokens committed per decode step (the
    prefill commits the first token), overall and per domain, draft nodes per step
    before and after pruning, and whether every output equals the autoregressive one."""
    runs = measured.firsts(c.name)
    c.identical = all(measured.same_as(c.name, AUTOREGRESSIVE))
    per_domain: dict[str, list[int]] = {}  # domain -> [tokens, steps]
    for run, domain in zip(runs, domains):
        counts = per_domain.setdefault(domain, [0, 0])
        counts[0] += run.stats.new_tokens - 1
        counts[1] += run.stats.steps
    steps = max(sum(run.stats.steps for run in runs), 1)
    c.tokens_per_pass = sum(t for t, _ in per_domain.values()) / steps
    if len(per_domain) > 1:
        c.domain_tokens_per_pass = {d: t / max(n, 1) for d, (t, n) in per_domain.items()}
    c.nodes_per_step = sum(sum(run.stats.drafted_sizes) for run in runs) / steps
    c.streamed_per_step = sum(sum(run.stats.streamed_sizes) for run in runs) / steps
    c.kept_per_step = sum(sum(run.stats.tree_sizes) for run in runs) / steps
    c.measured_tokens_per_second = statistics.mean(run.stats.decode_tokens_per_second for run in runs)


def write_choice(folder: Path, report: dict[str, Any]) -> None:
    """Store the choice in streamspec.json's `tree` (what `Engine` uses by default)."""
    from streamspec.runtime.folder import read_folder
    from streamspec.runtime.tree_settings import TreeSettings

    config = read_folder(folder)  # validated: a hand-edited file is refused, not rewritten
    choice = report["choice"]
    tuned = dict(date=report["date"], device=report["system"]["device_name"], threads=report["threads"],
                 expected_speedup=choice["expected_speedup"], reason=choice["reason"])
    settings = TreeSettings(choice["budget"], choice["lookup"], choice.get("prune", 0.0))
    settings.write(config.path, config.raw, tuned)  # atomic: a failed write leaves the old file
