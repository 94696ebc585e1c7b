"""Parse tegrastats logs and merge them into a `streamspec profile --json` report.

    python -m streamspec.tools.jetson.tegrastats merge LOG PROFILE.json --interval MS
    python -m streamspec.tools.jetson.tegrastats summary LOG --interval MS

`tools/jetson/monitor` runs tegrastats beside `streamspec profile` and then calls
`merge`, which adds a "tegrastats" section to the report:

    tegrastats   interval_ms, samples [{time, ram_used_mb, ram_total_mb, swap_used_mb,
                 gpu_load_percent, gpu_freq_mhz, cpu_load_percent, power_mw {rail: mW},
                 temperature_c {sensor: C}}], summary {samples, duration_seconds,
                 ram_total_mb, ram_used_mb {mean, max}, gpu_load_percent {mean, max},
                 cpu_load_percent {mean, max}, power_mw {rail: {mean, max}},
                 temperature_c {sensor: {mean, max}}, input_rail, input_power_mw
                 {mean, max}, energy_joules}

One tegrastats line per interval; the fields differ between boards and releases, so
each is looked up by its own pattern and a missing one is simply absent:

    JetPack 5 (Orin):  RAM 2298/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB)
                       CPU [2%@729,1%@729,off,off] EMC_FREQ 0%@2133 GR3D_FREQ 0%@[305]
                       ... CPU@45.5C GPU@44C ... VDD_IN 4881mW/4881mW VDD_CPU_CV 407mW/407mW
    JetPack 6 (Orin):  12-23-2024 22:54:11 RAM 3185/7620MB (lfb 4x2MB) SWAP 0/3810MB
                       (cached 0MB) CPU [1%@729,...] GR3D_FREQ 0% cpu@62.8C gpu@61.6C ...
                       VDD_IN 5098mW/5098mW VDD_CPU_GPU_CV 1025mW/1025mW VDD_SOC 1459mW/1459mW
    Xavier, older:     GR3D_FREQ 0%@1377 ... GPU 0mW/0mW CPU 311mW/311mW SOC 1558mW/1558mW
                       (Nano, JetPack 4: POM_5V_IN 2545/2547 POM_5V_GPU 0/0, no unit)

Power rails read "NAME now/average" in mW; the average is tegrastats' own running one,
so only "now" is kept and averaged here over the profiled run. The board's input
rail (VDD_IN, POM_5V_IN or SYS5V) is the whole module's draw, the one to quote.

Parsing needs the standard library only; `merge` reads and writes the report with
streamspec's profiler, so that the report keeps its one format.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from statistics import fmean
from typing import Any, Optional, Sequence, Union

# Rails that carry the whole module's input power, most specific first.
INPUT_RAILS = ("VDD_IN", "POM_5V_IN", "SYS5V")

_TIME = re.compile(r"^(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
# GR3D_FREQ 0%  |  0%@1377  |  0%@[305]  |  0%@[305,305] (one frequency per GPC)
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?([\d,]+)\]?)?")
# NAME 4881mW/4881mW or NAME 2545/2547; the lookahead keeps "RAM 2298/7620MB" out.
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?![\w/])")
_TEMP = re.compile(r"\b([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
_NOT_RAILS = {"RAM", "SWAP", "IRAM"}
# A powered-off sensor reads -256C (e.g. CV0@-256C on JetPack 5).
_MIN_TEMPERATURE = -100.0


def parse_line(line: str) -> Optional[dict[str, Any]]:
    """One tegrastats line -> a sample dict; None for a line that is not one (blank, banner)."""
    ram = _RAM.search(line)
    if not ram:
        return None
    sample: dict[str, Any] = {"time": None, "ram_used_mb": int(ram.group(1)), "ram_total_mb": int(ram.group(2))}
    if m := _TIME.match(line):
        sample["time"] = m.group(1)
    if m := _SWAP.search(line):
        sample["swap_used_mb"] = int(m.group(1))
    if m := _GR3D.search(line):
        sample["gpu_load_percent"] = int(m.group(1))
        if m.group(2):
            sample["gpu_freq_mhz"] = max(int(f) for f in m.group(2).split(",") if f)
    if m := _CPU.search(line):
        loads = [int(c.split("%")[0]) for c in m.group(1).split(",") if "%" in c]
        if loads:  # cores that are "off" do not count
            sample["cpu_load_percent"] = fmean(loads)
    power = {name: int(now) for name, now, _ in _RAIL.findall(line) if name not in _NOT_RAILS}
    if power:
        sample["power_mw"] = power
    temps = {name: float(t) for name, t in _TEMP.findall(line) if float(t) > _MIN_TEMPERATURE}
    if temps:
        sample["temperature_c"] = temps
    return sample


def parse_log(text: str) -> list[dict[str, Any]]:
    return [s for s in map(parse_line, text.splitlines()) if s is not None]


def _stats(values: Sequence[float]) -> Optional[dict[str, float]]:
    return {"mean": round(fmean(values), 2), "max": max(values)} if values else None


def _per_key(samples: Sequence[dict], field: str) -> dict[str, dict[str, float]]:
    keys: list[str] = []
    for s in samples:
        keys += [k for k in s.get(field, {}) if k not in keys]
    return {k: _stats([s[field][k] for s in samples if k in s.get(field, {})]) for k in keys}


def summarize(samples: Sequence[dict[str, Any]], interval_ms: Optional[float] = None) -> dict[str, Any]:
    """Means and maxima over the samples; energy from the input rail when the interval is known."""
    summary: dict[str, Any] = {"samples": len(samples)}
    if not samples:
        return summary
    duration = len(samples) * interval_ms / 1000 if interval_ms else None
    summary["duration_seconds"] = duration
    summary["ram_total_mb"] = samples[-1]["ram_total_mb"]
    for field in ("ram_used_mb", "swap_used_mb", "gpu_load_percent", "gpu_freq_mhz", "cpu_load_percent"):
        stats = _stats([s[field] for s in samples if field in s])
        if stats is not None:
            summary[field] = stats
    summary["power_mw"] = _per_key(samples, "power_mw")
    summary["temperature_c"] = _per_key(samples, "temperature_c")
    rail = next((r for r in INPUT_RAILS if r in summary["power_mw"]), None)
    summary["input_rail"] = rail
    summary["input_power_mw"] = summary["power_mw"].get(rail) if rail else None
    summary["energy_joules"] = (round(summary["input_power_mw"]["mean"] / 1000 * duration, 3)
                                if rail and duration else None)
    return summary


def section(log_text: str, interval_ms: Optional[float]) -> dict[str, Any]:
    samples = parse_log(log_text)
    return {"interval_ms": interval_ms, "samples": samples, "summary": summarize(samples, interval_ms)}


def merge(log: Union[str, Path], profile: Union[str, Path], interval_ms: Optional[float]) -> dict[str, Any]:
    """Add the log's "tegrastats" section to a saved profile report, in place; returns it."""
    from streamspec.errors import StreamspecError
    from streamspec.tools.profiler import report as reports

    data = reports.load(profile)  # one clear sentence when it is not a profile report
    try:
        text = Path(log).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise StreamspecError(f"cannot read {log}: {exc.strerror}.") from None
    data["tegrastats"] = section(text, interval_ms)
    if not data["tegrastats"]["samples"]:
        raise StreamspecError(f"{log} holds no tegrastats lines (did tegrastats run?).")
    reports.save(data, profile)
    return data["tegrastats"]


def describe(summary: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    if not summary.get("samples"):
        return "no tegrastats samples"
    lines = [f"{summary['samples']} samples" + (f" over {summary['duration_seconds']:.1f} s"
                                                   if summary.get("duration_seconds") else "")]
    if ram := summary.get("ram_used_mb"):
        lines.append(f"RAM used: mean {ram['mean']:.0f} MB, max {ram['max']} MB of {summary['ram_total_mb']} MB")
    if gpu := summary.get("gpu_load_percent"):
        lines.append(f"GPU load (GR3D): mean {gpu['mean']:.0f}%, max {gpu['max']}%")
    for rail, stats in summary.get("power_mw", {}).items():
        lines.append(f"{rail}: mean {stats['mean']:.0f} mW, max {stats['max']} mW")
    if summary.get("energy_joules") is not None:
        lines.append(f"energy on {summary['input_rail']}: {summary['energy_joules']:.1f} J")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamspec.tools.jetson.tegrastats",
                                     description="Parse a tegrastats log; merge it into a profile report.")
    sub = parser.add_subparsers(dest="command", required=True)
    merge_cmd = sub.add_parser("merge", help="add a 'tegrastats' section to a `streamspec profile --json` report")
    merge_cmd.add_argument("log", help="the file `tegrastats --logfile` wrote")
    merge_cmd.add_argument("profile", help="the report written by `streamspec profile --json` (updated in place)")
    summary_cmd = sub.add_parser("summary", help="print the summary of a log as JSON")
    summary_cmd.add_argument("log")
    for cmd in (merge_cmd, summary_cmd):
        cmd.add_argument("--interval", type=float, default=None, metavar="MS",
                         help="tegrastats --interval the log was taken with (for durations and energy)")
    args = parser.parse_args(argv)
    if args.command == "summary":
        text = Path(args.log).read_text(encoding="utf-8", errors="replace")
        print(json.dumps(summarize(parse_log(text), args.interval), indent=1))
        return 0
    from streamspec.errors import StreamspecError

    try:
        merged = merge(args.log, args.profile, args.interval)
    except StreamspecError as error:
        print(f"tegrastats: {error}", file=sys.stderr)
        return 1
    print(describe(merged["summary"]))
    print(f"merged into {args.profile} under 'tegrastats'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
