"""The one exception type for user mistakes and bad input, as `streamspec.models` sees it.

There must be exactly one class, so that the CLI's `except StreamspecError` catches
errors raised in every part; it lives in `streamspec/errors.py` (which imports nothing)
and is re-exported here for `from .errors import StreamspecError` inside this package.
"""

from streamspec.errors import StreamspecError

__all__ = ["StreamspecError"]
