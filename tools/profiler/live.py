"""The live view: what the profiler shows while it generates.

`ProfileView` is what the profiler calls; it shows nothing (quiet runs, tests).
`LiveView` keeps the latest figures and renders them whenever rich's `Live` refreshes
(from its own thread: state changes are single assignments and list appends, which
the refresh only reads). Memory is read there too, not in the timed steps: on CUDA it
runs nvidia-smi. Width adapts to the console, so a narrow terminal wraps labels
instead of breaking the layout.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from rich.console import Console, ConsoleOptions, RenderResult
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .charts import bar, sparkline
from .report import format_bytes

LABEL_WIDTH = 10


class ProfileView:
    """The profiler's progress reports; this base ignores them."""

    def begin(self, title: str, max_length: int, num_streams: int, budget: int,
              memory: Callable[[], dict[str, Any]]) -> None:
        """memory() returns the latest readings (measure.MemoryProbe.sample)."""

    def status(self, text: str) -> None:
        pass

    def start_generation(self, mode: str, prompt: int, prompts: int, prompt_tokens: int) -> None:
        pass

    def step(self, record: Any) -> None:
        """record: the engine's StepRecord."""

    def end_generation(self, mode: str, tokens_per_second: float) -> None:
        pass


class LiveView(ProfileView):
    """Tokens/s, accepted length per step (sparkline), tree size, KV cache fill, memory."""

    def __init__(self) -> None:
        self.title = "streamspec profile"
        self.max_length, self.num_streams, self.budget = 1, 0, 0
        self.state = "starting"
        self.mode, self.prompt, self.prompts = "", 0, 0
        self.accepted: list[int] = []  # this generation, per step
        self.tokens, self.tree_nodes, self.drafted_nodes, self.cache_rows = 0, 0, 0, 0
        self.started = time.perf_counter()
        self.finished: dict[str, list[float]] = {}  # mode -> tokens/s of finished generations
        self.memory: Callable[[], dict[str, Any]] = dict

    # -- what the profiler reports
    def begin(self, title: str, max_length: int, num_streams: int, budget: int,
              memory: Callable[[], dict[str, Any]]) -> None:
        self.title, self.max_length, self.num_streams, self.budget = title, max_length, num_streams, budget
        self.memory = memory

    def status(self, text: str) -> None:
        self.state = text

    def start_generation(self, mode: str, prompt: int, prompts: int, prompt_tokens: int) -> None:
        self.mode, self.prompt, self.prompts = mode, prompt, prompts
        self.accepted = []
        self.tokens, self.tree_nodes, self.drafted_nodes, self.cache_rows = 1, 0, 0, prompt_tokens
        self.state = "generating"
        self.started = time.perf_counter()

    def step(self, record: Any) -> None:
        self.accepted.append(record.accepted)
        self.tokens += record.committed
        self.tree_nodes, self.cache_rows = record.tree_nodes, record.cache_rows
        self.drafted_nodes = record.drafted_nodes

    def end_generation(self, mode: str, tokens_per_second: float) -> None:
        self.finished.setdefault(mode, []).append(tokens_per_second)

    # -- rendering
    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(options.max_width - LABEL_WIDTH - 7, 8)  # panel borders, padding, column gap
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold", width=LABEL_WIDTH, no_wrap=True)
        grid.add_column(overflow="fold")
        accepted = self.accepted
        steps = len(accepted)
        elapsed = time.perf_counter() - self.started
        grid.add_row("run", f"{self.mode or '-'} · prompt {self.prompt + 1}/{max(self.prompts, 1)} · "
                            f"step {steps} · {self.tokens} tokens")
        rates = [f"{self.tokens / elapsed:.1f} now" if steps and elapsed > 0 else "-"]
        rates += [f"{sum(v) / len(v):.1f} {mode}" for mode, v in self.finished.items()]
        grid.add_row("tokens/s", " · ".join(rates))
        if self.num_streams:
            mean = 1 + sum(accepted) / steps if steps else 0.0
            line = Text(sparkline(accepted, self.num_streams, max(width - 16, 4)), style="cyan")
            line.append(f" {mean:.2f} tokens/step" if steps else "no steps yet", style="default")
            grid.add_row("accepted", line)
            nodes = f"{self.drafted_nodes} nodes → {self.tree_nodes} after pruning" if steps else "-"
            grid.add_row("tree", f"{nodes} · budget {self.budget}")
        fill = self.cache_rows / self.max_length
        cells = max(min(width - 24, 30), 4)
        grid.add_row("KV cache", Text(bar(fill, cells).ljust(cells), style="green")
                     + Text(f" {self.cache_rows}/{self.max_length} rows ({fill:.0%})"))
        grid.add_row("memory", self._memory_text())
        grid.add_row("status", self.state)
        yield Panel(grid, title=self.title, title_align="left", border_style="blue")

    def _memory_text(self) -> str:
        memory = self.memory()
        parts = []
        if memory.get("host_rss_bytes"):
            parts.append(f"RSS {format_bytes(memory['host_rss_bytes'])}")
        if memory.get("device_used_bytes"):
            parts.append(f"GPU {format_bytes(memory['device_used_bytes'])}")
        return " · ".join(parts) or "-"
