"""The one exception type for bad input, shared by every part, and the checked reader of
the JSON files streamspec writes (standard library only: the runtime imports it).

An error's message is a single sentence for the user; the CLI prints it and exits with
code 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union


class StreamspecError(Exception):
    """A user-facing error: one clear sentence, no traceback."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type when it has none), at most
    `limit` characters: what goes inside a one-sentence error about it."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def read_json_file(path: Union[str, os.PathLike], *, missing: str, corrupt: str, fmt: Optional[str] = None,
                   wrong_format: str = "", version_key: str = "format_version", version: Optional[int] = None,
                   wrong_version: str = "") -> dict[str, Any]:
    """The JSON object in `path`, checked. Raises StreamspecError with the caller's
    sentence when the file is missing (`missing`), unreadable or not JSON (`corrupt`),
    not an object or its "format" is not `fmt` (`wrong_format`, else `corrupt`), or
    its `version_key` is not `version` (`wrong_version`, where "{found}" stands for the
    version the file has)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StreamspecError(missing) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise StreamspecError(corrupt) from None
    if not isinstance(data, dict) or (fmt is not None and data.get("format") != fmt):
        raise StreamspecError(wrong_format or corrupt)
    if version is not None and data.get(version_key) != version:
        # json.dumps: a hand-edited "1" (a string) reads as "1", not as the number 1
        raise StreamspecError(wrong_version.replace("{found}", json.dumps(data.get(version_key))))
    return data
