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
fingerprint, the cache's identity) and kv.npz (the cached rows as the cache stores them,
[2 * layers, kv_heads, rows, head_dim], read back with allow_pickle=False). It restores
only into the model that wrote it, and only with its own cache: the identity is a
sha256 over the model's fingerprint, the cached tokens and the rows' bytes, so another
conversation's kv.npz, a damaged or truncated one, or one left by a save that died
half-way is refused in one sentence instead of silently giving a wrong next turn. Both
files are written atomically (streamspec/files.py), the cache first.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Union

import numpy as np

from streamspec.errors import StreamspecError, first_line, read_json_file
from streamspec.files import write_atomic, write_text

from .checks import is_integer
from .session import common_prefix

if TYPE_CHECKING:  # type only: engine.py imports this module (`Engine.conversation`)
    from .engine import Engine, Prompt
    from .stats import Generation

# Version 2 added the cache's identity (kv_sha256); a version 1 save cannot be verified.
FORMAT, FORMAT_VERSION = "streamspec-conversation", 2
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
        (the rows of `token_ids` that the cache holds now). Returns the folder. A save
        that fails (disk full) or dies half-way leaves the files it replaces intact."""
        folder = Path(path).expanduser()
        rows = self.cached_rows
        kv = np.ascontiguousarray(self.engine.session.read_rows(self.engine.session.contents.row_index()[:rows]))
        model = self.engine.config.fingerprint()
        state = dict(format=FORMAT, format_version=FORMAT_VERSION, model=model, dtype=self.engine.config.dtype,
                     rows=rows, token_ids=self.token_ids, messages=self.messages,
                     kv_sha256=cache_identity(model, self.token_ids[:rows], kv))
        try:
            text = json.dumps(state, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError):
            raise StreamspecError("The conversation's messages are not plain JSON, so it cannot be saved.") from None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(folder / KV_FILE, lambda tmp: _save_kv(tmp, kv))
            write_text(folder / STATE_FILE, text)  # last: it names the cache that is now there
        except (OSError, UnicodeEncodeError) as error:
            raise StreamspecError(f"Cannot save the conversation to {folder} ({_reason(error)}).") from None
        return folder

    @classmethod
    def load(cls, engine: "Engine", path: Union[str, os.PathLike]) -> "Conversation":
        """Restore a saved conversation into `engine`'s cache (the model must be the one
        that saved it); the next turn runs only its new tokens."""
        folder = Path(path).expanduser()
        state = _read_state(folder, engine.config.vocab_size)
        if state["model"] != engine.config.fingerprint():
            raise StreamspecError(f"{folder} was saved with another model than {engine.config.folder}, "
                                  "so its cache cannot be restored into it.")
        rows = state["rows"]
        if rows >= engine.max_length:
            raise StreamspecError(f"{folder} holds {rows} cached tokens, more than this engine's maximum "
                                  f"length of {engine.max_length}; create the engine with a larger max_length.")
        kv = _read_kv(folder / KV_FILE, engine.session.rows_shape(rows), np.dtype(engine.session.cache_dtype))
        if cache_identity(state["model"], state["token_ids"][:rows], kv) != state["kv_sha256"]:
            raise StreamspecError(f"{folder / KV_FILE} does not belong to {folder / STATE_FILE} (its checksum "
                                  "differs: another conversation's cache, or a damaged file); save it again.")
        if kv.dtype.kind == "f" and not np.isfinite(kv).all():
            raise StreamspecError(f"{folder / KV_FILE} holds NaN or infinite values, so it is no usable cache.")
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


def cache_identity(model: str, token_ids: list[int], kv: np.ndarray) -> str:
    """sha256 tying saved cache rows to the model (its fingerprint), the tokens they hold
    and their bytes: a save's kv.npz matches only its own conversation.json."""
    digest = hashlib.sha256(json.dumps([model, token_ids, kv.dtype.str, list(kv.shape)]).encode())
    digest.update(np.ascontiguousarray(kv).data)
    return digest.hexdigest()


def _save_kv(path: Path, kv: np.ndarray) -> None:
    with open(path, "wb") as file:  # a file object: np.savez would add ".npz" to a path
        np.savez(file, kv=kv)


def _read_kv(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The array in kv.npz, which must have `shape` and `dtype`; one sentence when the
    file is missing, damaged, truncated or not a cache of this engine."""
    expected = int(np.prod(shape)) * dtype.itemsize
    try:
        with zipfile.ZipFile(path) as archive:  # sizes first: a forged header must not allocate gigabytes
            if archive.getinfo("kv.npy").file_size > expected + (1 << 16):
                raise StreamspecError(f"{path} holds a larger cache than {shape} ({dtype}): the file is corrupt.")
        with np.load(path, allow_pickle=False) as archive:
            kv = archive["kv"]
    except StreamspecError:
        raise
    except FileNotFoundError:
        raise StreamspecError(f"{path} is missing, so the conversation's cache cannot be restored.") from None
    except Exception as error:  # zipfile and numpy raise many types on damaged files (BadZipFile, EOFError, ...)
        raise StreamspecError(f"{path} is not a saved KV cache or is damaged ({first_line(error, 120)}).") from None
    if kv.shape != shape or kv.dtype != dtype:
        raise StreamspecError(f"{path} holds a cache of shape {kv.shape} ({kv.dtype}), "
                              f"not {shape} ({dtype}): the file is corrupt.")
    return kv


def _read_state(folder: Path, vocab_size: int) -> dict[str, Any]:
    """conversation.json, checked; one sentence when it is not a saved conversation."""
    path = folder / STATE_FILE
    state = read_json_file(
        path, missing=f"{folder} holds no {STATE_FILE}, so it is not a saved conversation.",
        corrupt=f"{path} is not valid JSON (corrupt or truncated).",
        fmt=FORMAT, wrong_format=f"{path} does not describe a saved conversation.")
    version = state.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise StreamspecError(f"{folder} was saved in format version {json.dumps(version)}, but this streamspec "
                              f"reads version {FORMAT_VERSION}; a conversation saved by an older version cannot "
                              "be verified, start it again.")
    ids, rows, messages = state.get("token_ids"), state.get("rows"), state.get("messages")
    if (not isinstance(ids, list) or not all(is_integer(t) and 0 <= t < vocab_size for t in ids)
            or not is_integer(rows) or not 0 <= rows <= len(ids)):
        raise StreamspecError(f"{path} lacks valid token ids (in [0, {vocab_size})) or rows (corrupt file).")
    if not isinstance(messages, list) or not all(_is_message(m) for m in messages):
        raise StreamspecError(f"{path}: messages must be a list of role and content texts (corrupt file).")
    if not isinstance(state.get("model"), str) or not isinstance(state.get("kv_sha256"), str):
        raise StreamspecError(f"{path} lacks the model's fingerprint or the cache's checksum (corrupt file).")
    return state


def _is_message(message: Any) -> bool:
    return (isinstance(message, dict) and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str))


def _reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or first_line(error)
