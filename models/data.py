"""Training data: distilled answers (JSONL) and the windows that training steps take.

`streamspec distill` writes one JSON object per line:
    {"id": ..., "split": "train" | "heldout", "domain": ..., "prompt_ids": [...], "answer_ids": [...], "text": ...}
A record's sequence is prompt + answer (T tokens, P of prompt, A of answer). Training
looks at the answer positions t in [P - 1, T - 1): main row t predicts token t + 1,
stream j predicts t + 1 + j. Those positions are cut into windows of at most
`window` positions; a window keeps the whole prefix as context.

The window order is a pure function of (records, seed, step), so a resumed run takes
exactly the windows the uninterrupted run would have taken.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

from .errors import StreamspecError

SPLITS = ("train", "heldout")


STDLIB_KINDS = ("complete", "summarise", "explain")  # the standard-library harvest (models/prompts.py)


def domain_of(record: dict) -> str:
    """A record's domain: its "domain" field; the standard-library harvest's records
    (which name a "kind", or carry it in their id, as older files do) are "stdlib"."""
    domain = record.get("domain")
    if isinstance(domain, str) and domain:
        return domain
    if record.get("kind") or str(record.get("id", "")).split(":")[0] in STDLIB_KINDS:
        return "stdlib"
    return "general"


@dataclass(frozen=True)
class Record:
    index: int  # position in the file's records (a stable key)
    id: str
    split: str
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    domain: str = "general"

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.prompt_ids + self.answer_ids

    @property
    def first_position(self) -> int:
        """The first trained position: the last prompt token predicts the first answer token."""
        return len(self.prompt_ids) - 1


@dataclass(frozen=True)
class Window:
    record: Record
    start: int  # trained positions [start, end) of the record's sequence
    end: int


def file_sha256(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _token_list(value, name: str, where: str, vocab_size: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise StreamspecError(f"{where}: {name} must be a list of token ids.")
    bad = next((t for t in value if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise StreamspecError(
            f"{where}: token id {bad} lies outside the model's vocabulary of {vocab_size} "
            "(was the file distilled from another base model?)."
        )
    return tuple(value)


def read_records(path: Union[str, Path], vocab_size: int, base_sha256: Optional[str] = None) -> list[Record]:
    """Read and check a distilled JSONL file (one clear sentence on any problem).

    base_sha256: the base model's fingerprint; records that name another base (distill
    writes a prefix of it as "base") are refused.
    """
    path = Path(path)
    if not path.exists():
        raise StreamspecError(f"The data file {path} does not exist.")
    if not path.is_file():
        raise StreamspecError(f"The data file {path} is not a file.")
    records: list[Record] = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise StreamspecError(f"{path} is not a JSONL text file (line {number} is not UTF-8).") from None
            if not line:
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise StreamspecError(f"{where} is not valid JSON; --data needs the JSONL that `streamspec distill` writes.") from None
            if not isinstance(item, dict) or "prompt_ids" not in item or "answer_ids" not in item:
                raise StreamspecError(f"{where} lacks prompt_ids and answer_ids; --data needs the JSONL that `streamspec distill` writes.")
            recorded = item.get("base")
            if base_sha256 and isinstance(recorded, str) and recorded and not base_sha256.startswith(recorded):
                raise StreamspecError(
                    f"{where} was distilled from another base model (fingerprint {recorded[:12]}…, this base "
                    f"{base_sha256[:12]}…); distill again or pass the matching --base."
                )
            split = item.get("split", "train")
            if split not in SPLITS:
                raise StreamspecError(f"{where}: split must be \"train\" or \"heldout\", got {split!r}.")
            prompt = _token_list(item["prompt_ids"], "prompt_ids", where, vocab_size)
            answer = _token_list(item["answer_ids"], "answer_ids", where, vocab_size)
            if not prompt:
                raise StreamspecError(f"{where}: prompt_ids is empty.")
            records.append(Record(len(records), str(item.get("id", number)), split, prompt, answer, domain_of(item)))
    if not records:
        raise StreamspecError(f"The data file {path} holds no records.")
    return records


def split_records(records: list[Record], max_length: int) -> tuple[list[Record], list[Record], int]:
    """(train, heldout, skipped): records with an answer that fit in max_length tokens.

    Without any "heldout" record, every 20th record is held out, so there is always
    something to measure on.
    """
    usable = [r for r in records if r.answer_ids and len(r.tokens) <= max_length]
    skipped = len(records) - len(usable)
    if len(usable) < 2:
        raise StreamspecError(
            f"The data holds {len(usable)} usable records (non-empty answer, at most {max_length} "
            "tokens); training needs at least 2."
        )
    heldout = [r for r in usable if r.split == "heldout"]
    if not heldout:
        heldout = usable[19::20] or usable[-1:]
    held = {r.index for r in heldout}
    train = [r for r in usable if r.index not in held]
    if not train:
        raise StreamspecError("Every usable record is in the heldout split; training needs \"train\" records.")
    return train, heldout, skipped


def heldout_by_domain(heldout: list[Record], per_domain: int) -> dict[str, list[Record]]:
    """The first `per_domain` held-out records of each domain, domains sorted by name."""
    groups: dict[str, list[Record]] = {}
    for record in heldout:
        group = groups.setdefault(record.domain, [])
        if len(group) < per_domain:
            group.append(record)
    return dict(sorted(groups.items()))


def record_windows(record: Record, window: int) -> list[Window]:
    """The record's trained positions [P - 1, T - 1), cut into windows of `window` positions."""
    end = len(record.tokens) - 1
    return [Window(record, s, min(s + window, end)) for s in range(record.first_position, end, window)]


def window_stream(records: list[Record], window: int, seed: int) -> Iterator[Window]:
    """Endless windows: each epoch shuffles the records (seeded by seed and epoch) and
    yields each record's windows in order, so a record's lower-layer pass serves all of them."""
    epoch = 0
    while True:
        order = list(records)
        random.Random(f"{seed}:{epoch}").shuffle(order)
        for record in order:
            yield from record_windows(record, window)
        epoch += 1
