"""A profile report: saving, loading and rendering it with rich.

Rendering reads only the report's JSON data, so `streamspec report` shows a report
taken on another machine (a Jetson board) exactly as `streamspec profile` did there.
Sections missing from a report (an older or partial one) are skipped, not errors.

The JSON (format "streamspec-profile", version 1); times in seconds unless named _ms:
  system         platform, cpu, cpu_count, onnxruntime, available_providers, device, device_name
  model          name, folder, family, num_layers, dtype, backend, num_streams, num_msa_layers,
                 candidates, max_length, budget, compaction, weight_bytes
  settings       prompts, max_new_tokens, compare_ar, ignore_eos, provider, threads, curve_repeats
  summary        per mode (speculative | autoregressive, null when not run): new_tokens, steps,
                 forward_passes, total/prefill/decode seconds, tokens_per_second,
                 decode_tokens_per_second, mean_accepted_length, mean_tree_nodes
  time_split     per mode: total_seconds, accounted_seconds, steps, prefills, phases
                 {prefill, tree, copy_in, run, copy_out, accept, compaction, other:
                 {seconds, share, ms_per_step}} (figures.py defines the phases)
  ort_profile    available (+ reason), steps, run_ms_per_step, kernel_ms_per_step,
                 operators [{op, provider, calls_per_step, ms_per_step, share}], other_*
  acceptance     null without speculation; steps, histogram [{accepted, steps, share}],
                 by_depth [{depth, attempts, accepted, rate, reached}], zero_share,
                 mean_accepted_length, new_tokens = prefill_tokens + accepted_drafts +
                 corrections - trimmed, tree sizes (after pruning: null until pruning exists)
  latency_curve  past_length, speculative, budget_nodes, rows_per_node, autoregressive_ms,
                 points [{nodes, rows, drafting, median_ms, min_ms, repeats}]
  roofline       weight_bytes, bandwidth {bytes_per_second | null, method, buffer_bytes},
                 ceiling_tokens_per_second, modes {mode: {source, forward_passes_per_second,
                 tokens_per_second, weight_bytes_per_second, fraction_of_bandwidth,
                 tokens_over_ceiling}}
  compare_ar     null unless both modes ran; speedup, decode_speedup, forward_pass_ratio,
                 all_same_tokens, per_prompt [...]
  memory         host_rss_bytes, host_peak_rss_bytes, device_used_bytes, device_method,
                 kv_cache_bytes, peak_cache_rows, max_length, peak_cache_fill
  generations    one per generation: the engine's statistics, mode, prompt, output_tokens,
                 per_step {accepted, committed, tree_nodes, tree_nodes_after_pruning,
                 tree_depth, cache_rows, seconds {phase: [...]}}
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from streamspec.errors import StreamspecError, read_json_file
from streamspec.files import write_json

from .charts import bar

FORMAT = "streamspec-profile"
VERSION = 1
SECTIONS = ("system", "model", "settings", "summary", "time_split", "ort_profile", "acceptance", "latency_curve",
            "roofline", "compare_ar", "memory", "generations")
WIDE = 72  # columns from which tables carry bars

PHASE_LABELS = {
    "prefill": "prefill (per prompt)",
    "tree": "tree building + feeds (host)",
    "copy_in": "copies in (binding inputs)",
    "run": "ORT run (the graph)",
    "copy_out": "copies out (outputs to numpy)",
    "accept": "acceptance walk (host)",
    "compaction": "KV compaction (host)",
    "other": "other host work (text, Python)",
}


# ------------------------------------------------------------------ files
def save(report: dict[str, Any], path: Union[str, Path]) -> Path:
    """Write the report atomically (a failed write leaves the file it replaces intact)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, _plain(report), indent=1)
    except OSError as error:
        raise StreamspecError(f"The report cannot be written to {path} ({error.strerror or error}).") from None
    return path


def load(path: Union[str, Path]) -> dict[str, Any]:
    """Read a saved report; one clear sentence when it is not one."""
    return read_json_file(
        path, missing=f"{path} does not exist.", corrupt=f"{path} is not a JSON file (corrupt or truncated).",
        fmt=FORMAT, wrong_format=f"{path} is not a report written by `streamspec profile --json`.",
        version_key="version", version=VERSION,
        wrong_version=f"{path} is a version {{found}} report; this streamspec reads version {VERSION}.")


def _plain(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python numbers, non-finite floats to null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------ formatting
def format_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _num(value: Optional[float], spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0%}"


def _gbps(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / 1e9:.1f} GB/s"


def _table(title: str, *columns: str, right_from: int = 1, bar_cells: int = 0) -> Table:
    """A borderless table: text columns wrap, number columns never break a number, and
    a last column for bars when `bar_cells` > 0."""
    table = Table(title=title, title_justify="left", title_style="bold", box=None, pad_edge=False,
                  header_style="dim")
    for i, name in enumerate(columns):
        numeric = i >= right_from
        table.add_column(name, justify="right" if numeric else "left", no_wrap=numeric,
                         overflow="ellipsis" if numeric else "fold")
    if bar_cells:
        table.add_column("", no_wrap=True, width=bar_cells)
    return table


def _by_mode(title: str, modes: dict[str, Optional[dict]], rows: list[tuple[str, Any]]) -> Optional[Table]:
    """A table with one column per mode and one row per figure: narrow enough for any
    terminal. rows: (label, figures of a mode -> cell)."""
    present = [(mode, figures) for mode, figures in modes.items() if figures]
    if not present:
        return None
    table = _table(title, "", *(mode for mode, _ in present))
    for label, cell in rows:
        table.add_row(label, *(cell(figures) for _, figures in present))
    return table


def _bar_row(table: Table, bar_cells: int, fraction: Optional[float], style: str, *cells: Any) -> None:
    """Add a row, with a bar of `fraction` when the table has a bar column."""
    table.add_row(*cells, *([Text(bar(fraction, bar_cells), style=style)] if bar_cells else []))


# ------------------------------------------------------------------ rendering
def render(report: dict[str, Any], width: int = 100) -> RenderableType:
    """The whole report for a console `width` columns wide: a verdict first, then one
    block per section (bars only where they fit)."""
    cells = 0 if width < WIDE else min(20, width - WIDE + 8)
    parts = [_header(report), _verdict(report), _summary(report), _time_split(report, cells),
             _operators(report, cells), _acceptance(report, cells), _latency_curve(report, cells),
             _roofline(report, cells), _compare(report), _memory(report)]
    blocks: list[RenderableType] = []
    for part in parts:
        if part is not None:
            blocks += [part, Text("")]
    return Group(*blocks[:-1])


def _header(report: dict) -> RenderableType:
    model, system, settings = report.get("model", {}), report.get("system", {}), report.get("settings", {})
    model, system = ({k: escape(v) if isinstance(v, str) else v for k, v in d.items()} for d in (model, system))
    streams = (f"{model.get('num_streams')} streams in {model.get('num_msa_layers')} MSA layers, "
               f"tree budget {model.get('budget')}" if model.get("num_streams") else "no streams (plain base model)")
    lines = [
        f"[bold]{model.get('name', '?')}[/]" + (f" (exported from {model['source']})" if model.get("source") else "")
        + f" · {model.get('family', '?')}, {model.get('num_layers', '?')} layers, "
        f"{model.get('dtype', '?')}, {model.get('backend', '?')} attention · {streams}",
        f"{system.get('device', '?')}: {system.get('device_name', '?')} · {system.get('cpu_count', '?')} CPUs "
        f"(ORT threads: {settings.get('threads') or 'default'}) · onnxruntime "
        f"{system.get('onnxruntime', '?')} · {system.get('platform', '')}",
        f"{settings.get('prompts', '?')} prompt(s) × up to {settings.get('max_new_tokens', '?')} new tokens, greedy"
        f"{', EOS ignored' if settings.get('ignore_eos') else ''} · {report.get('created', '')}",
    ]
    return Panel("\n".join(lines), title="streamspec profile", title_align="left", border_style="blue")


def _verdict(report: dict) -> Optional[RenderableType]:
    """The answer at a glance: does speculation pay off here, and how close to memory-bound."""
    lines = []
    compare, summary = report.get("compare_ar"), report.get("summary") or {}
    spec, ar = summary.get("speculative"), summary.get("autoregressive")
    if compare:
        pays = (compare.get("speedup") or 0) > 1
        lines.append(f"[{'green' if pays else 'red'}]Speculation {'pays off' if pays else 'does not pay off'} on "
                     f"this device: {_num(compare.get('speedup'), '.2f')}× tokens/s over autoregressive "
                     f"(decode {_num(compare.get('decode_speedup'), '.2f')}×), measured side by side.[/]")
        if not compare.get("all_same_tokens", True):
            lines.append("[yellow]Speculative and autoregressive outputs differ for some prompt (near-tie "
                         "logits, or a bug worth reporting).[/]")
    elif spec:
        estimate = _estimated_speedup(report)
        if estimate is not None:
            lines.append(f"Speculation commits {spec['mean_accepted_length']:.2f} tokens per step; against the "
                         f"measured one-token step that is an estimated {estimate:.2f}× (run with --compare-ar "
                         "to measure it).")
    elif ar:
        lines.append("This folder has no speculative streams: the profile shows autoregressive decoding; the "
                     "step-latency curve says how many tokens per step a tree of each size would need.")
    roof = (report.get("roofline") or {}).get("modes") or {}
    if roof.get("autoregressive") and roof["autoregressive"].get("fraction_of_bandwidth") is not None:
        lines.append(f"Autoregressive decoding reads weights at {_pct(roof['autoregressive']['fraction_of_bandwidth'])}"
                     " of the measured copy bandwidth"
                     + (f"; speculation reaches {roof['speculative']['tokens_over_ceiling']:.2f}× the memory-bound "
                        "token rate." if roof.get("speculative") and roof["speculative"].get("tokens_over_ceiling")
                        else "."))
    return Text.from_markup("\n".join(lines)) if lines else None


def _estimated_speedup(report: dict) -> Optional[float]:
    spec = (report.get("summary") or {}).get("speculative")
    ar = ((report.get("roofline") or {}).get("modes") or {}).get("autoregressive")
    if not spec or not ar or not spec.get("decode_tokens_per_second") or not ar.get("tokens_per_second"):
        return None
    return spec["decode_tokens_per_second"] / ar["tokens_per_second"]


def _summary(report: dict) -> Optional[RenderableType]:
    return _by_mode("Generation", report.get("summary") or {}, [
        ("tokens", lambda s: str(s["new_tokens"])),
        ("steps (after the prefill)", lambda s: str(s["steps"])),
        ("tokens per step", lambda s: _num(s["mean_accepted_length"], ".2f")),
        ("tokens/s", lambda s: _num(s["tokens_per_second"])),
        ("decode tokens/s", lambda s: _num(s["decode_tokens_per_second"])),
        ("prefill ms per prompt", lambda s: _num(1000 * s["prefill_seconds"] / max(s["generations"], 1), ".0f")),
    ])


def _time_split(report: dict, cells: int) -> Optional[RenderableType]:
    split = report.get("time_split") or {}
    mode = "speculative" if split.get("speculative") else "autoregressive"
    data = split.get(mode)
    if not data:
        return None
    compaction = (report.get("model") or {}).get("compaction")
    table = _table(f"Time split, {mode} ({data['steps']} steps, {data['total_seconds']:.2f} s)",
                   "phase", "ms/step", "share", bar_cells=cells)
    for phase, figures in data["phases"].items():
        label = PHASE_LABELS.get(phase, phase)
        if phase == "compaction" and compaction == "graph":
            label = "KV compaction (in the graph: inside ORT run)"
        _bar_row(table, cells, figures["share"], "magenta", label, _num(figures["ms_per_step"], ".2f"),
                 _pct(figures["share"]))
    if (report.get("system") or {}).get("device") == "cuda":
        return Group(table, Text("On CUDA the step's inputs and outputs cross to and from the device inside the "
                                 "ORT run (Memcpy rows in the operator table).", style="dim"))
    return table


def _operators(report: dict, cells: int) -> Optional[RenderableType]:
    ort = report.get("ort_profile")
    if not ort:
        return None
    if not ort.get("available"):
        return Text(f"ONNX Runtime profiler: {ort.get('reason', 'not run')}.", style="dim")
    table = _table(f"Most expensive operators (ONNX Runtime profiler, {ort['steps']} decode steps: "
                   f"{ort['kernel_ms_per_step']:.2f} ms of kernels in {ort['run_ms_per_step']:.2f} ms per run)",
                   "operator", "EP", "calls", "ms/step", "share", right_from=2, bar_cells=cells)
    for op in ort["operators"]:
        _bar_row(table, cells, op["share"], "yellow", op["op"], op["provider"], _num(op["calls_per_step"], ".0f"),
                 _num(op["ms_per_step"], ".3f"), _pct(op["share"]))
    if ort.get("other_operator_types"):
        _bar_row(table, cells, None, "", f"{ort['other_operator_types']} other types", "", "",
                 _num(ort["other_ms_per_step"], ".3f"), "")
    note = Text("Profiling slows every run it records: read the shares, not the milliseconds.", style="dim")
    return Group(table, note)


def _acceptance(report: dict, cells: int) -> Optional[RenderableType]:
    acc = report.get("acceptance")
    if not acc:
        return None
    hist = _table(f"Accepted draft tokens per step ({acc['steps']} steps, {acc['mean_accepted_length']:.2f} "
                  f"tokens/step, {_pct(acc['zero_share'])} accepted nothing)", "accepted", "steps", "share",
                  bar_cells=cells)
    for row in acc["histogram"]:
        _bar_row(hist, cells, row["share"], "cyan", str(row["accepted"]), str(row["steps"]), _pct(row["share"]))
    depth = _table("Acceptance per stream depth", "depth", "tried", "accepted", "rate", "reached")
    for row in acc["by_depth"]:
        depth.add_row(str(row["depth"]), str(row["attempts"]), str(row["accepted"]), _pct(row["rate"]),
                      _pct(row["reached"]))
    trees = Text(f"Tree: {acc['mean_tree_nodes']:.1f} nodes per step on average (at most {acc['max_tree_nodes']}); "
                 f"pruning: {acc.get('pruning', '-')}; prompt lookup: {_pct(acc.get('lookup_share', 0.0))} of the "
                 "accepted drafts.", style="dim")
    return Group(hist, Text(""), depth, trees)


def _latency_curve(report: dict, cells: int) -> Optional[RenderableType]:
    curve = report.get("latency_curve")
    if not curve or not curve.get("points"):
        return None
    points = curve["points"]
    ar_ms, budget = curve.get("autoregressive_ms"), curve.get("budget_nodes")
    longest = max(p["median_ms"] for p in points)
    tokens_per_step = ((report.get("summary") or {}).get("speculative") or {}).get("mean_accepted_length")
    table = _table(f"Step latency on this device (after {curve['past_length']} cached rows; median of "
                   f"{points[0]['repeats']})", "tree nodes", "rows", "ms", "break-even", bar_cells=cells)
    for p in points:
        label = "1 (AR step)" if p["nodes"] == 1 and not p["drafting"] else str(p["nodes"])
        if p["nodes"] == budget and p["drafting"] == bool(curve.get("speculative")):
            label += " ◀ budget"
        _bar_row(table, cells, p["median_ms"] / longest, "blue", label, str(p["rows"]), _num(p["median_ms"], ".1f"),
                 _num(p["median_ms"] / ar_ms if ar_ms else None, ".2f"))
    note = ("break-even: tokens a step must commit to match one-token autoregressive steps (latency ÷ AR "
            "latency)")
    if budget and tokens_per_step:
        note += f"; at the budget this run committed {tokens_per_step:.2f} tokens/step"
    return Group(table, Text(note + ".", style="dim"))


def _roofline(report: dict, cells: int) -> Optional[RenderableType]:
    roof = report.get("roofline")
    if not roof:
        return None
    bw = roof.get("bandwidth") or {}
    ceiling = roof.get("ceiling_tokens_per_second")
    lines = [f"copy bandwidth {_gbps(bw.get('bytes_per_second'))} ({bw.get('method', '?')}, "
             f"{format_bytes(bw.get('buffer_bytes'))}, read + write counted) · weights "
             f"{format_bytes(roof['weight_bytes'])} per forward pass · memory-bound ceiling "
             f"{_num(ceiling)} tokens/s at one token per pass"]
    used = min(cells, 12)

    def share(m: dict) -> Text:
        return Text(bar(m["fraction_of_bandwidth"], used).ljust(used) + " ", style="red") + \
            Text(_pct(m["fraction_of_bandwidth"]))

    table = _by_mode("Roofline (decode)", roof.get("modes") or {}, [
        ("forward passes/s", lambda m: _num(m["forward_passes_per_second"])),
        ("weights read", lambda m: _gbps(m["weight_bytes_per_second"])),
        ("of copy bandwidth", share),
        ("tokens/s", lambda m: _num(m["tokens_per_second"])),
        ("× memory-bound ceiling", lambda m: _num(m["tokens_over_ceiling"], ".2f")),
    ])
    if table is None:
        return None
    notes = [f"{mode}: from the {m['source']}" for mode, m in (roof.get("modes") or {}).items()
             if m and m["source"] != "generation"]
    return Group(table, Text("\n".join(lines + notes), style="dim"))


def _compare(report: dict) -> Optional[RenderableType]:
    compare = report.get("compare_ar")
    if not compare:
        return None
    table = _table("Speculative vs autoregressive tokens/s, same prompts", "prompt", "spec", "AR", "speed-up",
                   "same")
    for p in compare["per_prompt"]:
        table.add_row(str(p["prompt"] + 1), _num(p["speculative_tokens_per_second"]),
                      _num(p["autoregressive_tokens_per_second"]), _num(p["speedup"], ".2f", "×"),
                      "yes" if p["same_tokens"] else "no")
    table.add_row("all", _num(compare["speculative_tokens_per_second"]),
                  _num(compare["autoregressive_tokens_per_second"]), _num(compare["speedup"], ".2f", "×"),
                  "yes" if compare["all_same_tokens"] else "no", style="bold")
    return table


def _memory(report: dict) -> Optional[RenderableType]:
    memory = report.get("memory")
    if not memory:
        return None
    device = ""
    if memory.get("device_used_bytes") is not None or memory.get("device_method"):
        device = f" · device {format_bytes(memory.get('device_used_bytes'))} ({memory.get('device_method')})"
    return Text(f"Memory: RSS {format_bytes(memory.get('host_rss_bytes'))} (peak "
                f"{format_bytes(memory.get('host_peak_rss_bytes'))}){device} · KV cache "
                f"{format_bytes(memory.get('kv_cache_bytes'))}, at most {memory.get('peak_cache_rows')} of "
                f"{memory.get('max_length')} rows filled ({_pct(memory.get('peak_cache_fill'))})")
