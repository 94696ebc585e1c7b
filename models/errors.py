"""The one exception type for user mistakes and bad input, as `streamspec.models` sees it.

There must be exactly one class, so that the CLI's `except StreamspecError` catches
errors raised in every part; it lives in `streamspec/errors.py` (standard library only)
and is re-exported here, with its JSON reader, for `from .errors import ...` inside
this package.
"""

from streamspec.errors import StreamspecError, read_json_file

__all__ = ["StreamspecError", "read_json_file"]
