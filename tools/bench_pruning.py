"""Tree pruning side by side: no pruning, pruning, pruning + prompt lookup, each at the
folder's tuned budget and at a fixed large budget, against autoregressive decoding of
the same folder, in one run on the same prompts.

    streamspec bench pruning FOLDER                 # a folder exported with --pruning
    streamspec bench pruning FOLDER --budgets 4 16 --prune 0.1 --lookup 8
    streamspec bench pruning FOLDER OTHER ...       # the same rows for each folder (e.g. an
                                                    # export with --full-draft-vocab)

(`python -m streamspec.tools.bench_pruning ...` runs the same command.)

Method: two engines per folder (CPU, the fallback off so that every row measures
speculation as configured): the whole step graph (no pruning, and autoregressive) and
the split graphs (pruning). The autoregressive row runs on the first folder. Every
setting runs once on the longest prompt first (warm-up); then each repeat runs every
prompt through every setting in turn, the order reversed on alternate turns
(`tools/harness.py`), so drifting machine load hits all alike; tok/s is new tokens over
the wall time of the generate call, median of the repeats per prompt, mean over prompts. Per step: drafted nodes (before pruning), kept nodes
(what the upper layers see), upper-layer rows (kept nodes × (1 + γ)), tokens
committed, and the share of accepted drafts that came from prompt lookup. Greedy, so
every setting must give the autoregressive tokens (the `=AR` column).
"""

from __future__ import annotations

import datetime
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from streamspec.errors import StreamspecError
from streamspec.tools.cli import bench_main
from streamspec.tools.harness import Measurement, Turn, engine_arm, measure

LARGE_BUDGET = 16
DEFAULT_PRUNE = 0.1  # when the folder has no tuned threshold


@dataclass
class Setting:
    name: str
    folder: Path
    budget: int  # 0 with lookup 0: autoregressive
    prune: float = 0.0
    lookup: int = 0

    @property
    def speculative(self) -> bool:
        return self.budget > 0 or self.lookup > 0


def settings_for(folders: Sequence[Path], budgets: Sequence[int], prune: float, lookup: int) -> list[Setting]:
    rows = [Setting("autoregressive", folders[0], 0)]
    for folder in folders:
        label = f"{folder.name}: " if len(folders) > 1 else ""
        for budget in budgets:
            rows += [Setting(f"{label}B{budget} no pruning", folder, budget),
                     Setting(f"{label}B{budget} pruning", folder, budget, prune)]
            if lookup:
                rows.append(Setting(f"{label}B{budget} pruning + lookup {lookup}", folder, budget, prune, lookup))
    return rows


def measure_settings(rows: list[Setting], prompt_ids: list[list[int]], max_new_tokens: int, repeats: int,
                     threads: int, show: Optional[Callable[[Turn], None]] = None) -> Measurement:
    """The timed runs (see the module docstring): every setting an arm of the harness's loop."""
    from streamspec.runtime import Engine

    prune = max(r.prune for r in rows)
    engines = {(folder, split): Engine(folder, provider="cpu", threads=threads, fallback=False,
                                       prune=prune if split else 0)
               for folder in dict.fromkeys(r.folder for r in rows) for split in (False, True)}
    arms = [engine_arm(row.name, engines[(row.folder, row.prune > 0)], max_new_tokens, speculative=row.speculative,
                       budget=row.budget, lookup=row.lookup, prune=row.prune) for row in rows]
    return measure(arms, prompt_ids, repeats, warm_up=max(prompt_ids, key=len), show=show)


def summarize(measured: Measurement, row: Setting, num_streams: int) -> dict[str, Any]:
    firsts = measured.firsts(row.name)  # greedy: every repeat gives the same tokens
    stats = [r.stats for r in firsts]
    steps = sum(s.steps for s in stats)
    kept = sum(sum(s.tree_sizes) for s in stats)
    streamed = sum(sum(s.streamed_sizes) for s in stats)  # kept nodes with stream rows (not lookup's)
    accepted = sum(sum(s.accepted) for s in stats)
    return {
        "setting": row.name, "folder": str(row.folder), "budget": row.budget, "prune": row.prune, "lookup": row.lookup,
        "tokens_per_second": measured.tokens_per_second(row.name),
        "tokens_per_step": (sum(s.new_tokens - 1 for s in stats) / steps) if steps else None,
        "mean_accepted_length": 1 + accepted / steps if steps else 1.0,
        "drafted_nodes_per_step": sum(sum(s.drafted_sizes) for s in stats) / steps if steps else 1.0,
        "kept_nodes_per_step": kept / steps if steps else 1.0,
        "upper_rows_per_step": (kept + num_streams * streamed) / steps if steps and row.speculative else 1.0,
        "lookup_share": sum(s.lookup_tokens for s in stats) / accepted if accepted else 0.0,
        "equals_autoregressive": all(measured.same_as(row.name, measured.arms[0])),
    }


def build_report(rows: list[Setting], measured: Measurement, prompt_ids: list[list[int]],
                 settings: dict[str, Any]) -> dict[str, Any]:
    from streamspec.runtime.folder import read_folder
    from streamspec.tools.profiler.measure import system_info

    summaries = [summarize(measured, row, read_folder(row.folder).num_streams) for row in rows]
    ar = summaries[0]["tokens_per_second"]
    for s in summaries:
        s["speedup_over_autoregressive"] = s["tokens_per_second"] / ar if ar else None
    folders = {str(r.folder): read_folder(r.folder).graph.get("draft_vocab") for r in rows}
    return {"date": datetime.date.today().isoformat(), "folders": folders, "system": system_info("cpu"),
            "settings": settings, "prompts": len(prompt_ids), "rows": summaries}


def render(report: dict[str, Any]):
    from rich import box
    from rich.table import Table

    s = report["settings"]
    table = Table(title=f"Tree pruning on CPU: {report['prompts']} prompts, {s['max_new_tokens']} new tokens, "
                        f"{s['threads']} threads, median of {s['repeats']} repeats, threshold {s['prune']}",
                  caption="tok/step: tokens committed per decode step; drafted / kept: tree nodes per step before "
                          "and after pruning; rows: upper-layer rows per step (kept × (1 + γ)); lookup: share of "
                          "accepted drafts from prompt lookup; =AR: same tokens as autoregressive greedy.",
                  box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    for column in ("setting", "tok/s", "×AR", "tok/step", "drafted", "kept", "rows", "lookup", "=AR"):
        table.add_column(column, justify="left" if column == "setting" else "right", no_wrap=True)
    for row in report["rows"]:
        per_step = row["tokens_per_step"]
        table.add_row(row["setting"], f"{row['tokens_per_second']:.1f}", f"{row['speedup_over_autoregressive']:.2f}×",
                      "1.00" if per_step is None else f"{per_step:.2f}", f"{row['drafted_nodes_per_step']:.1f}",
                      f"{row['kept_nodes_per_step']:.1f}", f"{row['upper_rows_per_step']:.1f}",
                      f"{row['lookup_share']:.0%}", "[green]yes[/]" if row["equals_autoregressive"] else "[red]NO[/]")
    return table


def run(args: Any, say: Callable[[str], None]) -> dict[str, Any]:
    """The report of `streamspec bench pruning` (tools/commands/bench_pruning.py parses the
    options and prints)."""
    from streamspec.runtime.folder import read_folder
    from streamspec.tools.harness import load_prompts, progress, tokenize_prompts

    folders = [Path(f).expanduser() for f in args.folders]
    configs = [read_folder(f) for f in folders]
    for folder, config in zip(folders, configs):
        if not config.can_prune:
            raise StreamspecError(f"{folder} was exported without --pruning; export it again with --pruning.")
    config, folder = configs[0], folders[0]
    prune = args.prune if args.prune is not None else (config.default_prune or DEFAULT_PRUNE)
    budgets = args.budgets or sorted({config.default_budget, LARGE_BUDGET})
    records = load_prompts(args.prompts, args.num_prompts)
    prompt_ids = tokenize_prompts(folder, records)
    rows = settings_for(folders, budgets, prune, args.lookup)
    say(f"{len(rows)} settings × {len(prompt_ids)} prompts × {args.repeats} repeats")
    with progress(not args.no_progress) as show:
        measured = measure_settings(rows, prompt_ids, args.max_new_tokens, args.repeats, args.threads, show)
    settings = {"budgets": budgets, "prune": prune, "lookup": args.lookup, "max_new_tokens": args.max_new_tokens,
                "repeats": args.repeats, "threads": args.threads, "prompt_ids": [r.id for r in records]}
    return build_report(rows, measured, prompt_ids, settings)


main = bench_main("pruning")  # python -m streamspec.tools.bench_pruning ARGS: streamspec bench pruning ARGS

if __name__ == "__main__":
    sys.exit(main())
