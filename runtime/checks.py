"""Type checks for values that callers hand the runtime (the Python API, JSON files,
HTTP requests): Python's bool is an int, and numpy's integers are not, so neither
`isinstance(value, int)` nor `int(value)` says whether a value is a count."""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def is_integer(value: Any) -> bool:
    """An integer, Python's or numpy's, and not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def cpu_cores() -> int:
    """The most ONNX Runtime threads worth asking for: more threads than cores only slow
    every step down (100000 took minutes to start)."""
    return os.cpu_count() or 1


def is_number(value: Any) -> bool:
    """An integer or a float, Python's or numpy's, and not a bool (NaN included)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
