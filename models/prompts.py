"""Prompts from real text that every machine has: the Python standard library.

Self-distillation needs prompts, and a fresh machine (or a Jetson) has no dataset but
does have the standard library's source. Three kinds are harvested with `ast`:

- ``complete``: a function's signature and docstring, asking for the body;
- ``summarise``: a module or class docstring, asking for a short summary;
- ``explain``: a short function's source (docstring removed), asking what it does.

Everything is deterministic (sorted files, source order, content dedupe), and the
train / held-out split is by source file, so no file's code leaks across the split.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
import textwrap
import tokenize
from pathlib import Path
from typing import Iterator, Optional, Union

from .errors import StreamspecError

KINDS = ("complete", "summarise", "explain")
SPLITS = ("train", "heldout")
MAX_CHARS = 1200  # longest user message; keeps prompts well inside a small context
MIN_SUMMARY_DOC = 120  # shorter docstrings are not worth summarising
MIN_COMPLETE_DOC = 30  # a docstring that says too little gives the model nothing to go on
EXPLAIN_LINES = (3, 30)  # code lines (docstring removed) of an "explain" function
HELDOUT_PERCENT = 10

# Folders of the standard library that hold tests, tools, generated tables or vendored
# wheels rather than ordinary library code.
SKIP_DIRS = {
    "test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "__pycache__",
    "lib2to3", "turtledemo", "ensurepip", "pydoc_data", "encodings", "__phello__", "lib-dynload",
}


def stdlib_root() -> Path:
    """The folder that holds the standard library's .py files."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(source: str) -> str:
    """'heldout' for about HELDOUT_PERCENT % of source files, by a hash of the path."""
    bucket = int(hashlib.sha256(source.encode("utf-8")).hexdigest(), 16) % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def source_files(root: Path) -> list[Path]:
    """Library .py files under `root`, sorted by relative path."""
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("test_") or (rel.parts[0] == "venv" and "scripts" in rel.parts):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _module_name(rel: str) -> str:
    name = rel[: -len(".py")].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _docstring_node(node: ast.AST) -> Optional[ast.Expr]:
    body = getattr(node, "body", None)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):
            return body[0]
    return None


def _code(lines: list[str], first: int, last: int, skip: tuple[int, int] = (0, 0)) -> str:
    """Source lines first..last (1-based, inclusive) without lines in `skip`, dedented."""
    kept = [lines[i - 1].rstrip() for i in range(first, last + 1) if not skip[0] <= i <= skip[1]]
    return textwrap.dedent("\n".join(kept)).strip("\n")


def _trim_paragraphs(doc: str, budget: int) -> str:
    """Whole leading paragraphs of `doc` that fit in `budget` characters ('' if none)."""
    kept: list[str] = []
    for para in doc.split("\n\n"):
        if len("\n\n".join(kept + [para])) > budget:
            break
        kept.append(para)
    return "\n\n".join(kept).strip()


def _definitions(body: list[ast.stmt], prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    """(qualified name, node) of classes and functions in source order, looking inside
    classes and module-level if/try blocks but not inside functions."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
        elif isinstance(node, ast.ClassDef):
            yield prefix + node.name, node
            yield from _definitions(node.body, prefix + node.name + ".")
        elif isinstance(node, ast.If):
            yield from _definitions(node.body + node.orelse, prefix)
        elif isinstance(node, ast.Try):
            yield from _definitions(node.body + node.orelse + node.finalbody, prefix)


def _file_prompts(path: Path, rel: str) -> Iterator[tuple[str, str, str]]:
    """(kind, name, user message) for every prompt one source file gives."""
    try:
        with tokenize.open(path) as handle:  # honours the file's coding cookie
            text = handle.read()
        tree = ast.parse(text)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return
    lines = text.splitlines()
    module = _module_name(rel)

    def summarise(what: str, doc: str) -> Optional[str]:
        head = f"Summarise this docstring of the Python {what} in two or three sentences.\n\n"
        doc = _trim_paragraphs(doc, MAX_CHARS - len(head) - 8)
        return head + f'"""\n{doc}\n"""' if len(doc) >= MIN_SUMMARY_DOC else None

    doc = ast.get_docstring(tree)
    if doc and (message := summarise(f"module `{module}`", doc)):
        yield "summarise", "", message

    for name, node in _definitions(tree.body):
        doc_node = _docstring_node(node)
        if isinstance(node, ast.ClassDef):
            doc = ast.get_docstring(node)
            if doc and (message := summarise(f"class `{module}.{name}`", doc)):
                yield "summarise", name, message
            continue
        what = f"method `{name}`" if "." in name else f"function `{name}`"
        code_after_doc = node.body[1:] if doc_node else node.body
        # complete: signature + docstring; only when there is a body left to write
        if doc_node and code_after_doc and len(ast.get_docstring(node) or "") >= MIN_COMPLETE_DOC:
            code = _code(lines, node.lineno, doc_node.end_lineno)
            message = (
                f"Complete the Python {what} from the `{module}` module. "
                f"Reply with the whole function in a Python code block.\n\n```python\n{code}\n```"
            )
            if len(message) <= MAX_CHARS:
                yield "complete", name, message
        # explain: the short source without its docstring (else the answer is given)
        if code_after_doc and (not doc_node or doc_node.lineno > node.lineno):
            skip = (doc_node.lineno, doc_node.end_lineno) if doc_node else (0, 0)
            code = _code(lines, node.lineno, node.end_lineno, skip)
            stripped = [line.strip() for line in code.splitlines()]
            n_lines = sum(1 for line in stripped if line and not line.startswith("#"))
            message = (
                f"Explain what this Python {what} from the `{module}` module does."
                f"\n\n```python\n{code}\n```"
            )
            if EXPLAIN_LINES[0] <= n_lines <= EXPLAIN_LINES[1] and len(message) <= MAX_CHARS:
                yield "explain", name, message


def collect_prompts(root: Optional[Path] = None, limit: Optional[int] = None) -> list[dict]:
    """Prompt records of the standard library (or of `root`), in a deterministic order.

    Without `limit`: every prompt, files in path order, each file's in source order.
    With `limit`: files are visited in the order of a hash of their path, each gives at
    most limit/20 prompts, and the held-out split gets its HELDOUT_PERCENT share, so a
    small harvest is quick (it parses only the files it needs) yet still mixes many
    files, all kinds and both splits.
    """
    root = Path(root) if root is not None else stdlib_root()
    files = [(path, path.relative_to(root).as_posix()) for path in source_files(root)]
    quota: Optional[dict[str, int]] = None
    per_file = None
    if limit is not None:
        files.sort(key=lambda item: hashlib.sha256(item[1].encode("utf-8")).hexdigest())
        heldout = round(limit * HELDOUT_PERCENT / 100)
        quota = {"train": limit - heldout, "heldout": heldout}
        per_file = -(-limit // 20)
    seen_content: set[str] = set()
    records: list[dict] = []
    for path, rel in files:
        split = split_of(rel)
        if quota is not None and quota[split] == 0:
            continue  # this split is full: do not even parse the file
        seen_ids: dict[str, int] = {}
        taken = 0
        for kind, name, message in _file_prompts(path, rel):
            base_id = f"{kind}:{_module_name(rel)}" + (f":{name}" if name else "")
            # A name can repeat in one file (property setters, platform branches).
            seen_ids[base_id] = seen_ids.get(base_id, 0) + 1
            record_id = base_id if seen_ids[base_id] == 1 else f"{base_id}#{seen_ids[base_id]}"
            digest = hashlib.sha256(message.encode("utf-8")).hexdigest()
            if digest in seen_content:  # the same text twice teaches nothing new
                continue
            if quota is not None:
                if taken == per_file or quota[split] == 0:
                    break
                quota[split] -= 1
                taken += 1
            seen_content.add(digest)
            records.append(
                {
                    "id": record_id,
                    "kind": kind,
                    "domain": "stdlib",
                    "source": rel,
                    "split": split,
                    "messages": [{"role": "user", "content": message}],
                }
            )
        if quota is not None and not any(quota.values()):
            break
    # Path order for reading; sort is stable, so each file keeps its source order.
    return sorted(records, key=lambda record: record["source"])


def harvest(
    out_dir: Union[str, os.PathLike], limit: Optional[int] = None, root: Optional[Path] = None
) -> dict[str, int]:
    """Write `train.jsonl` and `heldout.jsonl` into `out_dir`; return the counts.

    Counts are keyed "train", "heldout" and "<split>/<kind>". With `limit`, at most
    `limit` prompts are kept, spread over files as `collect_prompts` describes.
    """
    if limit is not None and limit < 1:
        raise StreamspecError(f"The prompt limit must be at least 1, got {limit}.")
    records = collect_prompts(root, limit)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StreamspecError(f"The output folder {out_dir} could not be created ({exc.strerror}).") from None
    counts = {split: 0 for split in SPLITS}
    counts.update({f"{split}/{kind}": 0 for split in SPLITS for kind in KINDS})
    for split in SPLITS:
        path = out_dir / f"{split}.jsonl"
        tmp = path.with_name(path.name + ".tmp")
        # Written whole, then renamed, so a stopped harvest never looks complete.
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in records:
                if record["split"] == split:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                    counts[split] += 1
                    counts[f"{split}/{record['kind']}"] += 1
        os.replace(tmp, path)
    return counts
