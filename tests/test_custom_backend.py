"""The `custom` attention backend (streamspec.TreeAttention) end to end on CPU:
export, the runtime's automatic registration of the op library, and greedy output
equal to the `portable` backend and to transformers.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from builders import PROMPTS, SHARPEN, hf_greedy
from helpers import assert_tokens_match, generate_with_oracle_trees
from streamspec import custom_ops
from streamspec.errors import StreamspecError
from streamspec.runtime import Engine


@pytest.fixture(scope="session")
def custom_library() -> Path:
    """The CPU TreeAttention library (cached: rebuilt only when the kernels change)."""
    if not shutil.which("cmake"):
        pytest.skip("cmake is not installed, the TreeAttention library cannot be built")
    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("no C++ compiler (g++) is installed, the TreeAttention library cannot be built")
    return custom_ops.build()


@pytest.fixture(scope="module")
def backends(custom_library, tiny_model_dir, shared_export) -> dict[str, Path]:
    """HF folder and the same MSA model exported with each backend (shared with other
    test files: read only)."""
    # Sharpened weights: greedy text varies instead of repeating one token, so that
    # drafts, acceptance and compaction see different trees at every step.
    folders = {"hf": tiny_model_dir("llama", seed=1, sharpen=SHARPEN)}
    for backend in ("portable", "custom"):
        folders[backend] = shared_export(seed=1, sharpen=SHARPEN, backend=backend)
    return folders


def test_custom_folder_names_the_op(backends):
    import json

    config = json.loads((backends["custom"] / "streamspec.json").read_text())
    assert config["attention"] == {"backend": "custom", "op": "streamspec.TreeAttention", "stream_nodes": "all", "trees": True}


@pytest.mark.parametrize("compaction", ["host", "graph"])
def test_custom_greedy_equals_portable_and_transformers(backends, compaction):
    custom = Engine(backends["custom"], provider="cpu", compaction=compaction, budget=6, fallback=False)
    portable = Engine(backends["portable"], provider="cpu", compaction=compaction, budget=6, fallback=False)
    for prompt in PROMPTS:
        reference, logits = hf_greedy(backends["hf"], prompt, 40)
        for speculative in (False, True):
            ours = custom.generate(prompt, max_new_tokens=40, speculative=speculative, ignore_eos=True)
            theirs = portable.generate(prompt, max_new_tokens=40, speculative=speculative, ignore_eos=True)
            assert_tokens_match(ours.token_ids, reference, logits)
            assert_tokens_match(ours.token_ids, theirs.token_ids, logits)
            assert ours.stats.steps == theirs.stats.steps  # same drafts, same acceptance


def test_custom_step_outputs_equal_portable(backends):
    """One tree step on both backends: same top-K, same draft, probabilities within rounding."""
    prompt, n = np.array([5, 40, 41, 42, 9, 77, 12, 13]), 8
    # A branching tree after the prompt: root 0, children 1 and 2, 3 under 2, 4 under 1.
    tree, parents = np.array([30, 31, 44, 45, 32]), np.array([-1, 0, 0, 2, 1], dtype=np.int32)
    outs = {}
    for backend in ("portable", "custom"):
        session = Engine(backends[backend], provider="cpu").session
        session.run(_feeds(prompt, np.arange(-1, n - 1, dtype=np.int32), 0))
        outs[backend] = session.run(_feeds(tree, parents, n))
    a, b = outs["portable"], outs["custom"]
    np.testing.assert_array_equal(a["main_ids"], b["main_ids"])
    np.testing.assert_allclose(a["main_probs"], b["main_probs"], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(a["draft_node"], b["draft_node"])
    np.testing.assert_array_equal(a["stream_ids"], b["stream_ids"])
    np.testing.assert_allclose(a["stream_probs"], b["stream_probs"], rtol=1e-4, atol=1e-6)


def _feeds(tokens: np.ndarray, parents: np.ndarray, past: int) -> dict[str, np.ndarray]:
    """Greedy feeds for a tree with streams for all nodes and outputs for all nodes."""
    n = len(tokens)
    mask = np.eye(n, dtype=bool)
    depth = np.zeros(n, dtype=np.int64)
    for i in range(1, n):
        mask[i] |= mask[parents[i]]
        depth[i] = depth[parents[i]] + 1
    nodes = np.arange(n, dtype=np.int64)
    empty = np.zeros(0, dtype=np.int64)
    return dict(input_ids=tokens.astype(np.int64), positions=past + depth, tree_mask=mask, tree_parent=parents,
                past_length=np.array([past], dtype=np.int64), compact_src=empty, stream_nodes=nodes,
                output_nodes=nodes, sample_rows=empty, exit_nodes=empty, temperature=np.ones(1, np.float32),
                top_k=np.zeros(1, np.int64), top_p=np.ones(1, np.float32), uniform=np.zeros(0, np.float32))


def test_missing_library_is_one_sentence(backends, monkeypatch, tmp_path):
    monkeypatch.setenv("STREAMSPEC_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(StreamspecError, match="streamspec build-ops"):
        Engine(backends["custom"], provider="cpu")


def test_custom_compaction_with_long_accepted_paths(backends, monkeypatch):
    """Oracle trees (the true continuation off the first branch) make long accepted
    paths with path[i] != i, so the op's compaction moves rows every step."""
    prompt = PROMPTS[0]
    reference, logits = hf_greedy(backends["hf"], prompt, 30)
    for compaction in ("host", "graph"):
        engine = Engine(backends["custom"], provider="cpu", compaction=compaction, fallback=False)
        pieces, stats = generate_with_oracle_trees(engine, engine.prompt_ids(prompt), reference, 30, monkeypatch)
        assert_tokens_match(pieces, reference, logits)
        assert len(pieces) == 30 and max(stats.accepted) >= 2


def test_bench_attention_reports_both_backends(custom_library, smollm2_dir, tmp_path):
    """The benchmark command runs end to end (tiny model) and writes one row per cell."""
    import json

    from streamspec.tools import bench_attention

    out = tmp_path / "attention.json"
    code = bench_attention.main(["--model", "tiny", "--trees", "1", "5", "--pasts", "16", "300",
                                 "--repeats", "2", "--warmup", "1", "--threads", "1", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    cells = {(row["past_length"], row["tree_size"]) for row in report["results"]}
    assert cells == {(16, 1), (16, 5), (300, 1), (300, 5)}
    op_cells = {(row["past_length"], row["tree_size"], row["layer"], row["rows"]) for row in report["op_results"]}
    assert op_cells == {(p, t, layer, t * (1 + g)) for p in (16, 300) for t in (1, 5)
                        for layer, g in (("lower", 0), ("MSA", 3))}
    for row in report["results"] + report["op_results"]:
        assert row["portable_ms"] > 0 and row["custom_ms"] > 0 and row["speedup"] > 0
    for bad in (["--trees", "0"], ["--pasts", "-3"], ["--repeats", "0"]):
        assert bench_attention.main(["--model", "tiny", "--json", str(out), *bad]) == 1
    if "CUDAExecutionProvider" not in ort.get_available_providers():  # a missing GPU: one sentence
        assert bench_attention.main(["--provider", "cuda", "--model", "tiny", "--json", str(out)]) == 1
