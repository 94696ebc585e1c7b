"""Running a profile: the generations, the device measurements, ONNX Runtime's own
profiler, assembled into one report (a plain dict; report.py saves and renders it).

Order matters for honest figures: a short warm-up generation (ORT allocates on first
use), the timed generations (speculative and, with compare_ar, autoregressive on the
same prompt, alternating which goes first: the harness's A/B loop), the step-latency
curve, the memory
reading, then the copy bandwidth (its buffers would otherwise be the peak memory), and
last ONNX Runtime's profiler on a second session of its own, because profiling slows
every run it records.
"""

from __future__ import annotations

import gc
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union

from streamspec import __version__
from streamspec.tools.harness import Arm, Output, Turn, engine_arm, measure, read_prompt_file

from . import figures
from .live import ProfileView
from .measure import COPY_BYTES, MemoryProbe, copy_bandwidth, latency_curve, system_info, weight_bytes
from .report import FORMAT, VERSION
from .trace import operator_table

DEFAULT_PROMPTS = (
    "Explain in a few sentences how a rainbow forms.",
    "Write a Python function that returns the n-th Fibonacci number, with a short docstring.",
)
WARMUP_TOKENS = 4
MODE_NAMES = {True: "speculative", False: "autoregressive"}  # as figures.generation_record names them
ORT_PROFILE_TOKENS = 24  # enough decode steps for stable operator shares, few enough for a small trace


@dataclass
class ProfileSettings:
    """What to profile and how (the `streamspec profile` options)."""

    folder: Union[str, Path]
    prompts: list[Any] = field(default_factory=lambda: list(DEFAULT_PROMPTS))  # text, chat messages or token ids
    provider: str = "auto"
    max_new_tokens: int = 64
    compare_ar: bool = False
    budget: Optional[int] = None
    prune: Optional[float] = None  # tree-pruning threshold (None: the folder's)
    threads: Optional[int] = None
    max_length: Optional[int] = None
    ignore_eos: bool = False
    ort_profile: bool = True
    curve_repeats: int = 3
    copy_bytes: int = COPY_BYTES


def load_prompts(path: Union[str, Path], chat: bool = False) -> list[Any]:
    """The prompts of a prompts file (`harness.read_prompt_file`: JSONL, or plain text
    one per line in a .txt file) as the engine takes them: chat messages, or text. With
    `chat`, text prompts become a user message through the model's chat template."""
    prompts = read_prompt_file(path)
    return [p.messages if p.messages is not None else as_chat(p.text) if chat else p.text for p in prompts]


def as_chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def run_profile(settings: ProfileSettings, view: Optional[ProfileView] = None) -> dict[str, Any]:
    """Profile an exported folder; returns the report (see report.py for its rendering)."""
    from streamspec.runtime import Engine  # onnxruntime loads here, not at CLI start

    view = view or ProfileView()
    # fallback off: the profile measures speculation itself, step by step, paying or not.
    engine = Engine(settings.folder, provider=settings.provider, max_length=settings.max_length,
                    budget=settings.budget, threads=settings.threads, fallback=False, prune=settings.prune)
    device, config = engine.session.device, engine.config
    probe = MemoryProbe(device)
    view.begin(f"streamspec profile · {Path(settings.folder).name} · {device}", engine.max_length,
               config.num_streams, engine.budget, probe.sample)
    prompts = [engine.prompt_ids(p) for p in settings.prompts]
    for prompt in prompts:  # stream() checks its arguments before it runs: bad ones fail before any measurement
        engine.stream(prompt, max_new_tokens=settings.max_new_tokens, ignore_eos=settings.ignore_eos).close()

    view.status("warming up")
    engine.generate(prompts[0], max_new_tokens=min(WARMUP_TOKENS, settings.max_new_tokens), ignore_eos=True)

    modes = [True, False] if settings.compare_ar and engine.can_speculate else [engine.can_speculate]
    generations = _generations(engine, prompts, modes, settings, view)

    view.status("measuring the step-latency curve")
    curve = _curve(engine, generations, settings)
    memory = _memory(engine, generations, probe.sample(force=True))
    view.status("measuring copy bandwidth")
    bandwidth = copy_bandwidth(device, settings.copy_bytes)
    model = _model_info(engine, settings)
    del engine  # before the profiled session: one model in memory at a time
    gc.collect()
    view.status("running ONNX Runtime's profiler")
    ort_profile = _ort_profile(settings, prompts[0]) if settings.ort_profile else dict(
        available=False, reason="skipped (--no-ort-profile)")
    view.status("done")

    summary = figures.summary(generations)
    return dict(
        format=FORMAT, version=VERSION, streamspec_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        system=system_info(device), model=model,
        settings=dict(prompts=len(prompts), max_new_tokens=settings.max_new_tokens, compare_ar=settings.compare_ar,
                      ignore_eos=settings.ignore_eos, provider=settings.provider, threads=settings.threads,
                      curve_repeats=settings.curve_repeats),
        summary=summary, time_split=figures.time_split(generations), ort_profile=ort_profile,
        acceptance=figures.acceptance(generations, config.num_streams), latency_curve=curve,
        roofline=figures.roofline(model["weight_bytes"], bandwidth, summary, curve),
        compare_ar=figures.compare(generations), memory=memory, generations=generations)


def _generations(engine, prompts: list[list[int]], modes: list[bool], settings: ProfileSettings,
                 view: ProfileView) -> list[dict[str, Any]]:
    """Every prompt once per mode (the harness's loop: the modes alternate which goes
    first), each step recorded and shown live; the records in the order they ran."""

    def recorded(arm: Arm) -> Arm:
        """The arm with its steps kept (the engine's on_step) and its speed shown at the end."""

        def generate(ids: list[int]) -> Output:
            steps: list = []
            engine.on_step = lambda record: (steps.append(record), view.step(record))
            try:
                output = arm.generate(ids)
            finally:
                engine.on_step = None
            view.end_generation(arm.name, output.stats.tokens_per_second)
            return Output(output.ids, output.passes, (output.stats, steps))

        return Arm(arm.name, generate)

    def start(turn: Turn) -> None:
        view.start_generation(turn.arm, turn.prompt, turn.prompts, len(prompts[turn.prompt]))

    arms = [recorded(engine_arm(MODE_NAMES[speculative], engine, settings.max_new_tokens, speculative=speculative,
                                ignore_eos=settings.ignore_eos)) for speculative in modes]
    measured = measure(arms, prompts, repeats=1, show=start)
    records = []
    for mode, prompt, repeat in measured.order:
        run = measured.runs[mode][prompt][repeat]
        records.append(figures.generation_record(prompt, *run.stats, run.ids))
    return records


def _curve(engine, generations: list[dict], settings: ProfileSettings) -> dict[str, Any]:
    """The step-latency curve at a typical decode position: mid-answer of the prompts."""
    typical = sum(g["prompt_tokens"] + g["new_tokens"] // 2 for g in generations) // len(generations)
    rows_per_node = 1 + engine.config.num_streams
    # The folder's budget is marked even without streams: what such a tree would cost here.
    budget_nodes = engine.budget + 1
    past = max(min(typical, engine.max_length - rows_per_node * budget_nodes), 0)
    points = latency_curve(engine, past, repeats=settings.curve_repeats, extra=(budget_nodes,))
    ar = next(p for p in points if p["nodes"] == 1 and not p["drafting"])
    return dict(past_length=past, speculative=engine.can_speculate, budget_nodes=budget_nodes,
                rows_per_node=rows_per_node if engine.can_speculate else 1, autoregressive_ms=ar["median_ms"],
                points=points)


def _memory(engine, generations: list[dict], reading: dict[str, Any]) -> dict[str, Any]:
    peak = max((max(g["per_step"]["cache_rows"], default=g["prompt_tokens"] + 1) for g in generations), default=0)
    return dict(reading, kv_cache_bytes=_kv_cache_bytes(engine), peak_cache_rows=peak,
                max_length=engine.max_length, peak_cache_fill=peak / engine.max_length)


def _kv_cache_bytes(engine) -> int:
    cfg = engine.config
    itemsize = 2 if cfg.dtype == "fp16" else 4
    return 2 * cfg.num_layers * cfg.num_kv_heads * engine.max_length * cfg.head_dim * itemsize


def _model_info(engine, settings: ProfileSettings) -> dict[str, Any]:
    cfg = engine.config
    raw = cfg.raw
    return dict(name=Path(settings.folder).resolve().name, folder=str(Path(settings.folder).resolve()),
                source=(raw.get("source") or {}).get("name"), family=raw["model"].get("family"),
                num_layers=cfg.num_layers, hidden_size=raw["model"].get("hidden_size"), vocab_size=cfg.vocab_size,
                dtype=cfg.dtype, backend=cfg.backend, num_streams=cfg.num_streams,
                num_msa_layers=(raw.get("streams") or {}).get("num_msa_layers"), candidates=cfg.candidates,
                max_length=engine.max_length, budget=engine.budget, compaction=engine.session.compaction,
                weight_bytes=weight_bytes(cfg))


def _ort_profile(settings: ProfileSettings, prompt: list[int]) -> dict[str, Any]:
    """A short generation on a session with ONNX Runtime's profiler on; its trace's
    operators per decode step (the prefill run left out). The trace is deleted."""
    from streamspec.runtime import Engine

    with tempfile.TemporaryDirectory(prefix="streamspec-ort-") as folder:
        try:
            engine = Engine(settings.folder, provider=settings.provider, max_length=settings.max_length,
                            budget=settings.budget, threads=settings.threads, profile=str(Path(folder) / "ort"),
                            fallback=False)
            result = engine.generate(prompt, max_new_tokens=min(settings.max_new_tokens, ORT_PROFILE_TOKENS),
                                     ignore_eos=settings.ignore_eos)
            trace = engine.session.end_profiling()
            del engine
            if not trace:
                return dict(available=False, reason="onnxruntime wrote no trace")
            table = operator_table(trace, prefill_runs={0})
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            return dict(available=False, reason=f"failed ({type(error).__name__}: {str(error)[:120]})")
    table["tokens"] = result.stats.new_tokens
    return table

