"""The report's figures, computed from per-generation records: plain functions of plain
data, so that a saved report can be checked and re-rendered anywhere.

A generation record (`generation_record`) keeps the engine's totals and, per decode
step, the accepted drafts, committed tokens, tree size and depth, cache rows and the
time of each phase. Phases of a step (seconds, from `Engine.on_step`):
  tree        building the tree and the step's feeds on the host
  copy_in     binding the inputs
  run         the ONNX Runtime run itself (on CUDA with the host <-> device transfers of
              inputs and outputs, which ORT makes inside the run)
  copy_out    the outputs to numpy
  accept      the acceptance walk on the host
  compaction  moving accepted KV rows on the host (graph compaction is inside `run`)
  other       the rest of the step: draft bookkeeping, text decoding, Python
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

STEP_PHASES = ("tree", "copy_in", "run", "copy_out", "accept", "compaction", "other")
PHASES = ("prefill",) + STEP_PHASES
MODES = ("speculative", "autoregressive")


def generation_record(prompt: int, stats, steps: Sequence, token_ids: Sequence[int]) -> dict[str, Any]:
    """One generation: the engine's `GenerationStats`, its `StepRecord`s, its tokens."""
    seconds = {phase: [float(s.seconds[phase]) for s in steps] for phase in STEP_PHASES if phase != "other"}
    # A step lasts until the next one starts; the last one until decoding ended.
    ends = [s.started for s in steps[1:]] + ([steps[0].started + stats.decode_seconds] if steps else [])
    walls = [end - s.started for s, end in zip(steps, ends)]
    seconds["other"] = [max(wall - sum(seconds[p][i] for p in seconds), 0.0) for i, wall in enumerate(walls)]
    record = dict(stats.as_dict(), prompt=prompt, mode="speculative" if stats.speculative else "autoregressive",
                  total_seconds=stats.total_seconds, output_tokens=[int(t) for t in token_ids])
    record["per_step"] = dict(
        accepted=[s.accepted for s in steps], committed=[s.committed for s in steps],
        tree_nodes=[s.drafted_nodes for s in steps], tree_nodes_after_pruning=[s.tree_nodes for s in steps],
        lookup_nodes=[s.lookup_nodes for s in steps], lookup_accepted=[s.lookup_accepted for s in steps],
        tree_depth=[s.tree_depth for s in steps], cache_rows=[s.cache_rows for s in steps], seconds=seconds)
    return record


def of_mode(generations: Iterable[dict], mode: str) -> list[dict]:
    return [g for g in generations if g["mode"] == mode]


def summary(generations: list[dict]) -> dict[str, Optional[dict]]:
    """Per mode: tokens, steps and speeds over all its generations (decode excludes the
    prefill and the token it gives)."""
    out: dict[str, Optional[dict]] = {}
    for mode in MODES:
        gens = of_mode(generations, mode)
        if not gens:
            out[mode] = None
            continue
        tokens, steps = _sum(gens, "new_tokens"), _sum(gens, "steps")
        total, decode = _sum(gens, "total_seconds"), _sum(gens, "decode_seconds")
        prefill = _sum(gens, "prefill_seconds")
        accepted = sum(sum(g["per_step"]["accepted"]) for g in gens)
        out[mode] = dict(generations=len(gens), prompt_tokens=_sum(gens, "prompt_tokens"), new_tokens=tokens,
                         steps=steps, forward_passes=steps + len(gens), total_seconds=total,
                         prefill_seconds=prefill, decode_seconds=decode,
                         tokens_per_second=_ratio(tokens, total),
                         decode_tokens_per_second=_ratio(tokens - len(gens), decode),
                         mean_accepted_length=1 + _ratio(accepted, steps, 0.0),
                         mean_tree_nodes=_ratio(sum(sum(g["per_step"]["tree_nodes"]) for g in gens), steps))
    return out


def time_split(generations: list[dict]) -> dict[str, Optional[dict]]:
    """Per mode: seconds, share of the total and milliseconds per step of every phase."""
    out: dict[str, Optional[dict]] = {}
    for mode in MODES:
        gens = of_mode(generations, mode)
        if not gens:
            out[mode] = None
            continue
        steps, total = _sum(gens, "steps"), _sum(gens, "total_seconds")
        seconds = {"prefill": _sum(gens, "prefill_seconds")}
        for phase in STEP_PHASES:
            seconds[phase] = sum(sum(g["per_step"]["seconds"][phase]) for g in gens)
        phases = {phase: dict(seconds=s, share=_ratio(s, total),
                              ms_per_step=_ratio(1000 * s, len(gens) if phase == "prefill" else steps))
                  for phase, s in seconds.items()}
        out[mode] = dict(total_seconds=total, accounted_seconds=sum(seconds.values()), steps=steps,
                         prefills=len(gens), phases=phases)
    return out


def acceptance(generations: list[dict], num_streams: int) -> Optional[dict]:
    """How the speculative steps went; None without speculative generations."""
    gens = of_mode(generations, "speculative")
    if not gens:
        return None
    accepted = [a for g in gens for a in g["per_step"]["accepted"]]
    if not accepted:  # speculative generations without a tree step (budget 0)
        return None
    depths = [d for g in gens for d in g["per_step"]["tree_depth"]]
    committed = [c for g in gens for c in g["per_step"]["committed"]]
    nodes = [n for g in gens for n in g["per_step"]["tree_nodes"]]
    # Reports written before pruning existed have no after-pruning sizes: nothing was pruned.
    kept = [n for g in gens for n in (g["per_step"].get("tree_nodes_after_pruning") or g["per_step"]["tree_nodes"])]
    looked_up = sum(n for g in gens for n in g["per_step"].get("lookup_accepted") or [])
    steps = len(accepted)
    top = max([num_streams, *accepted]) if accepted else num_streams
    histogram = [dict(accepted=k, steps=accepted.count(k), share=_ratio(accepted.count(k), steps))
                 for k in range(top + 1)]
    by_depth = []
    for depth in range(1, top + 1):
        # Stream `depth` had a chance when the tree reached that depth and the walk got to
        # its parent level; it paid off when the walk went one deeper.
        attempts = sum(1 for a, d in zip(accepted, depths) if d >= depth and a >= depth - 1)
        hits = sum(1 for a in accepted if a >= depth)
        by_depth.append(dict(depth=depth, attempts=attempts, accepted=hits, rate=_ratio(hits, attempts),
                             reached=_ratio(hits, steps)))
    return dict(
        steps=steps, histogram=histogram, by_depth=by_depth,
        zero_share=_ratio(accepted.count(0), steps), mean_accepted_length=1 + _ratio(sum(accepted), steps, 0.0),
        new_tokens=_sum(gens, "new_tokens"), prefill_tokens=len(gens), accepted_drafts=sum(accepted),
        corrections=steps, trimmed=sum(accepted) + steps - sum(committed),
        mean_tree_nodes=_ratio(sum(nodes), steps), max_tree_nodes=max(nodes, default=0),
        mean_tree_nodes_after_pruning=_ratio(sum(kept), steps),
        pruning=("off" if kept == nodes else f"{_ratio(sum(kept), steps):.1f} of {_ratio(sum(nodes), steps):.1f} "
                 "nodes per step reach the upper layers"),
        lookup_share=_ratio(looked_up, sum(accepted), 0.0))


def roofline(weight_bytes: int, bandwidth: dict, summaries: dict, curve: Optional[dict]) -> dict[str, Any]:
    """Weight bytes read per second (weights x forward passes / decode time) against the
    measured copy bandwidth. One forward pass reads every weight once, so autoregressive
    decoding cannot beat `ceiling_tokens_per_second`; speculation commits several tokens
    per pass and can."""
    bytes_per_second = bandwidth.get("bytes_per_second")
    ceiling = _ratio(bytes_per_second, weight_bytes) if bytes_per_second else None
    modes: dict[str, Optional[dict]] = {}
    for mode in MODES:
        s = summaries.get(mode)
        if s and s["steps"]:
            passes, tokens, source = s["steps"] / s["decode_seconds"], s["decode_tokens_per_second"], "generation"
        elif mode == "autoregressive" and curve and curve.get("autoregressive_ms"):
            passes = tokens = 1000 / curve["autoregressive_ms"]
            source = "step-latency curve (one node, no streams)"
        else:
            modes[mode] = None
            continue
        achieved = weight_bytes * passes
        modes[mode] = dict(source=source, forward_passes_per_second=passes, tokens_per_second=tokens,
                           weight_bytes_per_second=achieved,
                           fraction_of_bandwidth=_ratio(achieved, bytes_per_second) if bytes_per_second else None,
                           tokens_over_ceiling=_ratio(tokens, ceiling) if ceiling else None)
    return dict(weight_bytes=weight_bytes, bandwidth=bandwidth, ceiling_tokens_per_second=ceiling, modes=modes)


def compare(generations: list[dict]) -> Optional[dict]:
    """Speculative against autoregressive on the same prompts; None unless both ran."""
    spec, ar = of_mode(generations, "speculative"), of_mode(generations, "autoregressive")
    if not spec or not ar:
        return None
    per_prompt = []
    for s in spec:
        a = next((g for g in ar if g["prompt"] == s["prompt"]), None)
        if a is not None:
            per_prompt.append(dict(prompt=s["prompt"], speculative_tokens_per_second=s["tokens_per_second"],
                                   autoregressive_tokens_per_second=a["tokens_per_second"],
                                   speedup=_ratio(s["tokens_per_second"], a["tokens_per_second"]),
                                   same_tokens=s["output_tokens"] == a["output_tokens"]))
    both = summary([g for g in generations if g["prompt"] in {p["prompt"] for p in per_prompt}])
    sp, ap = both["speculative"], both["autoregressive"]
    return dict(speculative_tokens_per_second=sp["tokens_per_second"],
                autoregressive_tokens_per_second=ap["tokens_per_second"],
                speedup=_ratio(sp["tokens_per_second"], ap["tokens_per_second"]),
                decode_speedup=_ratio(sp["decode_tokens_per_second"], ap["decode_tokens_per_second"]),
                forward_pass_ratio=_ratio(sp["forward_passes"], ap["forward_passes"]),
                all_same_tokens=all(p["same_tokens"] for p in per_prompt), per_prompt=per_prompt)


def _sum(gens: Iterable[dict], key: str) -> Any:
    return sum(g[key] for g in gens)


def _ratio(a: Optional[float], b: Optional[float], default: Optional[float] = None) -> Optional[float]:
    """a / b as a float, `default` where b is 0 or either is missing or not finite."""
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return default
    return float(a) / float(b)
