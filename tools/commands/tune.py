"""`streamspec tune DIR`: measure this device and write the best tree into the folder."""

from __future__ import annotations

import argparse

from streamspec.tools.commands.arguments import integer, output_file, threads

HELP = ("Measure the step-latency curve and the acceptance of several tree budgets (and prompt lookup) on "
        "this device, and write the setting with the most expected tokens/s into the folder.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="DIR", help="a folder written by `streamspec export`")
    parser.add_argument("--prompts", metavar="FILE", default=None,
                        help='a JSONL file of {"messages": [...]} or {"prompt": "..."} records, each with an optional '
                             '"domain"; when omitted, the default model\'s held-out prompts of every domain, '
                             "each domain's last N (`streamspec bench` takes the first)")
    parser.add_argument("--domains", default=None, metavar="LIST",
                        help="comma-separated domains of the prompts to use (default: all); tokens per pass is "
                             "reported per domain")
    parser.add_argument("--num-prompts", type=integer(1), default=8, metavar="N", help="prompts per domain")
    parser.add_argument("--max-new-tokens", type=integer(1), default=96, metavar="N", help="tokens per generation")
    parser.add_argument("--budgets", default=",".join(map(str, _budgets())), metavar="B,B,...",
                        help="tree budgets (draft nodes) to try")
    parser.add_argument("--lookup", default="0", metavar="N,N,...",
                        help="prompt-lookup draft lengths to try (0: off), when the engine supports it")
    parser.add_argument("--prune", default=None, metavar="T,T,...",
                        help="tree-pruning thresholds to try beside no pruning (default on a folder exported with "
                             "--pruning: 0.05,0.1,0.2; 0: none)")
    parser.add_argument("--threads", type=threads, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--repeats", type=integer(1), default=5, help="timed steps per point of the latency curve")
    parser.add_argument("--json", metavar="OUT", type=output_file, default="tune.json", help="where to write every figure")
    parser.add_argument("--dry-run", action="store_true", help="measure and print, but leave the folder unchanged")


def _budgets():
    from streamspec.tools.tune import DEFAULT_BUDGETS

    return DEFAULT_BUDGETS


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from streamspec.errors import StreamspecError
    from streamspec.runtime.folder import read_folder
    from streamspec.runtime.tree_settings import default_streams
    from streamspec.tools import harness, tune

    folder = Path(args.folder)
    config = read_folder(folder)  # one sentence when it is no deployable folder
    budgets = _ints(args.budgets, "--budgets", minimum=1)
    lookups = _ints(args.lookup, "--lookup", minimum=0)
    prunes = _thresholds(args.prune, config.can_prune, folder)
    if args.num_prompts < 1 or args.max_new_tokens < 1 or args.repeats < 1:
        raise StreamspecError("--num-prompts, --max-new-tokens and --repeats must be positive.")
    domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
    # bench measures the first built-in held-out prompts of each domain; tune the last ones
    prompts = harness.load_prompts(Path(args.prompts) if args.prompts else None, args.num_prompts, domains,
                                   from_end=not args.prompts)
    console = Console()
    settings = tune.TuneSettings(folder, budgets=budgets, lookup=lookups, max_new_tokens=args.max_new_tokens,
                                 threads=args.threads, provider=args.provider, repeats=args.repeats, prune=prunes)
    with console.status("tuning") as status:
        report = tune.run_tune(settings, harness.tokenize_prompts(folder, prompts),
                               progress=lambda message: status.update(f"tuning: {message}"),
                               domains=[p.domain for p in prompts])
    table = Table(title=f"tree settings on {report['system']['device_name']} (past {report['past']} rows)")
    for column in ("budget", "lookup", "prune", "tokens/pass", "nodes/step", "kept/step", "step ms", "expected tok/s",
                   "measured tok/s", "exact"):
        table.add_column(column, justify="right")
    ar = report["autoregressive"]
    table.add_row("AR", "-", "-", "1.00", "1.0", "1.0", f"{ar['step_ms']:.1f}", f"{ar['expected_tokens_per_second']:.1f}",
                  f"{ar['measured_tokens_per_second']:.1f}", "yes")
    for c in report["candidates"]:
        ms = 1000.0 * c["tokens_per_pass"] / c["expected_tokens_per_second"]
        table.add_row(str(c["budget"]), str(c["lookup"]), f"{c['prune']:g}" if c["prune"] else "off",
                      f"{c['tokens_per_pass']:.2f}", f"{c['nodes_per_step']:.1f}", f"{c['kept_per_step']:.1f}",
                      f"{ms:.1f}", f"{c['expected_tokens_per_second']:.1f}",
                      f"{c['measured_tokens_per_second']:.1f}", "yes" if c["identical"] else "[red]NO[/]")
    console.print(table)
    if report.get("domains"):
        per_domain = Table(title="tokens per pass per domain")
        per_domain.add_column("budget", justify="right")
        per_domain.add_column("lookup", justify="right")
        for domain in report["domains"]:
            per_domain.add_column(domain, justify="right")
        for c in report["candidates"]:
            if not c["prune"]:
                per_domain.add_row(str(c["budget"]), str(c["lookup"]),
                                   *(f"{c['domain_tokens_per_pass'][d]:.2f}" for d in report["domains"]))
        console.print(per_domain)
    choice = report["choice"]
    console.print(f"choice: budget {choice['budget']}, lookup {choice['lookup']}, pruning "
                  f"{choice['prune'] or 'off'} ({choice['reason']}; expected speed-up {choice['expected_speedup']:.2f}x)")
    if choice["budget"] == 0 and not choice["lookup"] and config.can_tree:
        # The tree machinery would run in every step for nothing (docs/design.md).
        console.print("This device decodes the folder autoregressively: export it again with --autoregressive "
                      "(and the same other options) for a leaner graph, the same tokens.")
    elif default_streams(config.num_streams, choice["budget"]) is not None:
        console.print(f"A tree of {choice['budget']} draft nodes uses streams 1..{choice['budget']} of "
                      f"{config.num_streams}: export it again with --streams {choice['budget']} (and the same other "
                      "options) for fewer rows per step, the same tokens.")
    harness.write_report(report, Path(args.json))
    if not args.dry_run:
        tune.write_choice(folder, report)
        console.print(f"written into {folder / 'streamspec.json'}; figures in {args.json}")
    if not all(c["identical"] for c in report["candidates"]):
        raise StreamspecError("a speculative setting changed the greedy output; this is a bug, please report it.")
    return 0


def _thresholds(text, can_prune: bool, folder) -> list[float]:
    """--prune: the thresholds to try (none for "0"; by default the standard ones when the
    folder can prune)."""
    from streamspec.errors import StreamspecError
    from streamspec.tools.tune import DEFAULT_PRUNE

    if text is None:
        return list(DEFAULT_PRUNE) if can_prune else []
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise StreamspecError(f"--prune must be comma-separated numbers, got {text!r}.") from None
    values = [v for v in values if v != 0]
    if any(not 0 < v < 1 for v in values):
        raise StreamspecError(f"--prune thresholds must be in (0, 1), got {text!r}.")
    if values and not can_prune:
        raise StreamspecError(f"{folder} was exported without --pruning; export it again with --pruning to tune it.")
    return values


def _ints(text: str, name: str, minimum: int) -> list[int]:
    from streamspec.errors import StreamspecError

    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise StreamspecError(f"{name} must be comma-separated integers, got {text!r}.") from None
    if not values or min(values) < minimum or max(values) > 4096:
        raise StreamspecError(f"{name} needs integers from {minimum} to 4096, got {text!r}.")
    return values
