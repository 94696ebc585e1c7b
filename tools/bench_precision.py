"""fp32 against int8 and int4 weights (and quantized KV caches) of the same model, side
by side in one run: autoregressive and speculative tokens/s, the speculative speed-up
over the same precision's autoregressive decoding, token agreement with fp32 greedy,
the check that speculative == autoregressive within each precision, weight and KV-cache
bytes and peak RSS.

    streamspec bench precision CKPT                  # exports fp32, int8, int4 once
    streamspec bench precision CKPT --precisions fp32 int4 fp32+kv8 int4+kv4
    streamspec bench precision fp32-dir int8-dir int4-dir    # takes exported folders

(`python -m streamspec.tools.bench_precision ...` runs the same command.)

One checkpoint or base model (anything `streamspec export` takes) is exported once per
precision into --out-dir (default: <cache>/bench/precision/), and reused while its
streamspec.json says it is that source at that precision. Exported folders are taken
as they are; their precision comes from their streamspec.json.

Method: every precision is loaded into its own Engine (CPU, the fallback off so that
the speculative rows measure speculation); the peak RSS is the growth of this process's
resident memory while the engine loads and runs its warm-up. Then each repeat runs every
prompt through every (precision, mode) in turn, the order reversed on alternate turns
(`tools/harness.py`), so drifting machine load hits all alike; tok/s is new tokens over
the wall time of the generate call, median of the repeats per prompt, mean over prompts.
Greedy decoding, the same prompt ids and max_new_tokens everywhere.

Agreement with fp32: the fp32 autoregressive tokens are the reference. Per prompt,
`prefix` = tokens before the first divergence / reference length (1.0: identical), and
`exact` counts the prompts whose tokens are identical. A quantized model is a different
model, so agreement below 1 is its quality cost; speculative == autoregressive within a
precision must still hold exactly (the `spec == AR` column).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from streamspec.errors import StreamspecError
from streamspec.tools.cli import bench_main
from streamspec.tools.harness import MIB, Measurement, MemorySampler, Turn, engine_arm, fmt, measure

PRECISIONS = ("fp32", "int8", "int4")  # the default set; "+kv8" / "+kv4" adds a quantized KV cache
KV_SUFFIXES = {"": "none", "kv8": "int8", "kv4": "int4"}  # "int4+kv8": int4 weights, int8 KV cache
MODES = ("ar", "spec")


# ------------------------------------------------------------------------------ folders
def precision_of(folder: Path) -> str:
    """"fp32", "fp16", "int8" or "int4" from a folder's streamspec.json, with "-ALGORITHM"
    for a weight-only algorithm other than the default (int4-hqq), "+a8" for int8
    activations ("+a8head": in the LM head only) and "+kv8" / "+kv4" for a quantized KV
    cache."""
    from streamspec.runtime.folder import read_folder

    graph = read_folder(folder).graph
    quantization = graph.get("quantization")
    weights = f"int{quantization['bits']}" if quantization else graph["dtype"]
    if quantization and quantization.get("algorithm", "default") != "default":
        weights += f"-{quantization['algorithm']}"
    if quantization and quantization.get("activations") in ("int8", "int8-head"):
        weights += "+a8" if quantization["activations"] == "int8" else "+a8head"
    kv = graph.get("kv_dtype")
    return weights + (f"+kv{kv[3:]}" if kv else "")


def parse_precision(precision: str) -> tuple[str, str]:
    """"int4+kv8" -> (--quantize "int4", --kv-dtype "int8"); one sentence on bad input."""
    weights, _, kv = precision.partition("+")
    kv_dtype = KV_SUFFIXES.get(kv)
    if weights not in PRECISIONS or kv_dtype is None:
        raise StreamspecError(f"Unknown precision {precision!r}; use fp32, int8 or int4, optionally with +kv8 or "
                              "+kv4.")
    return ("none" if weights == "fp32" else weights), kv_dtype


def is_exported(path: Path) -> bool:
    return (path / "streamspec.json").is_file() and (path / "model.onnx").is_file()


def resolve_folders(sources: Sequence[str], precisions: Sequence[str], out_dir: Optional[Path], block_size: int,
                    max_length: int, force: bool, activations: str = "fp32",
                    say=lambda message: None) -> dict[str, Path]:
    """precision -> folder: the given exported folders, or exports of one source."""
    paths = [Path(s).expanduser() for s in sources]
    if all(is_exported(p) for p in paths):
        twice = next((path for i, path in enumerate(paths) if path.resolve() in [p.resolve() for p in paths[:i]]), None)
        if twice is not None:
            raise StreamspecError(f"{twice} is given twice; pass each folder once.")
        labels = [precision_of(path) for path in paths]
        # Two folders of one precision (say, before and after a change) are told apart by name.
        labels = [f"{label} ({path.name})" if labels.count(label) > 1 else label for label, path in zip(labels, paths)]
        if len(set(labels)) < len(labels):
            raise StreamspecError("Two of the folders have the same precision and the same name; rename one.")
        return dict(sorted(zip(labels, paths), key=lambda item: _order(item[0])))
    if len(paths) != 1:
        raise StreamspecError("Pass either one checkpoint or base model, or exported folders only (not a mix).")
    return export_precisions(sources[0], precisions, out_dir, block_size, max_length, force, activations, say)


def _order(precision: str) -> tuple[int, str]:
    """fp32 first (the reference), then fp16, int8, int4; KV variants after their weights."""
    weights = precision.split("+")[0].split("-")[0].split(" ")[0]
    order = ("fp32", "fp16", "int8", "int4")
    return (order.index(weights) if weights in order else len(order), precision)


def export_precisions(source: str, precisions: Sequence[str], out_dir: Optional[Path], block_size: int,
                      max_length: int, force: bool, activations: str = "fp32",
                      say=lambda message: None) -> dict[str, Path]:
    """Export `source` once per precision; a folder already there is reused when its
    streamspec.json names the same source, precision, block size, activations and max
    length."""
    from streamspec.exporter import export
    from streamspec.models.loading import cache_root

    root = out_dir or cache_root() / "bench" / "precision" / (Path(source).name or "model")
    wanted = {precision: parse_precision(precision) for precision in precisions}  # checks them all first
    folders = {}
    for precision in sorted(wanted, key=_order):
        quantize, kv_dtype = wanted[precision]
        folder = root / precision
        if force or not _matches(folder, source, quantize, kv_dtype, block_size, max_length, activations):
            say(f"exporting {source} as {precision} into {folder}")
            export(source, folder, max_length=max_length, quantize=quantize, block_size=block_size,
                   quant_activations=activations, kv_dtype=kv_dtype, force=True, progress=False)
        folders[precision] = folder
    return folders


def _matches(folder: Path, source: str, quantize: str, kv_dtype: str, block_size: int, max_length: int,
             activations: str) -> bool:
    if not is_exported(folder):
        return False
    raw = json.loads((folder / "streamspec.json").read_text(encoding="utf-8"))
    record = raw["graph"].get("quantization") or {}
    bits = None if quantize == "none" else int(quantize[3:])
    wanted = (bits, block_size, activations)
    same_quantization = (record.get("bits"), record.get("block_size"), record.get("activations")) == wanted \
        if bits else not record
    return (raw.get("source", {}).get("name") == str(source) and same_quantization
            and (raw["graph"].get("kv_dtype") or "none") == kv_dtype and raw["graph"].get("max_length") == max_length)


# ------------------------------------------------------------------------------ measuring
@dataclass
class Precision:
    name: str
    folder: Path
    engine: Any = None
    peak_mib: Optional[float] = None
    can_speculate: bool = False

    def modes(self) -> list[str]:
        return [mode for mode in MODES if mode == "ar" or self.can_speculate]


def arm_name(precision: str, mode: str) -> str:
    return f"{precision} {mode}"


def load(precision: Precision, warm_up_ids: list[int], max_new_tokens: int, threads: int,
         budget: Optional[int]) -> None:
    """Load the engine under the memory sampler and run one warm-up per mode."""
    from streamspec.runtime import Engine

    with MemorySampler(release=True) as memory:
        engine = Engine(precision.folder, provider="cpu", threads=threads, budget=budget, fallback=False)
        for speculative in (False, True):
            engine.generate(list(warm_up_ids), max_new_tokens=max_new_tokens, speculative=speculative)
    precision.engine, precision.peak_mib = engine, memory.peak_growth_mib
    precision.can_speculate = engine.can_speculate


def measure_precisions(precisions: list[Precision], prompt_ids: list[list[int]], max_new_tokens: int, repeats: int,
                       show: Optional[Callable[[Turn], None]] = None) -> Measurement:
    """The timed runs: every (precision, mode) an arm of the harness's alternating loop."""
    arms = [engine_arm(arm_name(p.name, mode), p.engine, max_new_tokens, speculative=mode == "spec")
            for p in precisions for mode in p.modes()]
    return measure(arms, prompt_ids, repeats, show=show)


# ------------------------------------------------------------------------------ the report
def agreement(tokens: Sequence[int], reference: Sequence[int]) -> float:
    """Tokens before the first divergence from `reference`, as a fraction of its length
    (1.0 when equal; a longer or shorter output diverges where it ends)."""
    same = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        same += 1
    if same == len(reference) == len(tokens):
        return 1.0
    return same / max(len(reference), 1)


def summarize(measured: Measurement, p: Precision, mode: str,
              reference: Optional[list[list[int]]]) -> dict[str, Any]:
    arm = arm_name(p.name, mode)
    firsts = measured.firsts(arm)
    tokens = sum(len(r.ids) for r in firsts)
    passes = sum(r.passes for r in firsts)
    row: dict[str, Any] = {
        "precision": p.name, "mode": mode, "tokens_per_second": measured.tokens_per_second(arm),
        "tokens_per_pass": tokens / passes if passes else None,
        "new_tokens": tokens, "forward_passes": passes, "stable": measured.stable(arm),
        "token_ids": [r.ids for r in firsts],
    }
    if reference is not None:
        fractions = [agreement(r.ids, ref) for r, ref in zip(firsts, reference)]
        row["agreement_prefix"] = statistics.fmean(fractions)
        row["agreement_exact"] = sum(r.ids == ref for r, ref in zip(firsts, reference))
    return row


def build_report(precisions: list[Precision], measured: Measurement, prompt_ids: list[list[int]],
                 settings: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort

    from streamspec.runtime.folder import read_folder
    from streamspec.runtime.memory import estimate_memory

    # The reference: the first fp32 folder (sorted first), "fp32" or "fp32 (NAME)".
    fp32 = next((p for p in precisions if p.name.split(" ")[0] == "fp32"), None)
    reference = [r.ids for r in measured.firsts(arm_name(fp32.name, "ar"))] if fp32 else None
    rows, summary = [], []
    for p in precisions:
        config = read_folder(p.folder)
        estimate = estimate_memory(config, budget=p.engine.budget)
        by_mode = {mode: summarize(measured, p, mode, reference) for mode in p.modes()}
        rows.extend(by_mode.values())
        spec, ar = by_mode.get("spec"), by_mode["ar"]
        summary.append({
            "precision": p.name, "folder": str(p.folder), "quantization": config.graph.get("quantization"),
            "weights_bytes": estimate.weights, "kv_cache_bytes": estimate.kv_cache,
            "activation_bytes_estimate": estimate.activations, "peak_rss_mib": p.peak_mib,
            "speedup_spec_over_ar": spec["tokens_per_second"] / ar["tokens_per_second"] if spec else None,
            # The promise that quantization must keep: same tokens in both modes.
            "spec_equals_ar": None if spec is None else all(measured.same_as(arm_name(p.name, "spec"),
                                                                             arm_name(p.name, "ar"))),
        })
    return {"settings": settings, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "onnxruntime": ort.__version__},
            "method": __doc__.split("Method: ")[1].strip(),
            "prompts": [len(ids) for ids in prompt_ids], "precisions": summary, "rows": rows}


def render(report: dict[str, Any]):
    from rich import box
    from rich.table import Table

    settings = report["settings"]
    summary = {s["precision"]: s for s in report["precisions"]}
    table = Table(title=f"Precision on CPU: {len(report['prompts'])} prompts, {settings['max_new_tokens']} new tokens "
                        f"at most, {settings['threads']} threads, median of {settings['repeats']} repeats",
                  caption="×AR: speculative tok/s over the same precision's autoregressive tok/s. agree: mean "
                          "fraction of tokens before the first divergence from fp32 autoregressive greedy; same: "
                          "prompts identical to it. spec=AR: the two modes of one precision give the same tokens "
                          "(must hold). weights, KV (at max length) and peak RSS growth while loading and warming "
                          "up, in MiB.",
                  box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    for column in ("precision", "mode", "tok/s", "×AR", "tok/pass", "agree", "same", "spec=AR", "weights", "KV",
                   "peak"):
        table.add_column(column, justify="left" if column in ("precision", "mode") else "right", no_wrap=True,
                         min_width=len(column))
    prompts = len(report["prompts"])
    for row in report["rows"]:
        s = summary[row["precision"]]
        spec_row = row["mode"] == "spec"
        same = s["spec_equals_ar"]
        table.add_row(
            row["precision"], "spec" if spec_row else "AR", f"{row['tokens_per_second']:.1f}",
            fmt(s["speedup_spec_over_ar"], "{:.2f}×") if spec_row else "1.00×",
            fmt(row["tokens_per_pass"], "{:.2f}"), fmt(row.get("agreement_prefix"), "{:.0%}"),
            "n/a" if row.get("agreement_exact") is None else f"{row['agreement_exact']}/{prompts}",
            ("n/a" if same is None else "[green]yes[/]" if same else "[red]NO[/]"),
            f"{s['weights_bytes'] / MIB:.1f}", f"{s['kv_cache_bytes'] / MIB:.1f}", fmt(s["peak_rss_mib"], "{:.0f}"))
    return table


# ------------------------------------------------------------------------------ command line
def run(args: Any, say: Callable[[str], None]) -> dict[str, Any]:
    """The report of `streamspec bench precision` (tools/commands/bench_precision.py parses
    the options and prints; `say` logs the exports)."""
    from streamspec.tools.harness import load_prompts, progress, tokenize_prompts

    folders = resolve_folders(args.sources, args.precisions, args.out_dir, args.block_size, args.max_length,
                              args.force_export, args.quant_activations, say)
    records = load_prompts(args.prompts, args.num_prompts)
    prompt_ids = tokenize_prompts(next(iter(folders.values())), records)
    precisions = [Precision(name, folder) for name, folder in folders.items()]
    with progress(not args.no_progress) as show:
        for p in precisions:
            show(f"loading {p.name}")
            load(p, max(prompt_ids, key=len), args.max_new_tokens, args.threads, args.budget)
        measured = measure_precisions(precisions, prompt_ids, args.max_new_tokens, args.repeats, show)
    settings = {"sources": list(args.sources), "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
                "threads": args.threads, "budget": args.budget, "prompt_ids": [r.id for r in records]}
    return build_report(precisions, measured, prompt_ids, settings)


main = bench_main("precision")  # python -m streamspec.tools.bench_precision ARGS: streamspec bench precision ARGS

if __name__ == "__main__":
    sys.exit(main())
