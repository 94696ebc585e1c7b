"""`Engine`: speculative (or autoregressive) generation on ONNX Runtime.

    engine = Engine("smollm2-onnx")
    result = engine.generate("Tell me about owls.", max_new_tokens=64)
    for piece in engine.stream([{"role": "user", "content": "Hi!"}]): print(piece, end="")

One step (docs/design.md): the tree is the correction token plus the `budget` most probable
draft nodes from the last accepted node's streams (`tree.build_tree`); one forward pass
verifies it and drafts the next tree; `tree.accept` walks it with the model's own
choice at each node (argmax, or an exact in-graph sample), so the output is exactly
what autoregressive decoding of the same weights produces (greedy: token for token;
sampling: in distribution). In the code: `_tokens` is the loop (like the PyTorch
reference decoder's, models/reference.py), `_tree` speculates, `_step` verifies, accepts
and compacts, `_commit` commits.

Generation may start from rows already in the KV cache (`reuse_cache=True`, and
`Conversation`, conversation.py): only the prompt tokens after the longest prefix the
cache holds run, as a chain on top of those rows. A `Fallback` policy (fallback.py)
measures speculative against autoregressive steps as the engine runs and decodes
autoregressively while speculation does not pay.

Tree pruning (`prune` > 0, a folder exported with --pruning): each step runs the lower
layers over the whole tree, drops the drafts that neither the streams nor the
early-exit head vouch for (`tree.prune`), and runs the upper layers, where each node
costs 1 + γ rows, over the rest. Exactness is untouched: pruning only removes
candidates, and the walk still follows the model's own choice at every node.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from streamspec.errors import StreamspecError

from .checks import is_integer
from .conversation import Conversation
from .fallback import Fallback
from .folder import read_folder
from .memory import MemoryEstimate, fit_to_memory, parse_size
from .sampling import SamplingParams
from .session import StepSession
from .stats import Generation, GenerationStats, StepRecord
from .tokenizer import TextStream, Tokenizer, check_text, first_stop
from .tree import (LOOKUP, Tree, accept, add_branch, build_tree, chain_tree, in_place, lookup_draft, nodes_to_score,
                   prune, single_node_tree)
from .tree_settings import TreeSettings

# GenerationStats, StepRecord and Generation live in stats.py; importing them from here still works.
__all__ = ["Engine", "Generation", "GenerationStats", "Prompt", "PromptTooLong", "StepRecord"]

Prompt = Union[str, Sequence[int], list[dict[str, Any]]]
Draft = tuple[np.ndarray, np.ndarray]  # a node's stream top-K token ids and probabilities, [γ, K] each
_NO_ROWS = np.zeros(0, dtype=np.int64)
_NO_UNIFORMS = np.zeros(0, dtype=np.float32)
_GREEDY = dict(temperature=np.ones(1, dtype=np.float32), top_k=np.zeros(1, dtype=np.int64),
               top_p=np.ones(1, dtype=np.float32))


class PromptTooLong(StreamspecError):
    """A prompt over a token limit (a server answers it with context_length_exceeded)."""


class Engine:
    """A deployable folder loaded on ONNX Runtime: one session, one KV cache.

    provider: "auto" (CUDA when available), "cpu" or "cuda". max_length: cache rows
    (default and maximum: the exported max length). budget: draft nodes per tree
    (default from streamspec.json; 0 with lookup 0: autoregressive). lookup: prompt-lookup
    draft tokens added beside the stream drafts (0: off; default from streamspec.json,
    where `streamspec tune` writes it when it pays). compaction: "auto", "host" or "graph" (see
    session.py; auto = host on CPU, graph on CUDA). profile: a file prefix that turns on
    ONNX Runtime's profiler (`engine.session.end_profiling()` returns the trace).
    memory_budget: bytes or a size like "1.5G" for weights + KV cache + activations
    (runtime/memory.py): the cache gets the most rows that fit (at most max_length), and
    a folder that cannot fit is refused in one sentence; `engine.memory` holds the estimate.
    fallback: True (a default `Fallback`), a `Fallback` with other settings, or False:
    speculate always, even where it is slower than autoregressive decoding. prune: the
    tree-pruning threshold in (0, 1) (default from streamspec.json, where `streamspec
    tune` writes it when it pays; 0: off); needs a folder exported with --pruning and host
    compaction. budget, lookup and prune are checked by `TreeSettings`
    (runtime/tree_settings.py), held in `engine.tree_settings`, and changed between
    generations with `engine.configure(...)`.
    `on_step`, when set, is called with a `StepRecord` after every decode step.

    One engine runs one generation at a time (one KV cache); a server queues requests.
    """

    def __init__(self, folder: Union[str, os.PathLike], provider: str = "auto", max_length: Optional[int] = None,
                 budget: Optional[int] = None, threads: Optional[int] = None, compaction: str = "auto",
                 profile: Optional[str] = None, fallback: Union[bool, Fallback] = True,
                 lookup: Optional[int] = None, memory_budget: Union[int, str, None] = None,
                 prune: Optional[float] = None):
        self.config = read_folder(folder)
        self.tree_settings = self._checked(self.config.tree.replace(budget=budget, lookup=lookup, prune=prune))
        self.memory: Optional[MemoryEstimate] = None
        if memory_budget is not None:  # size the cache to the budget, or refuse in one sentence
            self.memory = fit_to_memory(self.config, parse_size(memory_budget), max_length, self.budget,
                                        split=self.prune > 0)
            max_length = self.memory.max_length
        self.session = StepSession(self.config, provider, max_length, threads, compaction, profile,
                                   split=self.prune > 0)
        self.tokenizer = Tokenizer(self.config)
        self.fallback: Optional[Fallback] = (fallback if isinstance(fallback, Fallback)
                                             else Fallback() if fallback else None)
        self.last_result: Optional[Generation] = None
        self.on_step: Optional[Callable[[StepRecord], None]] = None

    @property
    def max_length(self) -> int:
        return self.session.max_length

    # The tree settings (`tree_settings`); setting one goes through the same checks as `configure`.
    @property
    def budget(self) -> int:
        return self.tree_settings.budget

    @budget.setter
    def budget(self, value: int) -> None:
        self._apply(dataclasses.replace(self.tree_settings, budget=value))

    @property
    def lookup(self) -> int:
        return self.tree_settings.lookup

    @lookup.setter
    def lookup(self, value: int) -> None:
        self._apply(dataclasses.replace(self.tree_settings, lookup=value))

    @property
    def prune(self) -> float:
        return self.tree_settings.prune

    @prune.setter
    def prune(self, value: float) -> None:
        self._apply(dataclasses.replace(self.tree_settings, prune=value))

    def configure(self, budget: Optional[int] = None, lookup: Optional[int] = None,
                  prune: Optional[float] = None) -> TreeSettings:
        """Change the tree settings for the next generations (None keeps a value; see the
        class docstring). A bad value is refused in one sentence and changes nothing.
        Pruning (prune > 0) needs an engine created with pruning on, which loads the
        split graphs; prune 0 turns it off on any engine. Returns the new settings."""
        return self._apply(self.tree_settings.replace(budget=budget, lookup=lookup, prune=prune))

    def _apply(self, settings: TreeSettings) -> TreeSettings:
        """Use `settings` (checked already) unless this engine cannot run them."""
        if settings.prune > 0 and not self.session.split:
            raise StreamspecError("This engine was created without tree pruning, so it cannot prune; "
                                  "create it with prune > 0.")
        self.tree_settings = self._checked(settings)
        return settings

    def _checked(self, settings: TreeSettings) -> TreeSettings:
        """Refuse trees on a folder whose graph takes none (exported with --autoregressive)."""
        if not self.config.can_tree and (settings.budget or settings.lookup):
            raise StreamspecError(f"{self.config.folder} was exported with --autoregressive (one token per step), "
                                  "so it takes no draft budget or prompt lookup; use budget 0 and lookup 0, or "
                                  "export the checkpoint without --autoregressive.")
        return settings

    @property
    def can_speculate(self) -> bool:
        return self.config.num_streams > 0

    @property
    def cached_ids(self) -> list[int]:
        """The tokens whose keys and values the KV cache holds now (reusable by the next
        generation that starts with them)."""
        return self.session.contents.held()

    def conversation(self, system: Optional[str] = None) -> Conversation:
        """A chat that keeps its history in the KV cache between turns (conversation.py)."""
        return Conversation(self, system=system)

    # ---------------------------------------------------------------- public API
    def generate(self, prompt: Prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, stop: Optional[Sequence[str]] = None, seed: Optional[int] = None,
                 speculative: bool = True, ignore_eos: bool = False, reuse_cache: bool = False) -> Generation:
        """Generate a completion. `prompt` is text, a list of chat messages (the chat
        template is applied) or token ids. Greedy when temperature is 0. reuse_cache:
        skip the prefill of the longest prompt prefix whose rows the cache still holds
        (same tokens either way; `stats.cached_tokens` says how many)."""
        for _ in self.stream(prompt, max_new_tokens, temperature, top_p, top_k, stop, seed, speculative, ignore_eos,
                             reuse_cache):
            pass
        return self.last_result

    def stream(self, prompt: Prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, stop: Optional[Sequence[str]] = None, seed: Optional[int] = None,
               speculative: bool = True, ignore_eos: bool = False, reuse_cache: bool = False) -> Iterator[str]:
        """Like `generate`, yielding text as it is committed; the full result is then in
        `engine.last_result`. Arguments are checked before the generator is returned."""
        ids = self.prompt_ids(prompt)
        params, stops = self.check_options(len(ids), max_new_tokens, temperature, top_p, top_k, seed, stop)
        stats = GenerationStats(prompt_tokens=len(ids), speculative=speculative and self.can_speculate)
        past = self.session.contents.reusable(ids) if reuse_cache else 0
        tokens = self._tokens(ids, max_new_tokens, params, stats.speculative, ignore_eos, stats, past)
        return self._text(tokens, stops, stats)

    def prompt_ids(self, prompt: Prompt, max_tokens: Optional[int] = None) -> list[int]:
        """The prompt's token ids. max_tokens: refuse (`PromptTooLong`) a prompt whose
        size alone shows that it has more tokens, before the tokenizer spends time and
        memory on it (a server passes its limit)."""
        if max_tokens is not None:
            self.check_prompt_size(prompt, max_tokens)
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            ids = self.tokenizer.encode_chat(list(prompt))
        elif isinstance(prompt, (list, tuple, np.ndarray)) and all(is_integer(t) for t in prompt):
            ids = [int(t) for t in prompt]
            if any(not 0 <= t < self.config.vocab_size for t in ids):
                raise StreamspecError(f"Token ids must be in [0, {self.config.vocab_size}).")
        else:
            raise StreamspecError("The prompt must be text, a list of chat messages or a list of token ids.")
        if not ids:
            raise StreamspecError("The prompt is empty.")
        return ids

    def check_prompt_size(self, prompt: Prompt, max_tokens: int) -> None:
        """Raise `PromptTooLong` when the prompt surely has more than `max_tokens` tokens:
        more ids, or more characters than that many of the vocabulary's longest tokens
        cover (`Tokenizer.longest_token`; chat messages: their contents, the template
        only adds tokens). Costs a length, not a tokenization."""
        if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
            chars = sum(len(m.get("content")) for m in prompt if isinstance(m.get("content"), str))
        elif isinstance(prompt, str):
            chars = len(prompt)
        else:  # token ids (anything else is refused by `prompt_ids`)
            if isinstance(prompt, (list, tuple, np.ndarray)) and len(prompt) > max_tokens:
                raise PromptTooLong(f"The prompt has {len(prompt)} tokens, more than the limit of {max_tokens}.")
            return
        most = max_tokens * self.tokenizer.longest_token
        if chars > most:
            raise PromptTooLong(f"The prompt has {chars} characters, more than {max_tokens} tokens can hold "
                                f"(at most {most}: {self.tokenizer.longest_token} per token); shorten it.")

    def check_options(self, prompt_tokens: int, max_new_tokens: Any, temperature: Any = 0.0, top_p: Any = 1.0,
                      top_k: Any = 0, seed: Any = None,
                      stop: Optional[Sequence[str]] = None) -> tuple[SamplingParams, list[str]]:
        """Check a generation's options for a prompt of `prompt_tokens` tokens (one
        sentence each): what `stream` checks before it starts, and what a server checks
        before it queues a request or starts a streamed answer. Returns the sampling
        parameters and the stop strings."""
        params = SamplingParams.checked(temperature, top_p, top_k, seed)
        self.check_length(prompt_tokens, max_new_tokens)
        if isinstance(stop, str) or not all(isinstance(s, str) for s in stop or []):
            raise StreamspecError("stop must be a list of strings.")
        for text in stop or []:
            check_text(text)
        return params, [s for s in (stop or []) if s]

    def forward(self, tree: Tree, past: int, drafting: bool = True, kept: Optional[int] = None) -> dict[str, np.ndarray]:
        """One greedy forward pass over `tree` on top of `past` cached rows, committing
        nothing (the profiler and `streamspec tune` time steps with it). It overwrites
        cache rows from `past` on, which only matters to a generation in progress.
        kept (pruning engines): a pruned step whose upper layers see the first `kept`
        nodes (closed under parents), every other node scored by the early-exit head."""
        if past < 0 or past + tree.size * (1 + self.config.num_streams) > self.max_length:
            raise StreamspecError(f"A tree of {tree.size} nodes after {past} rows does not fit the cache.")
        contents = self.session.contents  # rows from `past` on (and rows not moved yet) are overwritten
        contents.keep(min(past, contents.rows - len(contents.pending)))
        if kept is not None:
            if self.prune <= 0:
                raise StreamspecError("A pruned step needs an engine with pruning on (prune > 0).")
            unvouched = Tree(tree.tokens, tree.parents, tree.depths, np.zeros(tree.size, dtype=np.float32))
            nodes = np.arange(min(max(kept, 1), tree.size), dtype=np.int64)
            return self._pruned_step(unvouched, past, drafting and self.can_speculate, None, lambda d: _NO_UNIFORMS,
                                     GenerationStats(), decide=lambda *_: nodes)[3]
        stream_nodes = self._stream_nodes(tree, drafting and self.can_speculate)
        return self._run(tree, past, _NO_ROWS, stream_nodes, np.arange(tree.size, dtype=np.int64), None,
                         _NO_UNIFORMS, GenerationStats())

    def room_for(self, prompt_tokens: int) -> int:
        """The most new tokens that fit the cache after a prompt of this length."""
        # The custom op writes stream rows for every node, the last step included.
        slack = self.config.num_streams if self.config.streams_for_all_nodes else 0
        return self.max_length - prompt_tokens - slack

    def check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse (one sentence) a request that does not fit the cache: the prompt plus
        max_new_tokens (a server checks this before it queues a request)."""
        if not is_integer(max_new_tokens) or max_new_tokens < 1:
            raise StreamspecError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
        if max_new_tokens > self.room_for(prompt_tokens):
            raise StreamspecError(
                f"The prompt ({prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) exceed the maximum "
                f"length of {self.max_length} tokens; shorten the prompt or lower max_new_tokens.")

    # ---------------------------------------------------------------- the generation loop
    def _tokens(self, prompt: list[int], max_new_tokens: int, params: SamplingParams, speculative: bool,
                ignore_eos: bool, stats: GenerationStats, past: int = 0) -> Iterator[list[int]]:
        """Yield the tokens each forward pass commits (cut at EOS and max_new_tokens): the
        prefill, then per step speculate (`_tree`) → verify and accept (`_step`) → commit.

        The cache must hold prompt[:past] (`session.contents`, past < len(prompt)): the
        prefill runs only the rest, as a chain on top of those rows (past = 0: all of it).
        """
        state = _Decoding(list(prompt), past, _Chooser(params), max_new_tokens,
                          set() if ignore_eos else set(self.config.eos_token_ids))
        correction, draft = self._prefill(state, speculative, stats)
        yield [correction]
        policy = self.fallback if speculative else None
        start = time.perf_counter()
        try:
            while state.produced < max_new_tokens and correction not in state.eos:
                step_start = time.perf_counter()
                speculate = speculative and self._speculates(policy)
                room = self.max_length - state.past  # cache rows this step may write beyond the committed ones
                tree = self._tree(correction, draft if speculate else None, state.history if speculate else None, room)
                # Stream rows for the next step's draft (none when the budget takes no stream drafts).
                drafting = speculate and self.budget > 0 and room >= tree.size * (1 + self.config.num_streams)
                step = self._step(tree, state, drafting, stats)
                committed = self._commit(step, state, stats)
                if policy is not None:
                    self._account_step(policy, speculate, step.marks[-1] - step_start, len(step.path), stats)
                if self.on_step is not None:
                    self._report_step(step, step_start, len(committed), state.past, stats.steps)
                yield committed
                correction, draft = committed[-1], step.draft
        finally:
            stats.decode_seconds = time.perf_counter() - start
        stats.stop_reason = "eos" if correction in state.eos else "length"

    def _prefill(self, state: _Decoding, speculative: bool, stats: GenerationStats) -> tuple[int, Optional[Draft]]:
        """Run the prompt tokens that the cache lacks (history[past:], N of them) as a chain
        on top of the cached rows and commit the first new token. Returns it and the first
        draft: the streams of the last prompt token (None when not speculating)."""
        start = time.perf_counter()
        contents, past = self.session.contents, state.past
        # Graph compaction: rows of the last generation's accepted path may still be
        # waiting to move into place; this run moves them (compact_src) before its own rows.
        pending = contents.keep(past)
        contents.keep(past - len(pending))  # while a run is in flight, only rows it leaves alone are known
        stats.cached_tokens = past
        n = len(state.history) - past
        last = np.array([n - 1], dtype=np.int64)  # the only row whose next token (and streams) matter
        prompt = chain_tree(state.history[past:])
        stream_nodes = self._stream_nodes(prompt, False)
        if speculative and not len(stream_nodes) and past + n + self.config.num_streams <= self.max_length:
            stream_nodes = last
        out = self._run(prompt, past, pending, stream_nodes, last, state.chooser.feeds,
                        state.chooser.uniforms.at(np.zeros(1, dtype=np.int64)), stats, tree_mask=np.tri(n, dtype=bool))
        correction = state.chooser(out, 0)
        draft = _draft(out, n - 1) if speculative and len(stream_nodes) else None
        state.history.append(correction)  # committed, but its row comes with the next step
        state.past, state.produced = past + n, 1
        contents.set(state.history, state.past)
        stats.prefill_seconds = time.perf_counter() - start
        stats.new_tokens = 1
        return correction, draft

    def _speculates(self, policy: Optional[Fallback]) -> bool:
        """Whether this step drafts: the settings ask for drafts, and the fallback (when
        there is one) does not decode autoregressively now."""
        return (self.budget > 0 or self.lookup > 0) and (policy is None or policy.speculate())

    def _tree(self, root: int, draft: Optional[Draft], history: Optional[list[int]], room: int) -> Tree:
        """The step's tree: the root, the `budget` best stream drafts, and a prompt-lookup
        chain of up to `lookup` tokens (merged where it repeats a stream draft), within the
        `room` cache rows this step may write (every node takes 1 + γ rows)."""
        fits = room // (1 + self.config.num_streams) - 1  # draft nodes that fit beside the root
        tree = single_node_tree(root)
        if draft is not None and fits >= 1:
            tree = build_tree(root, draft[0], draft[1], min(self.budget, fits))
        if history is not None and self.lookup and fits > tree.size - 1:
            tree = add_branch(tree, lookup_draft(history, min(self.lookup, fits - tree.size + 1)))
        return tree

    def _step(self, tree: Tree, state: _Decoding, drafting: bool, stats: GenerationStats) -> _Step:
        """One speculative step over `tree` (N nodes, ancestors first) on top of the
        committed rows: one forward pass verifies it (after pruning it, when pruning is on);
        the walk accepts the longest path on which every draft is the model's own choice;
        that path's KV rows move to [past, past + len(path)); the next draft comes from
        the streams of the path's last node when `drafting`. Commits nothing (`_commit`)."""
        drafted = tree.size
        self.session.contents.keep(state.past - len(state.pending))
        # A node at depth d samples token produced + d with that token's own number (`_Uniforms`).
        uniform_at = lambda depths: state.chooser.uniforms.at(state.produced + depths)  # noqa: E731
        kept = None  # pruning: the kept nodes' indices in the drafted tree [K]
        if self.prune > 0 and tree.size > 1:
            tree, kept, streamed, out = self._pruned_step(tree, state.past, drafting, state.chooser.feeds,
                                                          uniform_at, stats)
        else:
            streamed = self._stream_nodes(tree, drafting)  # [L] nodes with stream rows
            out = self._run(tree, state.past, state.pending, streamed, np.arange(tree.size, dtype=np.int64),
                            state.chooser.feeds, uniform_at(tree.depths), stats)
        ran = time.perf_counter()
        path, correction = accept(tree, lambda node: state.chooser(out, node))
        accepted = time.perf_counter()
        pending = self._compact(state.past, path, None if kept is None else kept[path])
        compacted = time.perf_counter()
        # A path that ends on a node without stream rows (a prompt-lookup node) drafts by
        # lookup alone in the next step.
        draft = _draft(out, path[-1]) if drafting and path[-1] in streamed else None
        return _Step(tree, drafted, path, correction, draft, out, pending, (ran, accepted, compacted), len(streamed))

    def _compact(self, past: int, path: list[int], lower_rows: Optional[np.ndarray]) -> np.ndarray:
        """Move the accepted path's KV rows past + path[i] to past + i (a leading run with
        path[i] == i stays). Host compaction moves them now (lower_rows [len(path)]: where
        a pruned tree's lower-layer rows sit, its drafted indices); graph compaction leaves
        them to the next run. Returns the rows [R] that the next run must still move."""
        if self.session.compaction == "host":
            self.session.compact_on_host(past, path, lower_rows)
            return _NO_ROWS
        return past + np.asarray(path[in_place(path):], dtype=np.int64)

    def _commit(self, step: _Step, state: _Decoding, stats: GenerationStats) -> list[int]:
        """Commit a step: its accepted drafts and correction token (cut at EOS and
        max_new_tokens) join the history, its path's rows the cache, and the stats count
        it. Returns the committed tokens."""
        state.past += len(step.path)
        state.pending = step.pending
        committed = _cut(step.tokens + [step.correction], state.max_new_tokens - state.produced, state.eos)
        state.produced += len(committed)
        state.history.extend(committed)
        self.session.contents.set(state.history, state.past, state.pending)
        stats.steps += 1
        stats.accepted.append(len(step.path) - 1)
        stats.lookup_tokens += step.looked_up
        stats.tree_sizes.append(step.tree.size)
        stats.drafted_sizes.append(step.drafted)
        stats.streamed_sizes.append(step.streamed)
        stats.new_tokens = state.produced
        return committed

    @staticmethod
    def _account_step(policy: Fallback, speculated: bool, seconds: float, tokens: int,
                      stats: GenerationStats) -> None:
        """Tell the fallback policy what the step cost; list its decision in the stats."""
        if not speculated:
            stats.fallback_steps += 1
        decision = policy.record(speculated, seconds, tokens)
        if decision is not None:
            stats.decisions.append(dict(step=stats.steps, **decision))

    def _report_step(self, step: _Step, started: float, committed: int, past: int, number: int) -> None:
        """Hand `on_step` the record of step `number`; the session's own split covers the run."""
        ran, accepted_at, compacted = step.marks
        timing = self.session.last_timing
        run_total = timing.copy_in + timing.run + timing.copy_out
        seconds = dict(tree=max(ran - started - run_total, 0.0), copy_in=timing.copy_in, run=timing.run,
                       copy_out=timing.copy_out, accept=accepted_at - ran, compaction=compacted - accepted_at)
        tree = step.tree
        lookup_nodes = 0 if tree.sources is None else int((tree.sources == LOOKUP).sum())
        self.on_step(StepRecord(number, started, tree.size, int(tree.depths.max()), len(step.path) - 1, committed,
                                past, seconds, step.drafted, lookup_nodes, step.looked_up))

    # ---------------------------------------------------------------- forward passes
    def _run(self, tree: Tree, past: int, compact_src: np.ndarray, stream_nodes: np.ndarray,
             output_nodes: np.ndarray, sampling: Optional[dict[str, np.ndarray]], uniform: np.ndarray,
             stats: GenerationStats, tree_mask: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
        """One forward pass. `sampling` None: greedy, the graph samples nothing; else it
        samples every output node, with uniform [O] (one number in [0, 1) per node)."""
        feeds = self._feeds(tree, past, compact_src, stream_nodes, output_nodes, sampling, uniform, tree_mask)
        start = time.perf_counter()
        out = self.session.run(feeds)
        stats.model_seconds += time.perf_counter() - start
        return out

    @staticmethod
    def _feeds(tree: Tree, past: int, compact_src: np.ndarray, stream_nodes: np.ndarray, output_nodes: np.ndarray,
               sampling: Optional[dict[str, np.ndarray]], uniform: np.ndarray,
               tree_mask: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
        """The step inputs for `tree` (see `_run`)."""
        sample_rows = np.arange(len(output_nodes), dtype=np.int64) if sampling else _NO_ROWS
        feeds = dict(sampling or _GREEDY)
        feeds.update(
            input_ids=tree.tokens, positions=tree.positions(past),
            tree_mask=tree.ancestor_mask() if tree_mask is None else tree_mask,
            tree_parent=tree.parents.astype(np.int32), past_length=np.array([past], dtype=np.int64),
            compact_src=compact_src, stream_nodes=stream_nodes, output_nodes=output_nodes, sample_rows=sample_rows,
            exit_nodes=_NO_ROWS, uniform=uniform if sampling else _NO_UNIFORMS)
        return feeds

    def _pruned_step(self, tree: Tree, past: int, drafting: bool, sampling: Optional[dict[str, np.ndarray]],
                     uniform_at: Callable[[np.ndarray], np.ndarray], stats: GenerationStats,
                     decide: Optional[Callable[..., np.ndarray]] = None
                     ) -> tuple[Tree, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """One step with tree pruning (host compaction, so nothing to compact in-graph):
        the lower layers over `tree`, pruning, the upper layers over the kept nodes.
        decide(tree, scored, exit_scores) -> kept nodes replaces `tree.prune` (timing).
        Returns (the kept tree, its nodes' indices in `tree` [K], the kept nodes with
        stream rows [L], the step's outputs)."""
        scored = nodes_to_score(tree, self.prune)
        exit_parents, exit_rows = np.unique(tree.parents[scored], return_inverse=True)
        feeds = self._feeds(tree, past, _NO_ROWS, _NO_ROWS, _NO_ROWS, None, _NO_UNIFORMS)
        feeds.update(exit_parents=exit_parents.astype(np.int64), exit_nodes=scored,
                     exit_rows=exit_rows.reshape(-1).astype(np.int64))
        start = time.perf_counter()
        lower = self.session.run_lower(feeds)
        lower_seconds = time.perf_counter() - start
        kept = (decide or (lambda *args: prune(*args, self.prune)))(tree, scored, lower["exit_scores"])
        small = tree.select(kept)
        nodes = np.arange(small.size, dtype=np.int64)
        streamed = self._stream_nodes(small, drafting)
        feeds = self._feeds(small, past, _NO_ROWS, streamed, nodes, sampling, uniform_at(small.depths))
        start = time.perf_counter()
        out = self.session.run_upper(feeds, lower["hidden"], kept, add_timing=True)
        stats.model_seconds += lower_seconds + time.perf_counter() - start
        return small, kept, streamed, out

    def _stream_nodes(self, tree: Tree, drafting: bool) -> np.ndarray:
        """The nodes that get stream rows [L]: when drafting, the root and the nodes the
        streams drafted, not prompt-lookup ones; none otherwise (the custom op's row layout
        wants them for every node). Each node with streams costs γ rows more in every MSA
        layer, and a lookup node is rarely where the accepted path ends: measured on the
        held-out answers, lookup 8 + budget 2 committed 2.26 tokens per pass with 14 MSA
        rows a step this way, 2.32 with 26 rows when every node had streams."""
        if self.can_speculate and self.config.streams_for_all_nodes:
            return np.arange(tree.size, dtype=np.int64)
        if not drafting:
            return _NO_ROWS
        if tree.sources is None:
            return np.arange(tree.size, dtype=np.int64)
        return np.flatnonzero(tree.sources != LOOKUP).astype(np.int64)

    # ---------------------------------------------------------------- text
    def _text(self, tokens: Iterator[list[int]], stops: list[str], stats: GenerationStats) -> Iterator[str]:
        """Decode committed tokens into text pieces, cut before the first stop string."""
        decoder = TextStream(self.tokenizer)
        ids: list[int] = []
        held, text = "", []
        hold = max((len(s) for s in stops), default=1) - 1  # a stop string may straddle pieces
        try:
            for committed in tokens:
                ids.extend(committed)
                held += decoder.push(committed)
                cut = first_stop(held, stops) if stops else None
                if cut is not None:
                    held = held[:cut]
                    stats.stop_reason = "stop"
                    break
                if len(held) > hold:
                    piece, held = held[:len(held) - hold], held[len(held) - hold:]
                    text.append(piece)
                    yield piece
            else:
                held += decoder.flush()
                cut = first_stop(held, stops) if stops else None
                if cut is not None:
                    held, stats.stop_reason = held[:cut], "stop"
        finally:
            tokens.close()
        if held:
            text.append(held)
            yield held
        self.last_result = Generation("".join(text), ids, stats)


class _Uniforms:
    """The random numbers of a sampled generation, one per generated token: a node at
    depth d of a step that follows `produced` tokens samples token produced + d with
    number produced + d. Every committed token thus gets its own fresh number whatever
    the trees were, so the same seed gives the same tokens with or without speculation
    (and through the fallback's switches), and each token is still an exact draw."""

    def __init__(self, seed: Optional[int], enabled: bool = True):
        self.rng = np.random.default_rng(seed)
        self.enabled = enabled  # greedy decoding draws nothing
        self.values = _NO_UNIFORMS

    def at(self, indices: np.ndarray) -> np.ndarray:
        """uniform [len(indices)] float32: the numbers of these generated-token indices."""
        if not self.enabled:
            return _NO_UNIFORMS
        needed = int(indices.max()) + 1 if len(indices) else 0
        if needed > len(self.values):
            more = self.rng.random(max(needed - len(self.values), 64), dtype=np.float32)
            self.values = np.concatenate([self.values, more])
        return self.values[indices]



class _Chooser:
    """How a generation picks the token after a node: the main stream's argmax (greedy),
    or the graph's exact sample drawn with the generation's own numbers (`_Uniforms`)."""

    def __init__(self, params: SamplingParams):
        self.greedy = params.greedy
        # The graph's sampling inputs, [1] each (None: greedy, the graph samples nothing).
        self.feeds: Optional[dict[str, np.ndarray]] = None if params.greedy else dict(
            temperature=np.array([params.temperature], dtype=np.float32),
            top_k=np.array([params.top_k], dtype=np.int64), top_p=np.array([params.top_p], dtype=np.float32))
        self.uniforms = _Uniforms(params.seed, enabled=not params.greedy)

    def __call__(self, out: dict[str, np.ndarray], node: int) -> int:
        """The token chosen after output node `node`: main_ids [O, K] or sampled_ids [O]."""
        return int(out["main_ids"][node, 0]) if self.greedy else int(out["sampled_ids"][node])


@dataclass
class _Decoding:
    """One generation's state between steps (`Engine._tokens`)."""

    history: list[int]  # the prompt and every committed token; cache rows [0, past) hold history[:past]
    past: int  # committed rows in the KV cache (the last committed token's row comes with the next step)
    chooser: _Chooser
    max_new_tokens: int
    eos: set[int]  # end-of-sequence ids that end the generation (none with ignore_eos)
    produced: int = 0  # tokens generated so far
    pending: np.ndarray = field(default_factory=lambda: _NO_ROWS)  # graph compaction: rows [R] the next run moves


@dataclass
class _Step:
    """What one speculative step decided (`Engine._step`); nothing is committed yet."""

    tree: Tree  # the tree that was verified: the drafted one, or what pruning kept of it
    drafted: int  # nodes of the drafted tree (before pruning)
    path: list[int]  # accepted nodes of `tree`, from the root (node 0)
    correction: int  # the model's token after the path's last node
    draft: Optional[Draft]  # the next tree's draft (None: this step drafted nothing)
    outputs: dict[str, np.ndarray]  # the graph's outputs, per output node (main_ids [N, K], ...)
    pending: np.ndarray  # graph compaction: cache rows [R] the next run moves into place
    marks: tuple[float, float, float]  # time.perf_counter() after the run, the walk and the compaction
    streamed: int  # nodes of `tree` that had stream rows

    @property
    def tokens(self) -> list[int]:
        """The accepted draft tokens (the path after the root)."""
        return [int(t) for t in self.tree.tokens[self.path[1:]]]

    @property
    def looked_up(self) -> int:
        """Accepted draft tokens that prompt lookup proposed (the rest came from the streams)."""
        return sum(self.tree.source_of(node) == LOOKUP for node in self.path[1:])


def _draft(out: dict[str, np.ndarray], node: int) -> Draft:
    """The next draft: stream top-K ids and probabilities [γ, K] of the graph's draft node,
    which must be the node the host's walk ended on (same rule, same choices)."""
    if int(out["draft_node"][0]) != node:
        raise StreamspecError(
            f"The graph drafted from node {int(out['draft_node'][0])} but the accepted path ends at node {node}; "
            "the exported folder and this runtime disagree, export the model again.")
    return out["stream_ids"], out["stream_probs"]


def _cut(tokens: list[int], room: int, eos: set) -> list[int]:
    """At most `room` tokens, ending at the first end-of-sequence token (kept)."""
    tokens = tokens[:room]
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i + 1]
    return tokens
