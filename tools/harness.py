"""The measuring harness every benchmark runs on: `streamspec bench` (and its `precision`,
`pruning`, `attention`, `distill` benchmarks), `streamspec tune` and `streamspec profile`.

    prompts   one prompt-file format and reader (`load_prompts`, `read_prompt_file`)
    A/B loop  `measure`: arms (systems, settings) x prompts x repeats, the order of the
              arms reversed on every other turn, each call timed; `Measurement` gives
              the medians and compares outputs with a reference arm
    timer     `time_steps`: latency of single steps (no generation), interleaved
    memory    `MemorySampler`: resident memory before, at its peak during, and after a
              block (this process or another one)

Why one loop: an A/B figure is only as honest as its ordering. Every arm runs every
prompt once per repeat, back to back, so drifting machine load (another job, thermal
throttling) hits every arm alike; reversing the order on alternate turns keeps the
arm that goes first (cold caches, a spinning thread pool left by the previous arm) from
always being the same one.

Nothing here imports torch or onnxruntime: the profiler's torch-free path runs on it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

from streamspec.errors import StreamspecError

MIB = 1 << 20
DEFAULT_NUM_PROMPTS = 8  # of each domain, when the built-in prompts are used


# ------------------------------------------------------------------------------ prompts
@dataclass
class Prompt:
    """One line of a prompts file."""

    id: str
    messages: Optional[list[dict[str, Any]]] = None  # chat messages, or
    text: Optional[str] = None  # a plain prompt
    domain: str = ""  # the kind of request ("" in a file that names none)


def read_prompt_file(path: Union[str, Path]) -> list[Prompt]:
    """The one prompts-file format of every command. JSONL: per line an object with
    "messages" (a list of {"role", "content"} objects) or "prompt" (text), and optionally
    "id" and "domain" (what the committed held-out files carry). A `.txt` file instead
    holds one plain prompt per line. Blank lines are skipped; bad input is one sentence."""
    path = Path(path)
    if not path.is_file():
        raise StreamspecError(f"Cannot read the prompts file {path}: it does not exist.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        raise StreamspecError(f"Cannot read the prompts file {path} as UTF-8 text.") from None
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    if path.suffix == ".txt":
        prompts = [Prompt(f"{path.name}:{number}", text=line) for number, line in numbered]
    else:
        prompts = [_prompt_record(path, number, line) for number, line in numbered]
    if not prompts:
        raise StreamspecError(f"The prompts file {path} holds no prompts.")
    return prompts


def _prompt_record(path: Path, number: int, line: str) -> Prompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise StreamspecError(f"Line {number} of {path} is not valid JSON.") from None
    if not isinstance(record, dict):
        record = {}
    messages, text, domain = record.get("messages"), record.get("prompt"), record.get("domain", "")
    good_messages = (isinstance(messages, list) and messages
                     and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages))
    if not good_messages and not (isinstance(text, str) and text):
        raise StreamspecError(f"Line {number} of {path} has neither a \"messages\" list of "
                              "{\"role\", \"content\"} objects nor a non-empty \"prompt\" string.")
    if not isinstance(domain, str):
        raise StreamspecError(f"Line {number} of {path} has a \"domain\" that is not a string.")
    return Prompt(str(record.get("id", f"{path.name}:{number}")), messages=messages if good_messages else None,
                  text=None if good_messages else text, domain=domain)


def default_prompts_file() -> Optional[Path]:
    """The default model's held-out prompts of every domain (models/default/data), if installed."""
    path = Path(__file__).resolve().parent.parent / "models" / "default" / "data" / "heldout-prompts.jsonl"
    return path if path.is_file() else None


def load_prompts(path: Optional[Path], limit: Optional[int], domains: Optional[Sequence[str]] = None,
                 from_end: bool = False) -> list[Prompt]:
    """Prompts of a file, or by default the held-out prompts the default model's streams
    were not trained on (every domain; the standard-library harvest's held-out split
    where that file is not installed).

    Per domain, the first `limit` prompts are kept (`DEFAULT_NUM_PROMPTS` by default for
    the built-in prompts, all of a file's), or with `from_end` the last ones (tune takes
    each domain's prompts from the end and bench from the start, so the two do not share
    a prompt while a domain holds enough). `domains` keeps only those domains, in file order."""
    if limit is not None and limit < 1:
        raise StreamspecError(f"--num-prompts must be at least 1, got {limit}.")
    if path is None:
        path = default_prompts_file()
        limit = limit or DEFAULT_NUM_PROMPTS
    if path is None:
        from streamspec.models.prompts import collect_prompts

        # The whole harvest (not collect_prompts' `limit` mode, which samples files) keeps
        # the held-out split and its order fixed for a given Python.
        prompts = [Prompt(r["id"], messages=r["messages"], domain="stdlib")
                   for r in collect_prompts() if r["split"] == "heldout"]
    else:
        prompts = read_prompt_file(path)
    if domains:
        known = sorted({p.domain for p in prompts})
        missing = [d for d in domains if d not in known]
        if missing:
            raise StreamspecError(f"The prompts hold no domain {missing[0]!r}; they hold "
                                  f"{', '.join(repr(d) for d in known)}.")
        prompts = [p for p in prompts if p.domain in domains]
    taken: dict[str, int] = {}
    kept = []
    for prompt in (reversed(prompts) if from_end else prompts):
        seen = taken.get(prompt.domain, 0)
        taken[prompt.domain] = seen + 1
        if limit is None or seen < limit:
            kept.append(prompt)
    return kept[::-1] if from_end else kept


def tokenize_prompts(folder: Path, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Prompt token ids through the exported folder's tokenizer and chat template: the
    one tokenisation every arm gets (a plain prompt goes in as a user message when the
    folder has a chat template)."""
    from streamspec.runtime.folder import read_folder
    from streamspec.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer(read_folder(folder))
    ids = []
    for prompt in prompts:
        if prompt.messages is not None:
            ids.append(tokenizer.encode_chat(prompt.messages))
        elif tokenizer.template_source is not None:
            ids.append(tokenizer.encode_chat([{"role": "user", "content": prompt.text}]))
        else:
            ids.append(tokenizer.encode(prompt.text))
    return ids


# ------------------------------------------------------------------------------ the A/B loop
@dataclass
class Output:
    """What one generate call of an arm gives back."""

    ids: list  # new token ids (a batch system: one list per answer)
    passes: int = 0  # forward passes of the model, prefill included
    stats: Any = None  # the engine's GenerationStats, or whatever else the arm reports


@dataclass
class Run(Output):
    seconds: float = 0.0  # wall time of the generate call


@dataclass
class Arm:
    """One side of the comparison: a system, a setting, a precision."""

    name: str
    generate: Callable[[list[int]], Output]  # prompt ids -> output


@dataclass(frozen=True)
class Turn:
    """The run about to start (what a progress display shows)."""

    arm: str
    prompt: int
    repeat: int
    done: int  # runs finished before this one
    total: int
    prompts: int
    repeats: int

    def describe(self) -> str:
        return f"repeat {self.repeat + 1}/{self.repeats}, prompt {self.prompt + 1}/{self.prompts}: {self.arm}"


def arm_order(names: Sequence[str], repeat: int, prompt: int) -> list[str]:
    """The arms' order for one (repeat, prompt) turn: reversed when repeat + prompt is odd,
    so each prompt sees both orders across repeats and neighbouring prompts alternate."""
    return list(names) if (repeat + prompt) % 2 == 0 else list(names)[::-1]


def median_tokens_per_second(runs: Sequence[Run]) -> float:
    """New tokens / wall seconds of each run of one prompt: the median (a run disturbed
    by the machine moves a mean, not a median)."""
    return statistics.median(len(r.ids) / r.seconds for r in runs)


@dataclass
class Measurement:
    """Every timed run: runs[arm][prompt][repeat], and `order`, the (arm, prompt, repeat)
    triples in the order they ran."""

    arms: list[str]
    runs: dict[str, list[list[Run]]]
    order: list[tuple[str, int, int]] = field(default_factory=list)

    def firsts(self, arm: str) -> list[Run]:
        """Each prompt's first run (greedy decoding gives the same ids every repeat)."""
        return [runs[0] for runs in self.runs[arm]]

    def tokens_per_second(self, arm: str) -> float:
        """The mean over prompts of the per-prompt medians (every prompt weighs the same)."""
        return statistics.fmean(median_tokens_per_second(runs) for runs in self.runs[arm])

    def stable(self, arm: str) -> bool:
        """Whether every repeat of every prompt gave the ids of its first run."""
        return all(r.ids == runs[0].ids for runs in self.runs[arm] for r in runs)

    def same_as(self, arm: str, reference: str) -> list[bool]:
        """Per prompt: whether the arm's ids equal the reference arm's (first runs)."""
        return [a.ids == b.ids for a, b in zip(self.firsts(arm), self.firsts(reference))]

    def mismatches(self, reference: str) -> dict[str, list[int]]:
        """arm -> the prompts whose ids differ from the reference arm's (arms with none left out)."""
        out = {arm: [p for p, same in enumerate(self.same_as(arm, reference)) if not same] for arm in self.arms}
        return {arm: prompts for arm, prompts in out.items() if prompts}


def measure(arms: Sequence[Arm], prompt_ids: Sequence[Sequence[int]], repeats: int,
            warm_up: Optional[Sequence[int]] = None, show: Optional[Callable[[Turn], None]] = None,
            clock: Callable[[], float] = time.perf_counter) -> Measurement:
    """Run every arm on every prompt, `repeats` times, in alternating order (`arm_order`),
    timing each generate call with `clock`. `warm_up`: prompt ids every arm runs once,
    untimed, first (ONNX Runtime allocates and plans on first use of a shape)."""
    if repeats < 1:
        raise StreamspecError(f"--repeats must be at least 1, got {repeats}.")
    if not prompt_ids:
        raise StreamspecError("There are no prompts to run.")
    by_name = {arm.name: arm for arm in arms}
    if len(by_name) != len(arms):
        raise ValueError("arm names must be distinct")
    if warm_up is not None:
        for arm in arms:
            arm.generate(list(warm_up))
    result = Measurement(list(by_name), {name: [[] for _ in prompt_ids] for name in by_name})
    total = repeats * len(prompt_ids) * len(arms)
    for repeat in range(repeats):
        for index, ids in enumerate(prompt_ids):
            for name in arm_order(result.arms, repeat, index):
                if show is not None:
                    show(Turn(name, index, repeat, len(result.order), total, len(prompt_ids), repeats))
                start = clock()
                output = by_name[name].generate(list(ids))
                seconds = clock() - start
                result.runs[name][index].append(Run(list(output.ids), int(output.passes), output.stats, seconds))
                result.order.append((name, index, repeat))
    return result


def engine_arm(name: str, engine: Any, max_new_tokens: int, speculative: bool = True, budget: Optional[int] = None,
               lookup: Optional[int] = None, prune: Optional[float] = None, **options: Any) -> Arm:
    """An arm that runs `Engine.generate`. Several arms may share one engine (one loaded
    model, several tree settings): the given budget / lookup / prune are set before each
    call (`Engine.configure`, which checks them); None leaves the engine's own. `options`
    go to `generate` (ignore_eos, ...)."""

    def generate(ids: list[int]) -> Output:
        engine.configure(budget=budget, lookup=lookup, prune=prune)
        result = engine.generate(ids, max_new_tokens=max_new_tokens, speculative=speculative, **options)
        return Output(list(result.token_ids), result.stats.forward_passes, result.stats)

    return Arm(name, generate)


# ------------------------------------------------------------------------------ step latency
def timed(work: Callable[[], Any]) -> float:
    """Seconds one call of `work` takes."""
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def time_steps(steps: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1,
               settle: bool = False) -> dict[str, list[float]]:
    """Seconds of `repeats` calls of each step, the steps interleaved (order reversed every
    other repeat), after `warmup` untimed calls each.

    settle: run each step once, untimed, right before its timed call. After a run, ONNX
    Runtime's worker threads spin for a while waiting for more work; when two sessions
    alternate, the other one's spinning threads would steal the cores from the timed step."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(repeats):
        for name in arm_order(list(steps), repeat, 0):
            if settle:
                steps[name]()
            times[name].append(timed(steps[name]))
    return times


# ------------------------------------------------------------------------------ memory
def rss_bytes(pid: Optional[int] = None) -> Optional[int]:
    """Resident memory of a process (default: this one) from Linux /proc, else psutil
    where installed; None where neither can tell."""
    value = _proc_status_bytes("VmRSS", pid)
    if value is not None:
        return value
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except Exception:  # no psutil, or the process has gone
        return None


def peak_rss_bytes() -> Optional[int]:
    """The highest resident memory this process has had (the kernel's high-water mark)."""
    peak = _proc_status_bytes("VmHWM")
    if peak is None:
        try:
            import resource  # kilobytes on Linux, bytes on macOS

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if platform.system() == "Darwin" else 1024)
        except (ImportError, OSError):
            peak = None
    return peak


def _proc_status_bytes(key: str, pid: Optional[int] = None) -> Optional[int]:
    try:
        with open(f"/proc/{pid or 'self'}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so that the next
    measurement's baseline is not lowered by memory an earlier one freed but still held."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemorySampler:
    """A process's resident memory before a block, its peak while the block runs (sampled
    every `interval` seconds by a thread, plus at both ends) and after it. Bytes; None
    where the memory cannot be read.

        with MemorySampler(release=True) as memory:   # this process
            load(); warm_up()
        memory.peak_growth_mib, memory.resident_growth_mib

    release: first hand freed memory back to the OS (this process only), so that the
    growth counts what the block added."""

    def __init__(self, pid: Optional[int] = None, interval: float = 0.002, release: bool = False):
        self.pid, self.interval, self.release = pid, interval, release
        self.before: Optional[int] = None
        self.peak: Optional[int] = None
        self.after: Optional[int] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _read(self) -> None:
        now = rss_bytes(self.pid)
        if now is not None:
            self.peak = max(self.peak or 0, now)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._read()

    def start(self) -> "MemorySampler":
        if self.release and self.pid is None:
            release_freed_memory()
        self.before = self.peak = rss_bytes(self.pid)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.after = rss_bytes(self.pid)
        self._read()

    def __enter__(self) -> "MemorySampler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def peak_growth_mib(self) -> Optional[float]:
        return None if self.before is None else (self.peak - self.before) / MIB

    @property
    def resident_growth_mib(self) -> Optional[float]:
        return None if self.before is None or self.after is None else (self.after - self.before) / MIB


# ------------------------------------------------------------------------------ reports and display
def write_report(report: dict[str, Any], path: Path) -> None:
    """The JSON report, written atomically: a failed write leaves an earlier report as it was."""
    from streamspec.files import write_text

    try:
        write_text(path, json.dumps(report, indent=1) + "\n")
    except OSError as error:
        raise StreamspecError(f"The report cannot be written to {path} ({error.strerror}).") from None


def fmt(value: Optional[float], pattern: str) -> str:
    """A table cell: `pattern` filled with the value, or n/a."""
    return "n/a" if value is None else pattern.format(value)


@contextlib.contextmanager
def progress(enabled: bool) -> Iterator[Callable[[Union[str, Turn]], None]]:
    """A one-line rich progress display on stderr; yields `show(what)`: a Turn (from
    `measure`) moves the bar, a string names a step outside the timed loop."""
    if not enabled:
        yield lambda what: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def show(what: Union[str, Turn]) -> None:
            if isinstance(what, Turn):
                bar.update(task, description=what.describe(), completed=what.done, total=what.total)
            else:
                bar.update(task, description=what)

        yield show
