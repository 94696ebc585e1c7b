"""`streamspec bench`: streamspec against the usual ways of running the same model.

One process, one run, the same weights, the same tokenised prompts, greedy decoding
and the same `max_new_tokens` and end-of-sequence rule for every system:

    streamspec       the exported folder, speculative (`Engine.generate`)
    streamspec-ar    the same folder, autoregressive (`speculative=False`)
    optimum          optimum's ORTModelForCausalLM, IO binding, exported once into the cache
    transformers     `generate`, greedy, PyTorch
    prompt-lookup    `generate` with prompt-lookup assisted decoding
    ort-genai        onnxruntime-genai, greedy (model built once into the cache)
    llama-cpp        llama.cpp through llama-cpp-python, greedy, on the base's own GGUF

Each system is an adapter with `generate(prompt_ids, max_new_tokens) -> (ids, passes)`.
Every system loads once and runs one warm-up generation; then each repeat runs every
prompt on every system in turn, the order reversed on alternate turns (A B C D, D C B A,
...: `tools/harness.py`), so drifting machine load hits all systems alike. Tokens/s is
new tokens over the wall time of the whole generate call (prefill included), the median
of the repeats per prompt, then the mean over prompts.

Heavy imports (torch, transformers, optimum, onnxruntime-genai) happen inside the
adapters, so `streamspec bench --help` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

from streamspec.errors import StreamspecError
from streamspec.tools.harness import (  # noqa: F401 (load_prompts, tokenize_prompts, write_report: bench's API too)
    Arm, MemorySampler, Output, Run, fmt, load_prompts, measure, median_tokens_per_second, tokenize_prompts,
    write_report)
from streamspec.tools.harness import progress as progress_display

if TYPE_CHECKING:
    from streamspec.runtime.folder import DeployConfig

# ------------------------------------------------------------------------------ per domain
def domain_summary(report: dict[str, Any], domains: Sequence[str], speculative: str = "streamspec",
                   autoregressive: str = "streamspec-ar") -> list[dict[str, Any]]:
    """Per domain (in first-seen order), then "mean" (every domain weighing the same):
    prompts, the speculative system's tokens per pass (pooled over the domain's prompts,
    prefill included), both systems' tok/s (mean of per-prompt medians), the speed-up
    and how many outputs are identical to the autoregressive system's."""
    rows = {r["system"]: r for r in report["systems"] if r["status"] == "ok"}
    if speculative not in rows or autoregressive not in rows:
        return []
    out = []
    for domain in dict.fromkeys(domains):
        index = [i for i, d in enumerate(domains) if d == domain]
        spec = [rows[speculative]["per_prompt"][i] for i in index]
        ar = [rows[autoregressive]["per_prompt"][i] for i in index]
        entry = {"domain": domain or "(none)", "prompts": len(index),
                 "tokens_per_pass": sum(p["new_tokens"] for p in spec) / max(sum(p["forward_passes"] for p in spec), 1),
                 "tokens_per_second": statistics.fmean(p["tokens_per_second"] for p in spec),
                 "ar_tokens_per_second": statistics.fmean(p["tokens_per_second"] for p in ar),
                 "identical": sum(a["token_ids"] == b["token_ids"] for a, b in zip(spec, ar))}
        entry["speedup"] = entry["tokens_per_second"] / entry["ar_tokens_per_second"]
        out.append(entry)
    if len(out) > 1:
        mean = {key: statistics.fmean(e[key] for e in out)
                for key in ("tokens_per_pass", "tokens_per_second", "ar_tokens_per_second", "speedup")}
        out.append({"domain": "mean", "prompts": sum(e["prompts"] for e in out),
                    "identical": sum(e["identical"] for e in out), **mean})
    return out


def render_domains(rows: list[dict[str, Any]]):
    """The per-domain summary as a rich Table."""
    from rich import box
    from rich.table import Table

    table = Table(title="per domain: speculative vs autoregressive, same folder", box=box.SIMPLE_HEAD,
                  show_edge=False, padding=(0, 1, 0, 0),
                  caption="tok/pass: tokens per forward pass, pooled over the domain's prompts (prefill included); "
                          "speed-up: speculative / autoregressive tok/s; mean: every domain weighs the same.")
    for header in ("domain", "prompts", "tok/pass", "spec tok/s", "AR tok/s", "speed-up", "identical"):
        table.add_column(header, justify="left" if header == "domain" else "right", no_wrap=True)
    for row in rows:
        same = f"{row['identical']}/{row['prompts']}"
        table.add_row(row["domain"], str(row["prompts"]), f"{row['tokens_per_pass']:.2f}",
                      f"{row['tokens_per_second']:.1f}", f"{row['ar_tokens_per_second']:.1f}",
                      f"{row['speedup']:.2f}×",
                      f"[green]{same}[/]" if row["identical"] == row["prompts"] else f"[red]{same}[/]")
    return table


# ------------------------------------------------------------------------------ settings
@dataclass
class BenchSettings:
    """What every adapter needs to know."""

    folder: Path  # the exported streamspec folder
    hf_folder: Optional[Path]  # a Hugging Face folder with the same weights (None: no HF-based system)
    threads: int
    eos_token_ids: list[int]  # the folder's (streamspec.json), used by every system
    vocab_size: int
    ignore_eos: bool = False
    prompt_lookup_tokens: int = 10
    genai_folder: Optional[Path] = None  # a ready onnxruntime-genai folder (else built into the cache)
    cache: Optional[Path] = None  # where optimum / genai exports are kept (default: the streamspec cache)
    notes: list[str] = field(default_factory=list)  # caveats the report should carry

    @property
    def stop_ids(self) -> list[int]:
        """The ids that end a generation: none when EOS is ignored."""
        return [] if self.ignore_eos else list(self.eos_token_ids)


def make_settings(folder: Path, systems: Sequence[str], threads: int, ignore_eos: bool = False,
                  hf_folder: Optional[Path] = None, **options: Any) -> BenchSettings:
    """Settings for an exported folder. The Hugging Face folder (needed only by the
    PyTorch and optimum/genai systems) is `hf_folder`, else the one the export records."""
    from streamspec.runtime.folder import read_folder

    config = read_folder(folder)
    if threads < 1:
        raise StreamspecError(f"--threads must be at least 1, got {threads}.")
    notes = []
    if any(ADAPTERS[name].needs_hf for name in check_systems(systems)):
        hf_folder = _hf_folder(config, hf_folder)
        streams = config.raw.get("streams") or {}
        if streams.get("mode") == "shared":
            notes.append("The folder's main stream was trained in shared mode, so the Hugging Face systems run "
                         "the base weights and their outputs are not expected to match.")
        if config.dtype != "fp32":
            notes.append(f"The folder is {config.dtype} while the Hugging Face systems run fp32.")
    return BenchSettings(Path(folder), hf_folder, threads, config.eos_token_ids, config.vocab_size, ignore_eos,
                         notes=notes, **options)


def _hf_folder(config: "DeployConfig", given: Optional[Path]) -> Path:
    """The Hugging Face folder of the folder's base weights."""
    from streamspec.models.loading import resolve_base

    if given is not None:
        return resolve_base(given)
    source = config.raw.get("source") or {}
    if source.get("kind") == "base":
        return resolve_base(source.get("name"))
    if source.get("kind") == "checkpoint":
        from streamspec.models.checkpoint import read_checkpoint_info

        return read_checkpoint_info(source.get("name")).base_folder
    raise StreamspecError(f"{config.folder} does not record the Hugging Face folder it was exported from; "
                          "pass it with --hf-model.")


def cut(tokens: Sequence[int], max_new_tokens: int, eos: Sequence[int]) -> list[int]:
    """At most `max_new_tokens` tokens, ending at the first end-of-sequence token (kept),
    the rule `Engine` follows, applied to every system's output."""
    tokens = [int(t) for t in tokens[:max_new_tokens]]
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i + 1]
    return tokens


# ------------------------------------------------------------------------------ adapters
class Adapter:
    """One system. `unavailable` says (before anything is loaded) why it cannot run
    here; `prepare` does one-off work outside the memory measurement (exports);
    `load` builds what `generate` runs."""

    name = ""
    label = ""
    needs_hf = False  # runs the Hugging Face folder rather than the streamspec folder

    def __init__(self, settings: BenchSettings):
        self.settings = settings

    def unavailable(self) -> Optional[str]:
        return None

    def caveat(self) -> Optional[str]:
        """A remark the report should carry next to this system's figures."""
        return None

    def prepare(self) -> None:
        pass

    def load(self) -> None:
        raise NotImplementedError

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], int]:
        """(new token ids, forward passes of the model, prefill included)."""
        raise NotImplementedError


class StreamspecAdapter(Adapter):
    speculative = True
    name, label = "streamspec", "streamspec speculative"

    def unavailable(self) -> Optional[str]:
        from streamspec.runtime.folder import read_folder

        if self.speculative and read_folder(self.settings.folder).num_streams == 0:
            return "the folder has no streams (a plain base-model export), so it cannot speculate"
        return None

    def prepare(self) -> None:
        _preload("streamspec.runtime.engine")

    def load(self) -> None:
        from streamspec.runtime import Engine

        # CPU like the PyTorch systems, so every ratio compares the same device; fallback
        # off, so that the speculative row measures speculation, paying or not.
        self.engine = Engine(self.settings.folder, provider="cpu", threads=self.settings.threads, fallback=False)

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], int]:
        result = self.engine.generate(prompt_ids, max_new_tokens=max_new_tokens, speculative=self.speculative,
                                      ignore_eos=self.settings.ignore_eos)
        return result.token_ids, result.stats.forward_passes


class StreamspecARAdapter(StreamspecAdapter):
    speculative = False
    name, label = "streamspec-ar", "streamspec AR"


def _preload(*modules: str) -> None:
    """Import libraries before a system's memory is measured: their code is shared by
    every system that uses them, not part of any one system's footprint."""
    for name in modules:
        importlib.import_module(name)


def count_forward_calls(model: Any) -> list[int]:
    """Wrap `model.forward` so each call adds one to the returned counter. torch modules
    and optimum's ORT models both call `self.forward` from `__call__`."""
    counter = [0]
    original = model.forward

    @functools.wraps(original)  # generate() inspects forward's signature
    def forward(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return original(*args, **kwargs)

    model.forward = forward
    return counter


class TransformersAdapter(Adapter):
    """`generate` of transformers (and of anything built on its GenerationMixin)."""

    name, label = "transformers", "transformers greedy"
    needs_hf = True

    def prepare(self) -> None:
        _preload("torch", "transformers.generation")

    def load(self) -> None:
        import torch

        from streamspec.models.loading import load_base_model

        torch.set_num_threads(self.settings.threads)
        self.model = load_base_model(self.settings.hf_folder)
        self.passes = count_forward_calls(self.model)

    def generation_options(self) -> dict[str, Any]:
        return {}

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], int]:
        import torch
        from transformers import GenerationConfig

        eos = self.settings.stop_ids
        # Ignoring EOS: an id outside the vocabulary, which no step can produce. (None
        # would do for greedy but breaks prompt lookup; min_new_tokens would *forbid*
        # EOS, unlike Engine(ignore_eos=True), which lets it be generated.)
        stop = list(eos) or [self.settings.vocab_size]
        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=stop,
                                  pad_token_id=stop[0], **self.generation_options())
        input_ids = torch.tensor([prompt_ids], dtype=torch.long)
        self.passes[0] = 0
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # use_model_defaults=False (transformers 4.5x): nothing from the folder's
            # generation_config.json (a repetition penalty, say) changes the greedy rule;
            # transformers 5 refuses the option (the rows' outputs are checked against
            # autoregressive either way).
            out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
                                      **_no_model_defaults())
        # Assisted decoding can overshoot max_new_tokens by its last accepted run.
        return cut(out[0, len(prompt_ids):].tolist(), max_new_tokens, eos), self.passes[0]


def _no_model_defaults() -> dict:
    import transformers

    return {"use_model_defaults": False} if int(transformers.__version__.split(".")[0]) < 5 else {}


class PromptLookupAdapter(TransformersAdapter):
    name, label = "prompt-lookup", "HF prompt lookup"

    def generation_options(self) -> dict[str, Any]:
        return {"prompt_lookup_num_tokens": self.settings.prompt_lookup_tokens}


class OptimumAdapter(TransformersAdapter):
    """optimum's ORTModelForCausalLM: its ONNX export of the Hugging Face folder, made once
    into the cache, run with IO binding; generation is transformers' `generate`."""

    name, label = "optimum", "optimum ORTModel"

    def unavailable(self) -> Optional[str]:
        if importlib.util.find_spec("optimum.onnxruntime") is None:
            return "optimum's ONNX Runtime support is not installed (pip install optimum-onnx)"
        return None

    def prepare(self) -> None:
        _preload("torch", "transformers.generation", "optimum.onnxruntime")
        self.onnx_folder = cached_build("optimum", self.settings.hf_folder, self.settings.cache, self._export)

    def _export(self, out: Path) -> None:
        from optimum.onnxruntime import ORTModelForCausalLM

        with _quiet():  # the exporter prints pages of tracer warnings
            ORTModelForCausalLM.from_pretrained(str(self.settings.hf_folder), export=True).save_pretrained(str(out))

    def load(self) -> None:
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM

        torch.set_num_threads(self.settings.threads)  # the host side of generate() is torch
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.settings.threads
        with _quiet():
            self.model = ORTModelForCausalLM.from_pretrained(str(self.onnx_folder), provider="CPUExecutionProvider",
                                                             session_options=options, use_io_binding=True)
        self.passes = count_forward_calls(self.model)


class GenaiAdapter(Adapter):
    """onnxruntime-genai greedy; its own model builder makes the ONNX folder once."""

    name, label = "ort-genai", "onnxruntime-genai"
    needs_hf = True

    def unavailable(self) -> Optional[str]:
        if importlib.util.find_spec("onnxruntime_genai") is None:
            return "onnxruntime_genai is not importable (pip install onnxruntime-genai)"
        return None

    def prepare(self) -> None:
        _preload("onnxruntime_genai")
        self.model_folder = self.settings.genai_folder or cached_build(
            "genai", self.settings.hf_folder, self.settings.cache, self._build)

    def _build(self, out: Path) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i",
                                   str(self.settings.hf_folder), "-o", str(out), "-p", "fp32", "-e", "cpu",
                                   "-c", scratch], capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise StreamspecError(f"onnxruntime-genai's model builder failed ({last}).")

    def caveat(self) -> Optional[str]:
        if self.settings.ignore_eos:
            return ("genai cannot generate past an end-of-sequence token, so with --ignore-eos it forbids them "
                    "(min_length) and its ids may differ from the first one on")
        return None

    def load(self) -> None:
        import onnxruntime_genai as og

        config = og.Config(str(self.model_folder))
        # The same threads and end-of-sequence ids as every other system. (genai checks
        # that ids lie in the vocabulary and ignores an empty list, so --ignore-eos keeps
        # the folder's ids and forbids them in `generate` instead.)
        config.overlay(json.dumps({"model": {
            "eos_token_id": self.settings.eos_token_ids,
            "decoder": {"session_options": {"intra_op_num_threads": self.settings.threads}}}}))
        self.og, self.model = og, og.Model(config)

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], int]:
        params = self.og.GeneratorParams(self.model)
        # Plain greedy whatever genai_config.json's search section says (as use_model_defaults=False above).
        length = len(prompt_ids) + max_new_tokens
        params.set_search_options(do_sample=False, num_beams=1, repetition_penalty=1.0, max_length=length,
                                  min_length=length if self.settings.ignore_eos else 0)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(prompt_ids)
        new: list[int] = []
        while not generator.is_done() and len(new) < max_new_tokens:
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
        # Plain autoregressive decoding: one forward pass per new token, prefill included.
        return cut(new, max_new_tokens, self.settings.stop_ids), len(new)


class LlamaCppAdapter(Adapter):
    """llama.cpp (through llama-cpp-python), greedy, on the base model's own GGUF file:
    the reference point for a quantized CPU folder. Only a base that came from a GGUF
    has one."""

    name, label = "llama-cpp", "llama.cpp (llama-cpp-python)"
    needs_hf = True

    def unavailable(self) -> Optional[str]:
        if importlib.util.find_spec("llama_cpp") is None:
            return "llama_cpp is not importable (pip install llama-cpp-python; it builds llama.cpp from source)"
        if self._gguf() is None:
            return "the base model is no GGUF file, so llama.cpp has nothing of the same weights to run"
        return None

    def _gguf(self) -> Optional[Path]:
        from streamspec.exporter.gguf_blocks import gguf_source

        return gguf_source(self.settings.hf_folder)

    def prepare(self) -> None:
        _preload("llama_cpp")

    def load(self) -> None:
        from llama_cpp import Llama

        with _quiet():
            self.model = Llama(str(self._gguf()), n_ctx=4096, n_threads=self.settings.threads,
                               n_threads_batch=self.settings.threads, verbose=False)

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], int]:
        self.model.reset()  # no prompt reuse from the previous generation: every system prefills
        new: list[int] = []
        for token in self.model.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                         reset=True):
            new.append(int(token))
            if len(new) >= max_new_tokens or token in self.settings.stop_ids:
                break
        # One forward pass per new token, the prefill included (the last token is not evaluated).
        return cut(new, max_new_tokens, self.settings.stop_ids), len(new)


ADAPTERS: dict[str, type[Adapter]] = {cls.name: cls for cls in (
    StreamspecAdapter, StreamspecARAdapter, OptimumAdapter, TransformersAdapter, PromptLookupAdapter, GenaiAdapter,
    LlamaCppAdapter)}
SYSTEMS = tuple(ADAPTERS)
REFERENCE = "transformers"  # outputs are compared with this system's


def check_systems(names: Sequence[str]) -> list[str]:
    """The named systems in the canonical order; one sentence for an unknown name."""
    for name in names:
        if name not in ADAPTERS:
            raise StreamspecError(f"Unknown system {name!r} in --only; choose from {', '.join(SYSTEMS)}.")
    return [name for name in SYSTEMS if name in names]


def cached_build(kind: str, hf_folder: Path, cache: Optional[Path], build: Callable[[Path], None]) -> Path:
    """`build(folder)` once into <cache>/bench/<kind>/<name>-<weights sha256 prefix>; the
    folder is renamed into place when complete, so a failed build leaves nothing."""
    from streamspec.models.loading import base_fingerprint, cache_root

    dest = (cache or cache_root()) / "bench" / kind / f"{hf_folder.name}-{base_fingerprint(hf_folder)[:12]}"
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is not
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # not a lost race with another bench: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence warnings and library chatter on stdout/stderr, at the file-descriptor
    level since exporters also print from C++; errors still propagate as exceptions."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


# ------------------------------------------------------------------------------ the run
@dataclass
class SystemState:
    adapter: Adapter
    note: Optional[str] = None  # why it was skipped
    peak_mib: Optional[float] = None
    resident_mib: Optional[float] = None
    runs: list[list[Run]] = field(default_factory=list)  # [prompt][repeat]


def run_bench(settings: BenchSettings, prompt_ids: list[list[int]], systems: Sequence[str], max_new_tokens: int,
              repeats: int, baseline: str = "optimum", progress: bool = True,
              prompt_names: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the benchmark and return the report (what `--json` writes)."""
    if max_new_tokens < 1 or repeats < 1:
        raise StreamspecError("--max-new-tokens and --repeats must be at least 1.")
    if not prompt_ids:
        raise StreamspecError("There are no prompts to run.")
    states = [SystemState(ADAPTERS[name](settings)) for name in check_systems(systems)]
    for state in states:
        if state.adapter.needs_hf and settings.hf_folder is None:
            state.note = "no Hugging Face folder of these weights was given"
        else:
            state.note = state.adapter.unavailable()
    with progress_display(progress) as show:
        # Warm up on the longest prompt: it allocates the most, so the memory peak is its.
        longest = max(prompt_ids, key=len)
        for state in (s for s in states if s.note is None):
            show(f"setting up {state.adapter.name}")
            _set_up(state, longest, max_new_tokens)
        active = [s for s in states if s.note is None]
        arms = [Arm(s.adapter.name, functools.partial(_generate, s.adapter, max_new_tokens)) for s in active]
        measured = measure(arms, prompt_ids, repeats, show=show)
    for state in active:
        state.runs = measured.runs[state.adapter.name]
    return build_report(settings, prompt_ids, states, max_new_tokens, repeats, baseline,
                        list(prompt_names) if prompt_names else [str(i) for i in range(len(prompt_ids))])


def _generate(adapter: Adapter, max_new_tokens: int, prompt_ids: list[int]) -> Output:
    return Output(*adapter.generate(prompt_ids, max_new_tokens))


def _set_up(state: SystemState, warm_up_ids: list[int], max_new_tokens: int) -> None:
    """Prepare, then load and warm up under the memory sampler. What it measures: the
    growth of this process's RSS from just before the system loaded (after freed memory
    went back to the OS) to its peak while loading and running one generation, i.e. the
    weights, sessions, arenas and caches that this system adds. Systems stay loaded
    side by side, and each loads its own copy of the weights, so the figures add up.
    Shared libraries another system already mapped are not counted again."""
    try:
        state.adapter.prepare()
    except Exception as error:  # a failed export or build skips the system, with the reason
        state.note = f"could not be prepared: {_sentence(error)}"
        return
    try:
        with MemorySampler(release=True) as memory:
            state.adapter.load()
            state.adapter.generate(list(warm_up_ids), max_new_tokens)
    except StreamspecError:
        raise
    except Exception as error:
        state.note = f"could not be loaded: {_sentence(error)}"
        return
    state.peak_mib, state.resident_mib = memory.peak_growth_mib, memory.resident_growth_mib


def _sentence(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:300]


# ------------------------------------------------------------------------------ the report
def build_report(settings: BenchSettings, prompt_ids: list[list[int]], states: list[SystemState],
                 max_new_tokens: int, repeats: int, baseline: str, prompt_names: list[str]) -> dict[str, Any]:
    """Per-prompt medians, then means over prompts; equality with the reference system."""
    by_name = {s.adapter.name: s for s in states}
    reference = by_name.get(REFERENCE)
    reference_ids = [runs[0].ids for runs in reference.runs] if reference and reference.runs else None
    rows = []
    for state in states:
        row: dict[str, Any] = {"system": state.adapter.name, "label": state.adapter.label,
                               "status": "ok" if state.runs else "skipped",
                               "note": state.note if not state.runs else state.adapter.caveat()}
        if state.runs:
            row.update(_summary(state, reference_ids))
        rows.append(row)
    base = next((r for r in rows if r["system"] == baseline and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] == "ok":
            row["ratio_to_baseline"] = row["tokens_per_second"] / base["tokens_per_second"] if base else None
    return {
        "streamspec_version": _version("streamspec"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"folder": str(settings.folder),
                     "hf_folder": str(settings.hf_folder) if settings.hf_folder else None,
                     "threads": settings.threads, "max_new_tokens": max_new_tokens, "repeats": repeats,
                     "ignore_eos": settings.ignore_eos, "eos_token_ids": settings.eos_token_ids,
                     "prompt_lookup_tokens": settings.prompt_lookup_tokens, "baseline": baseline,
                     "reference": REFERENCE},
        "notes": settings.notes,
        "method": ("tokens_per_second: new tokens / wall seconds of one generate call (prefill included), median "
                   "over repeats per prompt, mean over prompts; tokens_per_pass and passes_per_token: pooled over "
                   "prompts, prefill included; peak_rss_mib: growth of the process RSS from before the system "
                   "loaded to its peak while loading and running the warm-up on the longest prompt"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "versions": {name: _version(name) for name in ("onnxruntime", "torch", "transformers",
                                                                    "optimum-onnx", "onnxruntime-genai")}},
        "prompts": [{"id": name, "prompt_tokens": len(ids)} for name, ids in zip(prompt_names, prompt_ids)],
        "systems": rows,
    }


def _summary(state: SystemState, reference_ids: Optional[list[list[int]]]) -> dict[str, Any]:
    per_prompt = []
    for p, runs in enumerate(state.runs):
        first = runs[0]
        equal = None if reference_ids is None else first.ids == reference_ids[p]
        per_prompt.append({
            "new_tokens": len(first.ids), "forward_passes": first.passes,
            "seconds": [r.seconds for r in runs],
            "tokens_per_second": median_tokens_per_second(runs),
            # Greedy decoding must give the same ids every repeat; False flags a problem.
            "stable": all(r.ids == first.ids for r in runs),
            "equal_to_reference": equal, "token_ids": first.ids})
    tokens = sum(p["new_tokens"] for p in per_prompt)
    passes = sum(p["forward_passes"] for p in per_prompt)
    equal = [p["equal_to_reference"] for p in per_prompt]
    return {
        "tokens_per_second": statistics.fmean(p["tokens_per_second"] for p in per_prompt),
        "tokens_per_pass": tokens / passes if passes else None,
        "passes_per_token": passes / tokens if tokens else None,
        "new_tokens": tokens, "forward_passes": passes,
        "peak_rss_mib": state.peak_mib, "resident_rss_mib": state.resident_mib,
        "equal_prompts": None if reference_ids is None else sum(equal), "prompts": len(per_prompt),
        "per_prompt": per_prompt,
    }


def _version(distribution: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def render_table(report: dict[str, Any]):
    """The report as a rich Table (skipped systems show n/a; their reasons follow it)."""
    from rich import box
    from rich.table import Table

    settings = report["settings"]
    prompts = len(report["prompts"])
    table = Table(title=f"streamspec bench: {_plural(prompts, 'prompt')}, {settings['max_new_tokens']} new tokens "
                        f"at most, {settings['threads']} threads",
                  caption=f"tok/s: new tokens / wall time of each generate call (prefill included), median of "
                          f"{_plural(settings['repeats'], 'repeat')} per prompt, mean over the prompts. "
                          f"×{settings['baseline']}: tok/s ratio. tok/pass (mean accepted length) and pass/tok: "
                          "pooled over prompts, prefill included. Peak MiB: growth of this process's resident memory "
                          "while the system loaded and ran its warm-up. Same ids: prompts whose token ids equal "
                          f"{settings['reference']} greedy's.", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    table.add_column("system", no_wrap=True)
    for header in ("tok/s", f"×{settings['baseline']}", "tok/pass", "pass/tok", "peak MiB", "same ids"):
        table.add_column(header, justify="right", no_wrap=True, min_width=len(header))
    for row in report["systems"]:
        if row["status"] != "ok":
            table.add_row(row["label"], *(["[dim]n/a[/]"] * 6))
            continue
        equal = "n/a" if row["equal_prompts"] is None else f"{row['equal_prompts']}/{row['prompts']}"
        if row["equal_prompts"] is not None:
            equal = f"[green]{equal}[/]" if row["equal_prompts"] == row["prompts"] else f"[red]{equal}[/]"
        table.add_row(row["label"], f"{row['tokens_per_second']:.1f}", fmt(row["ratio_to_baseline"], "{:.2f}×"),
                      fmt(row["tokens_per_pass"], "{:.2f}"), fmt(row["passes_per_token"], "{:.3f}"),
                      fmt(row["peak_rss_mib"], "{:.0f}"), equal)
    return table


def row_notes(report: dict[str, Any]) -> list[str]:
    """Why systems were skipped, and remarks on those that ran."""
    return [f"{row['label']}: {row['note']}" for row in report["systems"] if row["note"]]


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")
