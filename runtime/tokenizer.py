"""Tokenizer, chat template and incremental decoding, without transformers.

`tokenizers` reads tokenizer.json; the chat template is rendered with jinja2 the way
transformers renders it (sandboxed, trim_blocks, lstrip_blocks, `raise_exception`,
`tojson`), then encoded without adding special tokens again.
"""

from __future__ import annotations

import json
from datetime import datetime
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
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

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
