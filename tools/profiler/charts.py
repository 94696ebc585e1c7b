"""Text charts for a terminal: sparklines and horizontal bars, plain strings.

Plain strings (no colour) so that the same characters appear in a live view, a
report, a text capture and a test's assertions.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

SPARK_LEVELS = "▁▂▃▄▅▆▇█"
_EIGHTHS = " ▏▎▍▌▋▊▉"  # partial cells, 0/8 .. 7/8


def sparkline(values: Sequence[float], top: float, width: int) -> str:
    """The last `width` values as one character each, 0 -> lowest block, `top` -> full."""
    if width <= 0 or not values:
        return ""
    top = top if top > 0 else max(max(values), 1)
    last = len(SPARK_LEVELS) - 1
    return "".join(SPARK_LEVELS[min(last, max(0, round(v / top * last)))] for v in values[-width:])


def bar(fraction: Optional[float], width: int) -> str:
    """A horizontal bar `fraction` (0..1) of `width` cells long, in eighths of a cell."""
    if fraction is None or width <= 0 or not math.isfinite(fraction):
        return ""
    eighths = round(min(max(fraction, 0.0), 1.0) * width * 8)
    full, rest = divmod(eighths, 8)
    return "█" * full + (_EIGHTHS[rest] if rest else "")
