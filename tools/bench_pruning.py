"""Tree pruning side by side: no pruning, pruning, pruning + prompt lookup, each at the
folder's tuned budget and at a fixed large budget, against autoregressive decoding of
the same folder, in one run on the same prompts.

    python -m streamspec.tools.bench_pruning FOLDER                 # a folder exported with --pruning
    python -m streamspec.tools.bench_pruning FOLDER --budgets 4 16 --prune 0.1 --lookup 8
    python -m streamspec.tools.bench_pruning FOLDER OTHER ...       # the same rows for each folder (e.g. an
                                                                    # export with --full-draft-vocab)

Method: two engines per folder (CPU, the fallback off so that every row measures
speculation as configured): the whole step graph (no pruning, and autoregressive) and
the split graphs (pruning). The autoregressive row runs on the first folder. Each repeat runs every prompt through every setting in
turn, the order reversed on odd repeats, so drifting machine load hits all alike;
tok/s is new tokens over the wall time of the generate call, median of the repeats
per prompt, mean over prompts. Per step: drafted nodes (before pruning), kept nodes
(what the upper layers see), upper-layer rows (kept nodes × (1 + γ)), tokens
committed, and the share of accepted drafts that came from prompt lookup. Greedy, so
every setting must give the autoregressive tokens (the `=AR` column).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from streamspec.errors import StreamspecError

LARGE_BUDGET = 16
DEFAULT_PRUNE = 0.1  # when the folder has no tuned threshold


@dataclass
class Setting:
    name: str
    folder: Path
    budget: int  # 0 with lookup 0: autoregressive
    prune: float = 0.0
    lookup: int = 0
    runs: list[list[Any]] = field(default_factory=list)  # [prompt][repeat] -> (ids, stats, seconds)

    @property
    def speculative(self) -> bool:
        return self.budget > 0 or self.lookup > 0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m streamspec.tools.bench_pruning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", metavar="FOLDER",
                        help="folders exported with `streamspec export --pruning` (the same model)")
    parser.add_argument("--budgets", type=int, nargs="+", default=None, metavar="B",
                        help=f"tree budgets (default: the folder's tuned budget and {LARGE_BUDGET})")
    parser.add_argument("--prune", type=float, default=None,
                        help=f"pruning threshold (default: the folder's tuned one, else {DEFAULT_PRUNE})")
    parser.add_argument("--lookup", type=int, default=8, help="prompt-lookup draft tokens of the lookup rows (0: none)")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help='JSONL of {"messages": [...]} or {"prompt": "..."} (default: the held-out stdlib prompts)')
    parser.add_argument("--num-prompts", type=int, default=6, metavar="N", help="use the first N prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--repeats", type=int, default=3, metavar="N", help="timed runs per prompt and setting")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="ONNX Runtime intra-op threads")
    parser.add_argument("--json", default="bench_pruning.json", metavar="OUT", help="where to write the report")
    parser.add_argument("--no-progress", action="store_true", help="no progress display")
    return parser.parse_args(argv)


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


def measure(rows: list[Setting], prompt_ids: list[list[int]], max_new_tokens: int, repeats: int,
            threads: int, show=lambda *args: None) -> None:
    """The timed runs (see the module docstring)."""
    from streamspec.runtime import Engine

    prune = max(r.prune for r in rows)
    engines = {(folder, split): Engine(folder, provider="cpu", threads=threads, fallback=False,
                                       prune=prune if split else 0)
               for folder in dict.fromkeys(r.folder for r in rows) for split in (False, True)}

    def generate(row: Setting, ids: list[int]):
        engine = engines[(row.folder, row.prune > 0)]
        engine.budget, engine.lookup, engine.prune = row.budget, row.lookup, row.prune
        start = time.perf_counter()
        result = engine.generate(list(ids), max_new_tokens=max_new_tokens, speculative=row.speculative)
        return result.token_ids, result.stats, time.perf_counter() - start

    for row in rows:  # warm-up: every setting once on the longest prompt
        generate(row, max(prompt_ids, key=len))
        row.runs = [[] for _ in prompt_ids]
    total, done = repeats * len(prompt_ids) * len(rows), 0
    for repeat in range(repeats):
        for index, ids in enumerate(prompt_ids):
            for row in (rows if repeat % 2 == 0 else rows[::-1]):
                show(f"repeat {repeat + 1}/{repeats}, prompt {index + 1}/{len(prompt_ids)}: {row.name}", done, total)
                row.runs[index].append(generate(row, ids))
                done += 1


def summarize(row: Setting, reference: list[list[int]], num_streams: int) -> dict[str, Any]:
    firsts = [prompt_runs[0] for prompt_runs in row.runs]  # greedy: every repeat gives the same tokens
    stats = [s for _, s, _ in firsts]
    steps = sum(s.steps for s in stats)
    kept = sum(sum(s.tree_sizes) for s in stats)
    accepted = sum(sum(s.accepted) for s in stats)
    return {
        "setting": row.name, "folder": str(row.folder), "budget": row.budget, "prune": row.prune, "lookup": row.lookup,
        "tokens_per_second": statistics.fmean(statistics.median(len(ids) / seconds for ids, _, seconds in prompt_runs)
                                              for prompt_runs in row.runs),
        "tokens_per_step": (sum(s.new_tokens - 1 for s in stats) / steps) if steps else None,
        "mean_accepted_length": 1 + accepted / steps if steps else 1.0,
        "drafted_nodes_per_step": sum(sum(s.drafted_sizes) for s in stats) / steps if steps else 1.0,
        "kept_nodes_per_step": kept / steps if steps else 1.0,
        "upper_rows_per_step": kept * (1 + num_streams) / steps if steps and row.speculative else 1.0,
        "lookup_share": sum(s.lookup_tokens for s in stats) / accepted if accepted else 0.0,
        "equals_autoregressive": all(ids == ref for (ids, _, _), ref in zip(firsts, reference)),
    }


def build_report(rows: list[Setting], prompt_ids: list[list[int]], settings: dict[str, Any]) -> dict[str, Any]:
    from streamspec.runtime.folder import read_folder
    from streamspec.tools.profiler.measure import system_info

    reference = [prompt_runs[0][0] for prompt_runs in rows[0].runs]
    summaries = [summarize(row, reference, read_folder(row.folder).num_streams) for row in rows]
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console

    from streamspec.runtime.folder import read_folder
    from streamspec.tools.bench import _progress, load_prompts, tokenize_prompts

    if args.repeats < 1 or args.max_new_tokens < 1 or args.num_prompts < 1:
        raise StreamspecError("--repeats, --max-new-tokens and --num-prompts must be at least 1.")
    folders = [Path(f).expanduser() for f in args.folders]
    configs = [read_folder(f) for f in folders]
    for folder, config in zip(folders, configs):
        if not config.can_prune:
            raise StreamspecError(f"{folder} was exported without --pruning; export it again with --pruning.")
    config, folder = configs[0], folders[0]
    prune = args.prune if args.prune is not None else (config.default_prune or DEFAULT_PRUNE)
    if not 0 < prune < 1:
        raise StreamspecError(f"--prune must be in (0, 1), got {prune}.")
    budgets = args.budgets or sorted({config.default_budget, LARGE_BUDGET})
    if any(b < 1 for b in budgets):
        raise StreamspecError("--budgets must be at least 1.")
    records = load_prompts(Path(args.prompts) if args.prompts else None, args.num_prompts)
    prompt_ids = tokenize_prompts(folder, records)
    rows = settings_for(folders, budgets, prune, args.lookup)
    Console(stderr=True, quiet=args.no_progress).log(f"{len(rows)} settings × {len(prompt_ids)} prompts × "
                                                     f"{args.repeats} repeats")
    with _progress(not args.no_progress) as show:
        measure(rows, prompt_ids, args.max_new_tokens, args.repeats, args.threads, show)
    settings = {"budgets": budgets, "prune": prune, "lookup": args.lookup, "max_new_tokens": args.max_new_tokens,
                "repeats": args.repeats, "threads": args.threads, "prompt_ids": [r.id for r in records]}
    return build_report(rows, prompt_ids, settings)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from rich.console import Console

    from streamspec.tools.bench import write_report

    args = parse_args(argv)
    try:
        report = run(args)
        write_report(report, Path(args.json))
    except StreamspecError as error:
        print(f"bench_pruning: {error}", file=sys.stderr)
        return 1
    console = Console()
    console.print(render(report))
    if not all(row["equals_autoregressive"] for row in report["rows"]):
        console.print("[red]Some setting did not reproduce the autoregressive tokens.[/]")
        return 1
    console.print(f"Wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
