"""ONNX Runtime's own profiler trace (`SessionOptions.enable_profiling`) -> the most
expensive operators per decode step.

The trace is a Chrome-tracing JSON list of events. Those used here:
  cat "Session", name "model_run"           one per `run`, ts and dur in microseconds
  cat "Node", name "<node>_kernel_time"     one per node per run; args.op_name and
                                            args.provider say what ran where
(Nodes also get "_fence_before" / "_fence_after" events, which are not kernel time.)
Nodes are assigned to the run whose window holds their start, so that the prefill
(the first run of a generation) can be left out: a decode step is what repeats.
On CUDA a node's time is what the host saw (launch, or launch and wait), not the
kernel's time on the device.
"""

from __future__ import annotations

import bisect
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Union


def operator_table(trace: Union[str, Path], prefill_runs: set[int], top: int = 12) -> dict[str, Any]:
    """Per decode step: run and kernel milliseconds, and the `top` operator types by time.

    prefill_runs: indices (in run order) of the runs to leave out.
    """
    with open(trace, encoding="utf-8") as file:
        events = json.load(file)
    if isinstance(events, dict):  # the object form of the Chrome format
        events = events.get("traceEvents", [])
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    starts = [start for start, _ in runs]
    kept = [i for i in range(len(runs)) if i not in prefill_runs]
    if not kept:
        return dict(available=False, reason="the trace holds no decode step")
    keep = set(kept)
    time_us: dict[tuple[str, str], float] = defaultdict(float)
    calls: dict[tuple[str, str], int] = defaultdict(int)
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        run = bisect.bisect_right(starts, event["ts"]) - 1
        if run not in keep or event["ts"] > runs[run][1]:
            continue
        args = event.get("args", {})
        key = (str(args.get("op_name", "?")), str(args.get("provider", "?")).replace("ExecutionProvider", ""))
        time_us[key] += float(event.get("dur", 0))
        calls[key] += 1
    steps = len(kept)
    kernel_us = sum(time_us.values())
    ranked = sorted(time_us, key=time_us.get, reverse=True)
    operators = [dict(op=op, provider=provider, calls_per_step=calls[op, provider] / steps,
                      ms_per_step=time_us[op, provider] / steps / 1000,
                      share=time_us[op, provider] / kernel_us if kernel_us else 0.0)
                 for op, provider in ranked[:top]]
    rest = sum(time_us[key] for key in ranked[top:])
    return dict(available=True, steps=steps,
                run_ms_per_step=sum(runs[i][1] - runs[i][0] for i in kept) / steps / 1000,
                kernel_ms_per_step=kernel_us / steps / 1000, operators=operators,
                other_ms_per_step=rest / steps / 1000, other_operator_types=max(len(ranked) - top, 0))
