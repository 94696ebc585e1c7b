"""Self-distillation: the base model's own greedy answers become the training data.

In lossless mode the streams learn to predict what the main stream (the unchanged base
model) will say, so the right targets are the base model's greedy answers, not some
dataset's human answers. Each output line holds the token ids training reads:

    {"id", "split", "domain", "prompt_ids": [...], "answer_ids": [...], "text", "base"}

`answer_ids` ends with the EOS token when the model produced one within the budget;
`base` is a prefix of the base model's fingerprint, so a resumed run never mixes two
models' answers in one file.

Answers come from continuous batching (`batched.py`): many prompts per forward pass,
no padding. In fp32 a batch can differ from one-at-a-time greedy decoding at rare
near-ties of the top two logits (other matmul shapes, other summation order); the
tests allow exactly that and nothing more. Training only needs answers the model
gives, and the lossless guarantee is checked against the model itself, not this file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .data import domain_of
from .errors import StreamspecError
from .loading import base_fingerprint, load_tokenizer, resolve_base

PathLike = Union[str, os.PathLike]


def _is_message(message: Any) -> bool:
    return isinstance(message, dict) and isinstance(message.get("content"), str) and "role" in message


def read_prompts(path: PathLike, limit: Optional[int] = None) -> list[dict[str, Any]]:
    """Prompt records ({"id", "messages", ...}) of a JSONL file, checked line by line."""
    path = Path(path)
    if not path.is_file():
        raise StreamspecError(f"The prompts file {path} does not exist.")
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise StreamspecError(f"Line {number} of {path} is not UTF-8 text.") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise StreamspecError(f"Line {number} of {path} is not valid JSON.") from None
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                raise StreamspecError(f"Line {number} of {path} has no string 'id'.")
            messages = record.get("messages")
            if not (isinstance(messages, list) and messages and all(map(_is_message, messages))):
                raise StreamspecError(
                    f"Line {number} of {path} has no list of 'messages' with 'role' and 'content'."
                )
            if record.get("split", "train") not in ("train", "heldout"):
                raise StreamspecError(f"Line {number} of {path} has a split other than 'train' or 'heldout'.")
            if record["id"] in seen:
                raise StreamspecError(f"Line {number} of {path} repeats the id {record['id']!r}.")
            seen.add(record["id"])
            records.append(record)
            if limit is not None and len(records) >= limit:
                break
    return records


def _done_ids(out_path: Path, base: str) -> set[str]:
    """Ids already answered in `out_path`, after cutting off a half-written last line."""
    if not out_path.exists():
        return set()
    data = out_path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # a run killed mid-write: drop the partial line, redo that prompt
        with open(out_path, "r+b") as handle:
            handle.truncate(end)
        data = data[:end]
    done: set[str] = set()
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record_id, record_base = record["id"], record.get("base")
        except (json.JSONDecodeError, KeyError, TypeError):
            raise StreamspecError(
                f"Line {number} of {out_path} is not a distilled record; pick another output path."
            ) from None
        if record_base not in (None, base):
            raise StreamspecError(
                f"{out_path} holds answers of another base model; pick another output path."
            )
        done.add(record_id)
    return done


def _eos_ids(folder: Path, tokenizer: Any) -> list[int]:
    # The generation config's EOS (SmolLM2: <|im_end|>) plus the tokenizer's, in case
    # a model folder sets only one of them.
    from transformers import GenerationConfig

    try:
        ids = GenerationConfig.from_pretrained(str(folder)).eos_token_id
    except OSError:  # no generation_config.json
        ids = None
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]], record_id: str = "") -> list[int]:
    """Token ids of the chat-formatted prompt, ready for the assistant's answer."""
    if not tokenizer.chat_template:
        raise StreamspecError("The base model's tokenizer has no chat template, which distillation needs.")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # templates may raise on, e.g., a system turn they do not allow
        raise StreamspecError(f"The chat template rejected prompt {record_id!r} ({exc}).") from None
    # The template already writes every special token; the runtime (tokenizers +
    # jinja2) encodes the same text the same way, without adding any.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def distill(
    base: Optional[str],
    prompts_path: Union[PathLike, Sequence[PathLike]],
    out_path: PathLike,
    max_new_tokens: int = 128,
    batch_size: int = 48,
    limit: Optional[int] = None,
    progress: bool = True,
    threads: int = 2,
) -> dict[str, int]:
    """Append the base model's greedy answers to `out_path`, one JSON line per prompt.

    prompts_path: one prompts file or several (`limit` applies to each). Answers come
    from continuous batching (`batched.SlotDecoder`, `batch_size` prompts at once);
    held-out prompts go first and the train prompts of the domains take turns, so a
    stopped run leaves a balanced mix. Resumable: prompts whose id is already in
    `out_path` are skipped, and each answer is written (one flushed line) as soon as it
    ends, so a stopped run loses only the answers in flight.
    Returns {"total", "skipped", "written"}.
    """
    if max_new_tokens < 1:
        raise StreamspecError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    if batch_size < 1:
        raise StreamspecError(f"The batch size must be at least 1, got {batch_size}.")
    if limit is not None and limit < 1:
        raise StreamspecError(f"The prompt limit must be at least 1, got {limit}.")
    paths = [prompts_path] if isinstance(prompts_path, (str, os.PathLike)) else list(prompts_path)
    records: list[dict[str, Any]] = []
    for path in paths:
        records.extend(read_prompts(path, limit))
    repeated = _first_repeat(r["id"] for r in records)
    if repeated is not None:
        raise StreamspecError(f"The prompt id {repeated!r} appears in more than one prompts file.")
    folder = resolve_base(base, progress=progress)
    fingerprint = base_fingerprint(folder)[:16]
    out_path = Path(out_path)
    if out_path.is_dir():
        raise StreamspecError(f"The output path {out_path} is a folder, not a file.")
    done = _done_ids(out_path, fingerprint)
    todo = interleave([r for r in records if r["id"] not in done])
    stats = {"total": len(records), "skipped": len(records) - len(todo), "written": 0}
    if not todo:
        return stats

    import torch

    from .batched import Job, SlotDecoder
    from .model import build_model

    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(folder)
    model = build_model(folder)
    eos_ids = _eos_ids(folder, tokenizer)
    jobs = [Job(r, prompt_ids(tokenizer, r["messages"], r["id"]), max_new_tokens) for r in todo]
    longest = max(len(job.prompt) for job in jobs) + max_new_tokens
    if longest > model.config.max_position_embeddings:
        job = max(jobs, key=lambda j: len(j.prompt))
        raise StreamspecError(
            f"Prompt {job.key['id']!r} ({len(job.prompt)} tokens) plus {max_new_tokens} new tokens exceeds the "
            f"model's context of {model.config.max_position_embeddings} tokens.")
    decoder = SlotDecoder(model, min(batch_size, len(jobs)), max_length=longest)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "a", encoding="utf-8") as handle, _progress_bar(progress) as bar:
        task = bar.add_task("distilling", total=len(records), completed=stats["skipped"]) if bar else None
        for job, answer in decoder.decode(jobs, eos_ids):
            record = job.key
            line = {
                "id": record["id"],
                "split": record.get("split", "train"),
                "domain": domain_of(record),
                "prompt_ids": list(job.prompt),
                "answer_ids": answer,
                "text": tokenizer.decode(answer, skip_special_tokens=True),
                "base": fingerprint,
            }
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
            handle.flush()
            stats["written"] += 1
            if bar:
                bar.update(task, advance=1)
    return stats


def interleave(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Held-out records first, then the train records with the domains taking turns
    (each domain keeps its order)."""
    ordered: list[dict[str, Any]] = []
    for split in ("heldout", "train"):
        queues: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            if record.get("split", "train") == split:
                queues.setdefault(domain_of(record), []).append(record)
        columns = list(queues.values())
        for i in range(max((len(c) for c in columns), default=0)):
            ordered.extend(column[i] for column in columns if i < len(column))
    return ordered


def _first_repeat(ids) -> Optional[str]:
    seen: set[str] = set()
    for record_id in ids:
        if record_id in seen:
            return record_id
        seen.add(record_id)
    return None


class _NoBar:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _progress_bar(enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )


def write_mix(out_path: PathLike, settings: dict[str, Any]) -> Path:
    """Record what a distilled file holds next to it (OUT.mix.json, written atomically):
    answers and answer tokens per domain and split, and the settings that made them."""
    from streamspec.files import write_json

    out_path = Path(out_path)
    counts: dict[str, dict[str, dict[str, int]]] = {}
    with open(out_path, "rb") as handle:
        for raw in handle:
            if not raw.strip():
                continue
            record = json.loads(raw)
            entry = counts.setdefault(domain_of(record), {}).setdefault(
                record.get("split", "train"), {"answers": 0, "answer_tokens": 0})
            entry["answers"] += 1
            entry["answer_tokens"] += len(record.get("answer_ids", []))
    path = out_path.with_name(out_path.stem + ".mix.json")
    write_json(path, {"format": "streamspec-distill-mix", "data": out_path.name, "settings": settings,
                      "domains": dict(sorted(counts.items()))})
    return path
