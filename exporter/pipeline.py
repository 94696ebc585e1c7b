"""Checkpoint or base model -> deployable folder (runtime/folder.py documents the folder).

    export(spec, out_dir)              resolve a checkpoint folder or a base-model spec
    export_model(model, tok_dir, out)  trace a `Transformer` object

The folder is assembled in a hidden temporary sibling (.NAME.tmp-XXXX) and renamed into
place only when it is complete and a smoke generation on it has run, so a failed export
leaves nothing half-written. A killed export (SIGKILL runs no cleanup) leaves its
temporary sibling behind; an flock on the sibling's .lock file, held while the export
runs, lets the next export into the same parent folder tell such leftovers from an
export still running, and remove them.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional, Union

import torch

from streamspec import __version__
from streamspec.errors import StreamspecError
from streamspec.files import write_json
from streamspec.models.model import Transformer
from streamspec.runtime.folder import CONFIG_FILE, FORMAT, FORMAT_VERSION
from streamspec.runtime.tree_settings import TreeSettings, default_streams

from . import custom, fusions, kv_cache, portable, quantize as quantization, sampler, step
from . import ops  # noqa: F401  (registers torch.ops.streamspec.*)
from .graph_edits import drop_unused_inputs

BACKENDS = {"portable": portable, "custom": custom}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to model.onnx.data
DEFAULT_BUDGET = TreeSettings().budget  # draft nodes per tree, when neither the caller nor the checkpoint says
TRACE_CACHE_LENGTH = 64  # the cache length is a dynamic dimension; any value traces


def export(spec: Union[str, os.PathLike], out_dir: Union[str, os.PathLike], streams: Optional[int] = None,
           **options: Any) -> Path:
    """Export a streamspec checkpoint folder, or a base model ("default", a Hugging Face
    folder or a .gguf file) for autoregressive use. streams: deploy only the first n of
    the trained streams (fewer rows per tree node; exact, see `Transformer.keep_streams`).
    A checkpoint's `deploy` entry gives the defaults of `streams`, `budget` and `lookup`;
    without either, a budget of B < γ draft nodes deploys B streams (`default_streams`).
    Other options: see `export_model`."""
    model, tokenizer_dir, base_dir, source = load_source(spec)
    deploy = source.get("deploy", {})  # a checkpoint's measured defaults
    streams = deploy.get("streams") if streams is None else streams
    if options.get("budget") is None:
        options["budget"] = int(deploy.get("budget", DEFAULT_BUDGET))
    if options.get("lookup") is None:
        options["lookup"] = int(deploy.get("lookup", 0))
    if streams is None and not options.get("autoregressive"):
        streams = default_streams(model.num_streams, options["budget"])
        if streams is not None:
            _reporter(options.get("progress", True))(
                f"Deploying streams 1..{streams} of {model.num_streams}: a tree of {options['budget']} draft "
                f"nodes is never deeper than {streams} (--streams {model.num_streams} keeps them all, for larger "
                "budgets)")
    if streams is not None:
        if not model.num_streams:
            raise StreamspecError(f"{spec} has no streams, so --streams does not apply.")
        if not 1 <= streams <= model.num_streams:
            raise StreamspecError(f"--streams must be between 1 and the {model.num_streams} trained streams, "
                                  f"got {streams}.")
        model.keep_streams(streams)
    return export_model(model, tokenizer_dir, out_dir, source=source, base_dir=base_dir, **options)


def checkpoint_hash(folder: Path) -> str:
    """sha256 of a checkpoint's streamspec.json."""
    import hashlib

    return hashlib.sha256((Path(folder) / CONFIG_FILE).read_bytes()).hexdigest()


def load_source(spec: Union[str, os.PathLike]) -> tuple[Transformer, Path, Path, dict[str, str]]:
    """(model, folder with the tokenizer, base model folder, source description) for an
    export spec. Bad input raises `StreamspecError` (one class for every part,
    streamspec/errors.py), which passes through to the caller as it is."""
    path = Path(spec).expanduser()
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        if (path / MODEL_FILE).is_file():
            raise StreamspecError(f"{path} is already an exported folder; pass a checkpoint or a base model.")
        from streamspec.models.checkpoint import load_checkpoint

        model, info = load_checkpoint(path)
        # The checkpoint description's hash (it holds the weights' and vocabulary's
        # hashes) tells a cached export of an older checkpoint apart.
        source = {"kind": "checkpoint", "name": str(path.resolve()), "sha256": checkpoint_hash(path)}
        if info.deploy:
            source["deploy"] = info.deploy
        return model.eval(), info.tokenizer_folder, info.base_folder, source
    from streamspec.models.loading import resolve_base
    from streamspec.models.model import build_model

    base = resolve_base(spec)
    return build_model(base), base, base, {"kind": "base", "name": str(spec)}


def export_model(model: Transformer, tokenizer_dir: Union[str, os.PathLike], out_dir: Union[str, os.PathLike], *,
                 dtype: str = "fp32", max_length: Optional[int] = None, candidates: int = 8,
                 full_logits: bool = False, backend: str = "portable", budget: int = DEFAULT_BUDGET, slim: bool = True,
                 force: bool = False, source: Optional[dict[str, str]] = None, base_dir: Optional[Path] = None,
                 progress: bool = True, quantize: str = "none", block_size: int = quantization.DEFAULT_BLOCK_SIZE,
                 quantize_head: bool = True, quant_activations: str = quantization.DEFAULT_ACTIVATIONS,
                 kv_dtype: str = "none", pruning: bool = False, full_draft_vocab: bool = False,
                 gguf_blocks: bool = True, quant_method: str = "default", autoregressive: bool = False,
                 lookup: int = 0) -> Path:
    """Trace `model` into a deployable folder at `out_dir` and return its path.

    dtype: "fp32" or "fp16" weights, activations and KV cache. quantize: "none", "int8"
    or "int4" weight-only quantization (exporter/quantize.py) in blocks of `block_size`
    along K; quantize_head: the LM head too; quant_activations: "fp32" or "int8" (per
    row and block, faster on CPU) inside the quantized MatMuls. kv_dtype: "none", or an
    "int8" / "int4" KV cache with calibrated per-channel scales (exporter/kv_cache.py,
    portable backend). max_length: the largest
    cache (default: the model's positions, at most 2048). candidates: K of every
    top-K output. full_logits: also output the main stream's logits [O, V]. backend:
    "portable" (GroupQueryAttention) or "custom" (streamspec.TreeAttention). budget:
    the runtime's default number of draft nodes. slim: run onnxslim on the graph.
    base_dir: the base model's folder, for its generation_config.json (end-of-sequence
    ids), when the tokenizer folder lacks one. pruning: also write the step cut in two
    (lower.onnx, upper.onnx; exporter/step.py) for tree pruning at run time.
    full_draft_vocab: stream rows and the early-exit head score the whole vocabulary even
    when the checkpoint has a reduced drafting vocabulary (models/vocab.py).
    gguf_blocks: with quantize, when the base model is a GGUF file, carry its own blocks
    into the quantized ops (exporter/gguf_blocks.py) instead of re-quantizing them.
    quant_method: the weight-only algorithm for what is quantized (quantize.METHODS).
    autoregressive: a graph for one-token-at-a-time decoding only: the main stream as a
    plain decoder, GroupQueryAttention's causal rule instead of tree visibility, no tree
    inputs (fewer nodes per step; the runtime then refuses draft budgets and lookup).
    budget, lookup: the runtime's default tree (draft nodes from the streams, prompt-lookup
    tokens); `streamspec tune` measures and rewrites them on the device.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    tokenizer_dir = Path(tokenizer_dir)
    max_length = _check_options(model, tokenizer_dir, out_dir, dtype, max_length, candidates, backend, budget, force)
    quantization.check_quantization(quantize, block_size, quant_activations, quant_method)
    kv = kv_cache.check_kv_dtype(kv_dtype, backend)
    if pruning and not model.num_streams:
        raise StreamspecError("--pruning needs a model with streams (a checkpoint written by `streamspec train`).")
    if autoregressive and (backend != "portable" or pruning):
        raise StreamspecError("--autoregressive uses the portable attention backend and no trees, so it cannot be "
                              "combined with --attention custom or --pruning.")
    if pruning and kv:
        raise StreamspecError("--pruning and --kv-dtype cannot be combined yet; export without one of them.")
    say = _reporter(progress)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with work_folder(out_dir, say) as tmp:
        if autoregressive:
            model, budget, lookup = model.main_stream_only(), 0, 0
        if dtype != "fp32":
            model = copy.deepcopy(model).to(DTYPES[dtype])
        if full_draft_vocab and model.draft_vocab is not None:
            model = copy.copy(model)  # the same modules, without the drafting vocabulary
            model.draft_vocab = None
        blocks = _gguf_blocks(model, base_dir, say) if quantize != "none" and gguf_blocks and dtype == "fp32" else None
        say(f"Tracing the step graph ({'autoregressive' if autoregressive else backend} attention, {dtype})")
        quantizing = dict(quantize=quantize, block_size=block_size, quantize_head=quantize_head,
                          quant_activations=quant_activations, gguf_blocks=blocks, method=quant_method)
        graph = _write_graph(model, "step", tmp, candidates, full_logits, backend, slim, say, max_length,
                             autoregressive=autoregressive, **quantizing)
        parts = {}
        for part in ("lower", "upper") if pruning else ():
            say(f"Tracing the {part} part of the step for tree pruning")
            parts[part] = _write_graph(model, part, tmp, candidates, full_logits, backend, slim, say, max_length,
                                       **quantizing)
        config = deploy_config(model, dtype, max_length, candidates, full_logits, backend, budget, graph,
                               source or {"kind": "model", "name": type(model).__name__}, lookup)
        config["attention"]["trees"] = not autoregressive
        if parts:
            config["graph"]["parts"] = parts
        config["graph"]["kv_dtype"] = None  # the cache has the graph's dtype unless --kv-dtype says otherwise
        config["tokenizer"] = copy_tokenizer(tokenizer_dir, tmp)
        config["tokens"] = token_ids(model, [tokenizer_dir] + ([Path(base_dir)] if base_dir else []))
        write_config(config, tmp)
        if kv:
            say(f"Calibrating the {kv} KV cache on the model's own keys and values")
            _quantize_kv_cache(model, tmp, config, kv, dtype)
        if backend == "portable":
            say("Checking the folder with a short generation")
            smoke_test(tmp)
        _move_into_place(tmp, out_dir)
    return out_dir


# -------------------------------------------------------------------------- steps
def _write_graph(model: Transformer, part: str, folder: Path, candidates: int, full_logits: bool, backend: str,
                 slim: bool, say, max_length: int, quantize: str, block_size: int, quantize_head: bool,
                 quant_activations: str, gguf_blocks: Optional[dict[str, Any]] = None,
                 method: str = "default", autoregressive: bool = False) -> dict[str, Any]:
    """Trace, simplify, quantize and save the step graph or one of its parts; returns its
    entry of streamspec.json's `graph` (file, external data, names, quantization)."""
    proto = trace(model, candidates, full_logits, backend, part, autoregressive)
    fused: dict[str, int] = {}
    if slim:
        say("Simplifying the graph (onnxslim, fusions)")
        proto, fused = simplify(proto, max_length)
    record = None
    if quantize != "none":
        say(f"Quantizing the weights to {quantize} (MatMulNBits, blocks of {block_size})")
        proto, record = quantization.quantize_weights(proto, quantize, block_size, model.config.vocab_size,
                                                      quantize_head, quant_activations, gguf_blocks, method)
    if slim:  # after quantization, which matches a GGUF's blocks weight by weight
        fused["merged_matmuls"] = fusions.merge_sibling_matmuls(proto)
        fused["add_before_split"] = fusions.add_before_split(proto)
        fused["norm_scales"] = fusions.fold_norm_scales(proto)
        if autoregressive:
            fused["packed_attention"] = fusions.pack_chain_attention(proto)
    name = MODEL_FILE if part == "step" else f"{part}.onnx"
    external = _save(proto, folder, name)
    first, last = step.part_layers(model, part)
    return {"file": name, "external_data": external, "quantization": record, "fusions": fused, **_io_names(proto),
            "cache_inputs": step.cache_names(last, first=first), "cache_outputs": step.cache_names(last, "_out", first)}


def _gguf_blocks(model: Transformer, base_dir: Optional[Path], say) -> Optional[dict[str, Any]]:
    """The base GGUF's own blocks, keyed by weight (None for a Hugging Face base)."""
    from .gguf_blocks import gguf_source, read_gguf_blocks

    path = gguf_source(base_dir)
    if path is None:
        return None
    say(f"Reading the quantized blocks of {path.name} (carried as they are, not re-quantized)")
    blocks, skipped = read_gguf_blocks(path, model.config.num_heads, model.config.num_kv_heads, model.config.family)
    if skipped:
        say("Not carried (quantized again): " + ", ".join(f"{n} {kind} tensors" for kind, n in sorted(skipped.items())))
    return blocks


def trace(model: Transformer, candidates: int, full_logits: bool, backend: str, part: str = "step",
          autoregressive: bool = False):
    """The step graph, or its "lower" / "upper" part (step.py), as an ONNX ModelProto
    (torch.onnx dynamo export). autoregressive: attention by GroupQueryAttention's causal
    rule alone (portable.chain_attention), so the tree inputs drop out."""
    attention = BACKENDS[backend]
    attention.register_schema()
    translate = portable.chain_attention if autoregressive else attention.tree_attention
    graph = step.PARTS[part](model.eval(), candidates, full_logits).eval()
    # e.g. "torchvision is not installed", "Attribute type is ambiguous" (onnx_ir, for
    # empty attribute lists the translation writes): not the user's business.
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                graph, step.example_inputs(model, TRACE_CACHE_LENGTH, part), dynamo=True,
                dynamic_shapes=step.dynamic_shapes(model, part), input_names=step.input_names(model, part),
                output_names=step.output_names(model, full_logits, part),
                custom_translation_table={torch.ops.streamspec.tree_attention.default: translate,
                                          torch.ops.streamspec.sample_tokens.default: sampler.sample_tokens})
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    proto = program.model_proto
    drop_unused_inputs(proto.graph)
    return proto


def simplify(proto, max_positions: Optional[int] = None) -> tuple[Any, dict[str, int]]:
    """onnxslim (constant folding, common subexpressions, dead nodes), then our fusions
    (fusions.py; max_positions sizes the RoPE tables). Returns the graph and the
    rewrites per fusion. A step that fails leaves the graph as it was, since a slower
    graph beats no graph."""
    try:
        import onnxslim

        with contextlib.redirect_stdout(io.StringIO()):
            proto = onnxslim.slim(proto) or proto
    except Exception as error:  # onnxslim raises many types on graphs it cannot handle
        warnings.warn(f"onnxslim could not simplify the graph ({error}); keeping it as traced.")
    counts: dict[str, int] = {}
    try:
        proto, counts = fusions.fuse(proto, max_positions)
    except Exception as error:  # the rewriter too
        warnings.warn(f"The ONNX Runtime fusions could not be applied ({error}); keeping the graph unfused.")
    return proto, counts


def _save(proto, folder: Path, name: str = MODEL_FILE) -> Optional[str]:
    """Write the graph file `name`; weights go to `name`.data when large. Returns that
    data file's name or None."""
    import onnx

    external = proto.ByteSize() > EXTERNAL_DATA_BYTES if _fits_protobuf(proto) else True
    data = name + ".data"
    onnx.save_model(proto, str(folder / name), save_as_external_data=external,
                    all_tensors_to_one_file=True, location=data, size_threshold=1024)
    return data if external else None


def _fits_protobuf(proto) -> bool:
    try:
        return proto.ByteSize() < (1 << 31)
    except Exception:  # protobuf refuses to size messages over 2 GiB
        return False


def _io_names(proto) -> dict[str, list[str]]:
    return {"inputs": [v.name for v in proto.graph.input], "outputs": [v.name for v in proto.graph.output]}


def deploy_config(model: Transformer, dtype: str, max_length: int, candidates: int, full_logits: bool,
                  backend: str, budget: int, graph: dict[str, Any], source: dict[str, str],
                  lookup: int = 0) -> dict[str, Any]:
    """streamspec.json without the tokenizer and token sections."""
    cfg = model.config
    streams = model.streams
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "exporter_version": __version__,
        "model": {key: getattr(cfg, key) for key in ("family", "model_type", "vocab_size", "hidden_size",
                                                     "num_layers", "num_heads", "num_kv_heads", "head_dim",
                                                     "intermediate_size", "max_position_embeddings")},
        "streams": None if streams is None else {"num_streams": streams.num_streams,
                                                 "num_msa_layers": streams.num_msa_layers, "mode": streams.mode},
        "attention": {"backend": backend,
                      "op": "com.microsoft.GroupQueryAttention" if backend == "portable"
                      else f"{custom.DOMAIN}.{custom.OP_TYPE}",
                      "stream_nodes": "all" if backend == "custom" else "any"},
        "graph": {**graph, "dtype": dtype, "candidates": min(candidates, cfg.vocab_size), "full_logits": full_logits,
                  "max_length": max_length,
                  "draft_vocab": None if model.draft_vocab is None else len(model.draft_vocab)},
        "tree": TreeSettings(budget=budget, lookup=lookup).as_entry(),
        "source": source,
    }


def write_config(config: dict[str, Any], folder: Path) -> None:
    write_json(folder / CONFIG_FILE, config)


def _quantize_kv_cache(model: Transformer, folder: Path, config: dict[str, Any], kv: str, dtype: str) -> None:
    """Calibrate the cache scales on the finished float folder, then rewrite its graph
    for an int8 / int4 cache (exporter/kv_cache.py) and record it in streamspec.json."""
    import onnx

    peak = kv_cache.calibrate(folder)
    proto = onnx.load(str(folder / MODEL_FILE))  # with its external data, which is rewritten below
    for name in (MODEL_FILE, DATA_FILE):
        (folder / name).unlink(missing_ok=True)  # onnx appends to an existing data file
    graph = config["graph"]
    scales = kv_cache.scales(peak, kv, rotary_pairs=model.pos_embed is None)
    float_type = onnx.TensorProto.FLOAT if dtype == "fp32" else onnx.TensorProto.FLOAT16
    proto = kv_cache.quantize_cache(proto, kv, scales, graph["cache_inputs"], graph["cache_outputs"], float_type)
    graph["external_data"] = _save(proto, folder)
    graph["kv_dtype"] = kv
    graph["kv_cache"] = {"dtype": kv, "scales": "per channel, calibrated", "bit_width": 8 if kv == "int8" else 4,
                         "calibration_prompts": kv_cache.CALIBRATION_PROMPTS}
    write_config(config, folder)


def copy_tokenizer(tokenizer_dir: Path, folder: Path) -> dict[str, Any]:
    """Copy tokenizer.json and write chat_template.jinja; return the tokenizer section."""
    shutil.copy2(tokenizer_dir / "tokenizer.json", folder / "tokenizer.json")
    config = _read_json(tokenizer_dir / "tokenizer_config.json")
    special = _read_json(tokenizer_dir / "special_tokens_map.json")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if not template and (tokenizer_dir / "chat_template.jinja").is_file():
        template = (tokenizer_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if template:
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")

    def token(name: str) -> Optional[str]:
        value = config.get(name) or special.get(name)
        return value.get("content") if isinstance(value, dict) else value

    return {"file": "tokenizer.json", "chat_template": "chat_template.jinja" if template else None,
            "bos_token": token("bos_token"), "eos_token": token("eos_token")}


def token_ids(model: Transformer, folders: list[Path]) -> dict[str, Any]:
    """End-of-sequence ids: the model config's and the generation config's (what
    transformers' generate stops at), from the first folder that has one."""
    eos = [int(t) for t in model.config.eos_token_ids]
    generation = next((g for g in (_read_json(f / "generation_config.json") for f in folders) if g), {})
    extra = generation.get("eos_token_id")
    for t in ([extra] if isinstance(extra, int) else extra or []):
        if int(t) not in eos:
            eos.append(int(t))
    return {"eos_token_ids": eos, "bos_token_id": model.config.bos_token_id,
            "pad_token_id": generation.get("pad_token_id")}


def smoke_test(folder: Path) -> None:
    """A three-token generation on the finished folder, speculative when it has streams."""
    from streamspec.runtime import Engine

    try:
        max_length = min(64, _read_json(folder / CONFIG_FILE)["graph"]["max_length"])
        engine = Engine(folder, provider="cpu", max_length=max_length)
        engine.generate([0, 1, 2], max_new_tokens=3, ignore_eos=True)
    except Exception as error:
        raise StreamspecError(f"The exported graph does not run in onnxruntime ({error}).") from error


# -------------------------------------------------------------------------- helpers
def _check_options(model: Transformer, tokenizer_dir: Path, out_dir: Path, dtype: str, max_length: Optional[int],
                   candidates: int, backend: str, budget: int, force: bool) -> int:
    if dtype not in DTYPES:
        raise StreamspecError(f"--dtype must be fp32 or fp16, got {dtype!r}.")
    if backend not in BACKENDS:
        raise StreamspecError(f"--attention must be portable or custom, got {backend!r}.")
    positions = model.config.max_position_embeddings
    max_length = min(positions, 2048) if max_length is None else int(max_length)  # 0 is out of range, not the default
    if not 16 <= max_length <= positions:
        raise StreamspecError(f"--max-length must be between 16 and the model's {positions} positions, "
                              f"got {max_length}.")
    if candidates < 1:
        raise StreamspecError(f"--candidates must be at least 1, got {candidates}.")
    TreeSettings(budget=budget)  # checked: one sentence for a bad budget
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise StreamspecError(f"{tokenizer_dir} has no tokenizer.json, which the runtime needs.")
    if out_dir.exists() and not force:
        raise StreamspecError(f"{out_dir} already exists; pass --force to replace it.")
    if out_dir.exists() and not (out_dir.is_dir() and (out_dir / CONFIG_FILE).is_file()):
        raise StreamspecError(f"{out_dir} exists and is not an exported folder; refusing to replace it.")
    return max_length


# -------------------------------------------------------------------------- the temporary folder
TMP_INFIX, LOCK_SUFFIX = ".tmp-", ".lock"


@contextlib.contextmanager
def work_folder(out_dir: Path, say: Callable[[str], None] = lambda message: None) -> Iterator[Path]:
    """A hidden temporary sibling of `out_dir` to assemble an export in, removed at the
    end whatever happens (SIGTERM included: the CLI turns it into an exit). Its lock
    file is flocked while the export runs; leftovers of killed exports are removed first."""
    clean_stale_exports(out_dir, say)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{TMP_INFIX}", dir=out_dir.parent))
    lock_path = tmp.with_name(tmp.name + LOCK_SUFFIX)
    lock = _try_lock(lock_path, create=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        lock_path.unlink(missing_ok=True)  # while still held, so no other export can take it for a leftover
        if lock is not None:
            lock.close()


def clean_stale_exports(out_dir: Path, say: Callable[[str], None] = lambda message: None) -> list[Path]:
    """Remove the temporary folders that killed exports to `out_dir` left behind (their
    lock is free); leave those of exports still running (their lock is held), and name
    those without a lock file (an older streamspec's), which cannot be told apart.
    Returns the folders removed."""
    removed, unknown = [], []
    for tmp in sorted(out_dir.parent.glob(f".{glob.escape(out_dir.name)}{TMP_INFIX}*")):
        if not tmp.is_dir():
            continue
        lock_path = tmp.with_name(tmp.name + LOCK_SUFFIX)
        lock = _try_lock(lock_path, create=False)
        if lock is None:
            if not lock_path.exists():
                unknown.append(tmp)
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        lock_path.unlink(missing_ok=True)
        lock.close()
        removed.append(tmp)
    if removed:
        say(f"Removed {len(removed)} temporary folder(s) left by interrupted exports: "
            f"{', '.join(p.name for p in removed)}")
    if unknown:
        say(f"Found temporary folder(s) of an interrupted export without a lock ({', '.join(p.name for p in unknown)}) "
            f"in {out_dir.parent}; remove them if no other export is running.")
    return removed


def _try_lock(path: Path, create: bool) -> Optional[IO[bytes]]:
    """The file at `path`, opened and exclusively flocked, or None when it is missing
    (create False) or locked by a live process. Without fcntl (Windows) nothing is
    locked: the file is returned only when created, so leftovers are never removed."""
    try:
        import fcntl
    except ImportError:
        return open(path, "ab") if create else None
    try:
        handle = open(path, "ab" if create else "rb")
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: a running export holds it
        handle.close()
        return None
    return handle


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp made it private; the folder is meant to be shared
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _reporter(progress: bool):
    if not progress:
        return lambda message: None
    from rich.console import Console

    console = Console(stderr=True)
    return lambda message: console.print(f"[bold]export[/bold] {message}")
