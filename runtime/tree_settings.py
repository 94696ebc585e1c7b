"""Tree settings: how many draft nodes a step's tree holds and how it is pruned, with one
owner for their defaults, their checks and the `tree` entry of streamspec.json:

    tree   {budget, lookup, prune, tuned}      (a deployable folder's streamspec.json)

    budget   draft nodes taken from the streams per step (0 with lookup 0: autoregressive)
    lookup   prompt-lookup draft tokens per step (0: off)
    prune    the tree-pruning threshold in [0, 1) (0: off; a folder exported with --pruning)
    tuned    what `streamspec tune` measured when it chose the three (optional, kept as is)

The exporter writes the entry (`as_entry`), `read_folder` checks it and gives the
engine its defaults (`DeployConfig.tree`, `from_entry`), `streamspec tune` rewrites it
(`write`), and `Engine.configure` changes a live engine's settings. Every value passes
`TreeSettings`' own checks, which refuse a bad one in one sentence.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from streamspec.errors import StreamspecError
from streamspec.files import PathLike, write_json

from .checks import is_integer, is_number

MAX_NODES = 4096  # draft nodes (or lookup tokens) per step: far above what pays on any device
_WHAT = {"budget": "tree budget (draft nodes per step)", "lookup": "prompt-lookup length (draft tokens per step)"}


def default_streams(trained: int, budget: int) -> Optional[int]:
    """How many of `trained` streams a folder with this default budget deploys, or None
    for all of them. Under the root (the correction token), a drafted node at depth d is
    the d-th draft on its path, so a tree of B draft nodes is at most B deep and stream
    j > B never drafts: its rows (one per streamed node in every MSA layer) would only
    cost time. Prompt-lookup nodes take no stream rows, so `lookup` changes nothing here."""
    return budget if 1 <= budget < trained else None


@dataclass(frozen=True)
class TreeSettings:
    """The tree of every speculative step; the defaults are those of a folder whose
    streamspec.json says nothing (the exporter writes budget, `streamspec tune` all)."""

    budget: int = 8
    lookup: int = 0
    prune: float = 0.0

    def __post_init__(self) -> None:
        # Checked and normalized here, so that no instance holds a bad value (numpy
        # integers become ints: the settings end up in JSON).
        for name in ("budget", "lookup"):
            object.__setattr__(self, name, _count(name, getattr(self, name)))
        object.__setattr__(self, "prune", _threshold(self.prune))

    def replace(self, budget: Optional[int] = None, lookup: Optional[int] = None,
                prune: Optional[float] = None) -> "TreeSettings":
        """These settings with the given values changed (None keeps one), checked."""
        changes = dict(budget=budget, lookup=lookup, prune=prune)
        return dataclasses.replace(self, **{name: value for name, value in changes.items() if value is not None})

    @classmethod
    def from_entry(cls, entry: Optional[dict[str, Any]]) -> "TreeSettings":
        """The settings of a `tree` entry (None or a missing key: the default), checked."""
        if entry is None:
            return cls()
        if not isinstance(entry, dict):
            raise StreamspecError(f"The tree entry of streamspec.json must be an object, got {type(entry).__name__}.")
        return cls(**{f.name: entry[f.name] for f in dataclasses.fields(cls) if f.name in entry})

    def as_entry(self) -> dict[str, Any]:
        """The `tree` entry that holds these settings (without `tuned`)."""
        return dataclasses.asdict(self)

    def write(self, path: PathLike, raw: dict[str, Any], tuned: Optional[dict[str, Any]] = None) -> None:
        """Store these settings (and `tuned`, what `streamspec tune` measured) as the `tree`
        entry of the streamspec.json at `path`, whose checked content `raw` is
        (`read_folder(folder).raw`, so a file the checked reader refuses is never
        rewritten); the file's other keys, and the entry's, stay as they are. Atomic: a
        failed write leaves the old file."""
        tree = {**(raw.get("tree") or {}), **self.as_entry()}
        if tuned is not None:
            tree["tuned"] = tuned
        write_json(path, {**raw, "tree": tree})

def _count(name: str, value: Any) -> int:
    """A budget or lookup length: an integer in [0, MAX_NODES] (bools and floats refused)."""
    if not is_integer(value) or not 0 <= value <= MAX_NODES:
        raise StreamspecError(f"The {_WHAT[name]} must be an integer between 0 and {MAX_NODES}, got {_shown(value)}.")
    return int(value)


def _threshold(value: Any) -> float:
    """A pruning threshold: a number in [0, 1) (NaN fails both comparisons)."""
    if not is_number(value) or not 0.0 <= value < 1.0:
        raise StreamspecError(f"The pruning threshold must be in [0, 1), got {_shown(value)}.")
    return float(value)


def _shown(value: Any) -> str:
    """A refused value as the user wrote it: 1.5 for a number (numpy's too), 'x' for text."""
    return str(value) if is_number(value) else repr(value)
