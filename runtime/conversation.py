"""Conversations: a chat whose history stays in the engine's KV cache between turns.

    chat = engine.conversation(system="Be brief.")
    print(chat.send("What do owls eat?").text)
    print(chat.send("And ravens?").text)    # the prefill runs only the new turn
    chat.regenerate(temperature=0.8)         # a new last answer: the history stays cached
    chat.edit("And crows?")                  # a new last question
    chat.save("owls")                        # token ids + KV rows, restorable later
    chat = Conversation.load(engine, "owls")

How the reuse works: the engine writes down which tokens its cache rows hold
(`session.CacheContents`); each turn renders the whole history with the chat template,
as a server receives it from a client, and the engine runs only the tokens after the
longest prefix that the cache holds (`Engine.generate(..., reuse_cache=True)`).
Rewinding therefore costs nothing: rows beyond the kept prefix are overwritten by the
next turn. An engine has one cache, so another generation in between (another
conversation, a plain `generate`) replaces the rows; the next turn then runs the part
of the history the cache no longer holds, with the same result. Turn by turn or from
scratch, the tokens are the same (up to the rounding of a tree step against a chain
prefill, which can only flip an exact near-tie, as in tests/helpers.py).

A saved conversation is a folder: conversation.json (token ids, messages, the model's
fingerprint) and kv.npz (the cached rows as the cache stores them, [2 * layers,
kv_heads, rows, head_dim], read back with allow_pickle=False). It restores only into
the model that wrote it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Union

import numpy as np

from streamspec.errors import StreamspecError, read_json_file

from .session import common_prefix

if TYPE_CHECKING:
    from .engine import Engine, Generation, Prompt

FORMAT, FORMAT_VERSION = "streamspec-conversation", 1
STATE_FILE, KV_FILE = "conversation.json", "kv.npz"


class Conversation:
    """Turns of a chat on one engine, with the history kept in its KV cache.

    messages: the chat so far ({"role", "content"} dictionaries). token_ids: the history
    in tokens, the last generation's prompt and answer (less what `rewind` or `truncate`
    dropped); `save` stores them with the cache rows that hold them.
    Generation options (max_new_tokens, temperature, top_p, top_k, stop, seed,
    speculative, ignore_eos) are those of `Engine.generate`.
    """

    def __init__(self, engine: "Engine", system: Optional[str] = None,
                 messages: Optional[list[dict[str, Any]]] = None):
        self.engine = engine
        self.messages: list[dict[str, Any]] = list(messages or [])
        if system is not None:
            self.messages.insert(0, {"role": "system", "content": system})
        self.token_ids: list[int] = []

    # ---------------------------------------------------------------- chat turns
    # A turn changes `messages` once its answer is complete; a refused or abandoned turn leaves them.
    def send(self, content: str, **options: Any) -> "Generation":
        """Add a user message and generate the answer (both appended to `messages`)."""
        return _finish(self.stream(content, **options), self.engine)

    def stream(self, content: str, **options: Any) -> Iterator[str]:
        """`send`, yielding the answer's text as it is committed."""
        return self._answer(self.messages + [{"role": "user", "content": content}], options)

    def regenerate(self, **options: Any) -> "Generation":
        """Answer the last user message again (a new seed, other options); the old answer goes."""
        messages = self._question("answer again")
        return _finish(self._answer(messages, options), self.engine)

    def edit(self, content: str, **options: Any) -> "Generation":
        """Replace the last user message (its answer goes) and generate a new answer."""
        messages = self._question("edit")
        messages[-1] = {**messages[-1], "content": content}
        return _finish(self._answer(messages, options), self.engine)

    def rewind(self, turns: int = 1) -> None:
        """Forget the last `turns` user messages and everything after each of them."""
        users = [i for i, message in enumerate(self.messages) if message["role"] == "user"]
        if not 1 <= turns <= len(users):
            raise StreamspecError(f"Cannot rewind {turns} turns: the conversation has {len(users)}.")
        del self.messages[users[-turns]:]
        kept = self.engine.tokenizer.encode_chat(self.messages, add_generation_prompt=False) if self.messages else []
        self.truncate(common_prefix(self.token_ids, kept))

    # ---------------------------------------------------------------- any prompt
    def generate(self, prompt: "Prompt", **options: Any) -> "Generation":
        """Generate from a whole prompt (text, token ids or messages) that continues this
        history (e.g. `token_ids` plus new ids): only what the cache lacks is prefilled.
        `messages` is left alone."""
        return _finish(self._stream(self.engine.prompt_ids(prompt), options, lambda result: None), self.engine)

    def truncate(self, tokens: int) -> None:
        """Keep the first `tokens` token ids of the history (the cache rows beyond them are
        simply overwritten by the next turn)."""
        self.token_ids = self.token_ids[:max(int(tokens), 0)]

    @property
    def cached_rows(self) -> int:
        """How many of `token_ids` the engine's cache still holds (the next turn reuses them)."""
        return common_prefix(self.token_ids, self.engine.cached_ids)

    # ---------------------------------------------------------------- save and restore
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the conversation to the folder `path`: conversation.json and kv.npz
        (the rows of `token_ids` that the cache holds now). Returns the folder."""
        folder = Path(path).expanduser()
        rows = self.cached_rows
        kv = self.engine.session.read_rows(self.engine.session.contents.row_index()[:rows])
        state = dict(format=FORMAT, format_version=FORMAT_VERSION, model=self.engine.config.fingerprint(),
                     dtype=self.engine.config.dtype, rows=rows, token_ids=self.token_ids, messages=self.messages)
        try:
            text = json.dumps(state, ensure_ascii=False)
        except (TypeError, ValueError):
            raise StreamspecError("The conversation's messages are not plain JSON, so it cannot be saved.") from None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            np.savez(folder / KV_FILE, kv=kv)
            (folder / STATE_FILE).write_text(text, encoding="utf-8")
        except OSError as error:
            raise StreamspecError(f"Cannot save the conversation to {folder} ({error.strerror or error}).") from None
        return folder

    @classmethod
    def load(cls, engine: "Engine", path: Union[str, os.PathLike]) -> "Conversation":
        """Restore a saved conversation into `engine`'s cache (the model must be the one
        that saved it); the next turn runs only its new tokens."""
        folder = Path(path).expanduser()
        state = _read_state(folder)
        if state["model"] != engine.config.fingerprint():
            raise StreamspecError(f"{folder} was saved with another model than {engine.config.folder}, "
                                  "so its cache cannot be restored into it.")
        rows = state["rows"]
        expected = engine.session.rows_shape(rows)
        try:
            with np.load(folder / KV_FILE, allow_pickle=False) as archive:
                kv = archive["kv"]
        except (OSError, ValueError, KeyError):
            raise StreamspecError(f"{folder / KV_FILE} is missing or not a saved KV cache.") from None
        if kv.shape != expected or kv.dtype != engine.session.cache_dtype:
            raise StreamspecError(f"{folder / KV_FILE} holds a cache of shape {kv.shape} ({kv.dtype}), "
                                  f"not {expected} ({np.dtype(engine.session.cache_dtype)}): the file is corrupt.")
        if rows >= engine.max_length:
            raise StreamspecError(f"{folder} holds {rows} cached tokens, more than this engine's maximum "
                                  f"length of {engine.max_length}; create the engine with a larger max_length.")
        conversation = cls(engine, messages=state["messages"])
        conversation.token_ids = state["token_ids"]
        contents = engine.session.contents
        contents.keep(0)  # the rows are replaced: nothing the cache held stays valid
        engine.session.write_rows(kv)
        contents.set(list(conversation.token_ids), rows)
        return conversation

    # ---------------------------------------------------------------- internals
    def _answer(self, messages: list[dict[str, Any]], options: dict[str, Any]) -> Iterator[str]:
        """Generate the assistant's answer to `messages`; they become the conversation's
        messages, with the answer, once it is complete."""
        def commit(result: "Generation") -> None:
            self.messages = messages + [{"role": "assistant", "content": result.text}]

        return self._stream(self.engine.prompt_ids(messages), options, commit)

    def _stream(self, ids: list[int], options: dict[str, Any],
                on_done: Callable[["Generation"], None]) -> Iterator[str]:
        pieces = self.engine.stream(ids, reuse_cache=True, **options)  # arguments are checked here

        def follow() -> Iterator[str]:
            yield from pieces
            result = self.engine.last_result
            self.token_ids = ids + result.token_ids
            on_done(result)

        return follow()

    def _question(self, action: str) -> list[dict[str, Any]]:
        """The messages up to the last user message (its answer dropped)."""
        messages = list(self.messages)
        if messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages or messages[-1]["role"] != "user":
            raise StreamspecError(f"There is no user message to {action}.")
        return messages


def _finish(pieces: Iterator[str], engine: "Engine") -> "Generation":
    for _ in pieces:
        pass
    return engine.last_result


def _read_state(folder: Path) -> dict[str, Any]:
    """conversation.json, checked; one sentence when it is not a saved conversation."""
    state = read_json_file(
        folder / STATE_FILE, missing=f"{folder} holds no {STATE_FILE}, so it is not a saved conversation.",
        corrupt=f"{folder / STATE_FILE} is not valid JSON (corrupt or truncated).",
        fmt=FORMAT, wrong_format=f"{folder / STATE_FILE} does not describe a saved conversation.",
        version=FORMAT_VERSION,
        wrong_version=f"{folder} was saved in format version {{found}}, but this streamspec reads version "
                      f"{FORMAT_VERSION}.")
    ids, rows = state.get("token_ids"), state.get("rows")
    if (not isinstance(ids, list) or not all(isinstance(t, int) for t in ids) or not isinstance(rows, int)
            or not 0 <= rows <= len(ids) or not isinstance(state.get("messages"), list)
            or not isinstance(state.get("model"), str)):
        raise StreamspecError(f"{folder / STATE_FILE} lacks token ids, rows, messages or the model (corrupt file).")
    return state
