"""Tokenizer, chat template and incremental decoding, without transformers.

`tokenizers` reads tokenizer.json; the chat template is rendered with jinja2 the way
transformers renders it (sandboxed, trim_blocks, lstrip_blocks, `raise_exception`,
`tojson`), then encoded without adding special tokens again.

Text is checked before it reaches the tokenizer: a lone surrogate (what a client's
"\\ud800" or a non-UTF-8 command-line argument becomes in Python) is one sentence, not
a TypeError from deep inside `tokenizers`. A long text is encoded with the GIL released,
so that a server's other threads (its event loop, /health) keep running meanwhile.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from typing import Any, Optional, Sequence

from streamspec.errors import StreamspecError

from .folder import DeployConfig, chat_template


class Tokenizer:
    def __init__(self, config: DeployConfig):
        from tokenizers import Tokenizer as HFTokenizer

        path = config.folder / config.tokenizer["file"]
        try:
            self.tokenizer = HFTokenizer.from_file(str(path))
        except Exception:
            raise StreamspecError(f"{path} is not a readable tokenizer file; export the model again.") from None
        self.bos_token = config.tokenizer.get("bos_token")
        self.eos_token = config.tokenizer.get("eos_token")
        self.template_source = chat_template(config)
        self._template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_text(text)
        if len(text) < LONG_TEXT:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        # `encode` holds the GIL for its whole run (seconds for a long prompt), which
        # freezes every other thread; `encode_batch` gives the same ids and releases it.
        return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    @cached_property
    def longest_token(self) -> int:
        """The most characters one token covers (the longest vocabulary entry, added
        tokens included). Byte-level BPE and SentencePiece tokenizers, those of every
        supported family, put each character of a text into some token, so a text of n
        characters has at least n / longest_token tokens: a bound that costs nothing."""
        return max(map(len, self.tokenizer.get_vocab(with_added_tokens=True)), default=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The chat prompt as text (what transformers' apply_chat_template renders)."""
        if self.template_source is None:
            raise StreamspecError("This model has no chat template; pass a plain prompt instead of messages.")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise StreamspecError("Messages must be a list of {'role': ..., 'content': ...} dictionaries.")
        if self._template is None:
            self._template = _compile(self.template_source)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except StreamspecError:
            raise
        except Exception as error:
            raise StreamspecError(f"The chat template failed on these messages ({error}).") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


LONG_TEXT = 4096  # characters from which `Tokenizer.encode` releases the GIL


def check_text(text: str) -> None:
    """One sentence for text that is not valid Unicode (a lone surrogate), which no
    tokenizer can encode."""
    if not isinstance(text, str):
        raise StreamspecError(f"Text must be a string, got {type(text).__name__}.")
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise StreamspecError(f"The text is not valid Unicode: it holds a lone surrogate "
                              f"(U+{ord(text[error.start]):04X}) at character {error.start}.") from None


def _compile(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise StreamspecError(f"The chat template rejected the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as error:
        raise StreamspecError(f"The chat template does not compile ({error}).") from None


class TextStream:
    """Committed token ids in, text pieces out, correct across UTF-8 token boundaries.

    A byte-level token can end in the middle of a character; the decoder then yields
    U+FFFD, so text is held back until the pending tokens decode cleanly. Only the
    tokens since the last emitted piece are decoded again (plus a few for context, so
    that word-boundary spaces come out right), so the work does not grow with the text.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the context window
        self.read_offset = 0  # tokens before this have been emitted

    def push(self, ids: Sequence[int]) -> str:
        """Add committed ids; return the newly printable text ("" when none)."""
        self.ids.extend(int(i) for i in ids)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            piece = text[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):] if len(text) > len(prefix) else ""


def first_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """Index of the earliest stop string in text, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
