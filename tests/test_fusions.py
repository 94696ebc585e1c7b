"""The exporter's graph fusions (exporter/fusions.py): RoPE -> RotaryEmbedding, residual
Add + RMSNorm -> SkipSimplifiedLayerNormalization, sibling MatMuls -> one MatMul and a
Split. Each must fire on the traced graph (the counts in streamspec.json and the op
types in model.onnx) and leave a step's numbers as the unfused graph computes them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from builders import SHARPEN, export_tiny, random_tree, run_step, save_tiny_model, sharpened_msa
from streamspec.runtime.folder import read_folder
from streamspec.runtime.session import StepSession
from streamspec.runtime.tree import chain_tree


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """One tiny llama with streams, exported fused (the default) and unfused (no_slim),
    in fp32 and int4, with full logits."""
    root = tmp_path_factory.mktemp("fusions")
    hf, model = sharpened_msa(root, seed=1)
    return {"model": model,
            **{f"{name}-{q}": export_tiny(model, hf, root / f"{name}-{q}", full_logits=True, slim=slim, quantize=q)
               for name, slim in (("fused", True), ("plain", False)) for q in ("none", "int4")}}


def ops(folder: Path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)


@pytest.mark.parametrize("quantize", ["none", "int4"])
def test_fusions_fire_on_every_layer(exports, quantize):
    layers = exports["model"].config.num_layers
    folder = exports[f"fused-{quantize}"]
    counts = json.loads((folder / "streamspec.json").read_text())["graph"]["fusions"]
    found = ops(folder)
    # q and k of every layer, from the step's positions (no Cos/Sin/Neg left in the graph).
    assert counts["rotary"] == found["RotaryEmbedding"] == 2 * layers
    assert not {"Cos", "Sin", "Neg"} & set(found)
    # Every norm after a residual add (all but the first layer's attention norm).
    assert counts["skip_rms_norm"] == found["SkipSimplifiedLayerNormalization"] >= 2 * layers - 1
    # q, k, v -> one MatMul (2 fewer) and gate, up -> one (1 fewer) per layer at least.
    assert counts["merged_matmuls"] >= 3 * layers
    plain = ops(exports[f"plain-{quantize}"])
    matmuls = lambda found: found["MatMul"] + found["MatMulNBits"]  # noqa: E731
    assert matmuls(found) + counts["merged_matmuls"] == matmuls(plain)
    assert found["Split"] >= 2 * layers


@pytest.mark.parametrize("quantize", ["none", "int4"])
def test_fused_step_computes_the_unfused_numbers(exports, quantize):
    """Prefill, then a random tree with stream rows: the fused graph's logits, stream
    and draft outputs equal the unfused graph's up to float rounding."""
    outputs = []
    for name in ("fused", "plain"):
        folder = exports[f"{name}-{quantize}"]
        session = StepSession(read_folder(folder), "cpu")
        vocab = read_folder(folder).vocab_size
        prompt = chain_tree(np.random.default_rng(0).integers(0, vocab, 11).tolist())
        first = run_step(session, prompt, 0)
        tree = random_tree(np.random.default_rng(1), 9, vocab)
        outputs.append((first, run_step(session, tree, prompt.size, compact_src=[3, 5])))
    (fused_prefill, fused_tree), (plain_prefill, plain_tree) = outputs
    for fused, plain in ((fused_prefill, plain_prefill), (fused_tree, plain_tree)):
        np.testing.assert_allclose(fused["logits"], plain["logits"], rtol=0, atol=2e-4)
        np.testing.assert_allclose(fused["stream_probs"], plain["stream_probs"], rtol=0, atol=1e-5)
        assert (fused["draft_node"] == plain["draft_node"]).all()


def test_fusions_fire_on_a_model_without_streams(tmp_path):
    """A base model's graph (exported for autoregressive use) feeds its [R] positions to
    RoPE through one Unsqueeze to [1, R, 1]; the rotation is fused there too, and a
    prefill and a tree step compute the unfused graph's logits."""
    from streamspec.models.model import build_model

    hf = save_tiny_model("llama", tmp_path / "hf", seed=2, sharpen=SHARPEN)
    model = build_model(hf).eval()
    folders = {name: export_tiny(model, hf, tmp_path / name, full_logits=True, slim=slim)
               for name, slim in (("fused", True), ("plain", False))}
    found = ops(folders["fused"])
    assert found["RotaryEmbedding"] == 2 * model.config.num_layers
    assert not {"Cos", "Sin", "Neg"} & set(found)
    logits = []
    for folder in folders.values():
        session = StepSession(read_folder(folder), "cpu")
        vocab = read_folder(folder).vocab_size
        prompt = chain_tree(np.random.default_rng(0).integers(0, vocab, 11).tolist())
        first = run_step(session, prompt, 0)["logits"]
        tree = random_tree(np.random.default_rng(1), 9, vocab)
        logits.append((first, run_step(session, tree, prompt.size)["logits"]))
    for fused, plain in zip(*logits):
        np.testing.assert_allclose(fused, plain, rtol=0, atol=2e-4)
