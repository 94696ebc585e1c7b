"""Checked command-line values: the one place where every command's numbers, texts and
output paths are checked, as argparse `type=` functions.

A value that fails is a usage error: `tools/cli.py` prints "streamspec CMD: --flag must
be ..." (one sentence) and exits with code 1, before anything loads or runs.

    parser.add_argument("--threads", type=threads)
    parser.add_argument("--max-new-tokens", type=integer(1))
    parser.add_argument("--top-p", type=real(0, 1, low_open=True))
    parser.add_argument("--json", type=output_file)
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

from streamspec.runtime.checks import cpu_cores
from streamspec.runtime.sampling import MAX_SEED


def integer(low: Optional[int] = None, high: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (either bound may be None)."""

    def check(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_range(low, high)}, got {value}")
        return value

    check.__name__ = "integer"
    return check


def real(low: Optional[float] = None, high: Optional[float] = None, *, low_open: bool = False,
         high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number between low and high (open ends excluded)."""
    interval = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if high is None:
        interval = f"{'above' if low_open else 'at least'} {low}"

    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be a number {interval}, got {text}")
        return value

    check.__name__ = "number"
    return check


def _range(low: Optional[int], high: Optional[int]) -> str:
    if low is not None and high is not None:
        return f"between {low} and {high}"
    return f"at least {low}" if low is not None else f"at most {high}"


def threads(text: str) -> int:
    """ONNX Runtime intra-op threads: 1 to the CPU cores of this machine (the runtime's
    own rule, `streamspec.runtime.checks.cpu_cores`)."""
    cores = cpu_cores()
    try:
        return integer(1, cores)(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{error} (this machine has {cores} CPU cores)") from None


seed = integer(0, MAX_SEED)


def text(value: str) -> str:
    """Text that is valid Unicode: on POSIX, argv bytes that are not UTF-8 arrive as lone
    surrogates, which no tokenizer (nor stdout) accepts."""
    for index, char in enumerate(value):
        if "\ud800" <= char <= "\udfff":
            raise argparse.ArgumentTypeError(f"is not valid UTF-8 text (undecodable byte at character {index})")
    return value


def output_file(value: str) -> Path:
    """A file that a command will write at its end (e.g. --json): checked now, so that a
    long run does not fail at its last step. Its nearest existing folder must take a new
    file (checked by creating and removing one: permissions, read-only disks)."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"is a folder, not a file: {value}")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"cannot be written: {folder} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot be written to {folder} ({error.strerror or error})") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot be written: {value} is read-only")
    return path
