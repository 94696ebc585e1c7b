"""The exporter: the step graph against the PyTorch reference, the in-graph sampler,
the deployable folder and its failure modes.

Parity: the exported step runs on ONNX Runtime next to `Transformer.forward` with
`EagerAttention` on random trees, through a prefill, a tree step and a second tree
step after compacting a random accepted path (in the graph and on the host). Top-K ids
must be equal (where the reference's K-th and next logits are not a near-tie) and
probabilities equal to float32 tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from builders import CANDIDATES, MAX_LENGTH, Reference, export_tiny, msa_model, random_tree, run_step
from helpers import assert_top_matches
from streamspec.errors import StreamspecError
from streamspec.runtime.folder import read_folder
from streamspec.runtime.session import StepSession
from streamspec.runtime.tree import accept, chain_tree


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def llama_msa(tiny_model_dir, tmp_path_factory):
    model = msa_model(tiny_model_dir("llama"))
    return model, export_tiny(model, tiny_model_dir("llama"), tmp_path_factory.mktemp("x") / "llama",
                              full_logits=True)


# ------------------------------------------------------------------------------ parity
def assert_draft_matches(tree, out: dict, streams: np.ndarray) -> None:
    """The graph drafts from the end of the host's accepted path (choices: its argmax),
    and that node's stream top-K matches the reference streams [N, γ, V]."""
    path, _ = accept(tree, lambda node: int(out["main_ids"][node, 0]))
    assert int(out["draft_node"][0]) == path[-1]
    assert_top_matches(out["stream_ids"], out["stream_probs"], streams[path[-1]])


def accepting_tree(reference: Reference, rng: np.random.Generator, nodes: int, past: int):
    """A random tree whose root-to-last-node path holds the reference's greedy choices,
    so that the graph must accept (and draft from) a deep node. Returns the tree and the
    reference outputs of its final form."""
    vocab = reference.model.config.vocab_size
    tree = random_tree(rng, nodes, vocab)
    path = [nodes - 1]
    while path[-1] != 0:
        path.append(int(tree.parents[path[-1]]))
    for parent, child in zip(path[::-1], path[::-1][1:]):
        main, _, _ = reference.step(tree, past)  # rewrites the same cache rows each time
        token = int(np.argmax(main[parent]))
        tree.tokens[child] = token
        for sibling in np.flatnonzero(tree.parents == parent):
            if sibling != child and tree.tokens[sibling] == token:
                tree.tokens[sibling] = (token + 1) % vocab
    return tree, reference.step(tree, past)


@pytest.mark.parametrize("compaction", ["graph", "host"])
def test_step_matches_reference_on_random_trees(llama_msa, compaction):
    model, folder = llama_msa
    session = StepSession(read_folder(folder), "cpu", compaction=compaction)
    reference = Reference(model)
    rng = np.random.default_rng(1)
    vocab, g = model.config.vocab_size, model.num_streams
    prompt = chain_tree(rng.integers(0, vocab, 11).tolist())
    main, streams, exits = reference.step(prompt, 0)
    out = run_step(session, prompt, 0)
    np.testing.assert_allclose(out["logits"], main, atol=1e-4, rtol=1e-4)
    assert_top_matches(out["main_ids"], out["main_probs"], main)
    assert_draft_matches(prompt, out, streams)
    assert_top_matches(out["exit_ids"], out["exit_probs"], exits)
    past, pending, depths = prompt.size, [], []
    for nodes in (7, 9, 4, 8):
        tree, (main, streams, exits) = accepting_tree(reference, rng, nodes, past)
        out = run_step(session, tree, past, pending)
        assert out["stream_ids"].shape == (g, CANDIDATES)
        np.testing.assert_allclose(out["logits"], main, atol=1e-4, rtol=1e-4)
        assert_top_matches(out["main_ids"], out["main_probs"], main)
        assert_draft_matches(tree, out, streams)
        assert_top_matches(out["exit_ids"], out["exit_probs"], exits)
        # Both sides compact the accepted path (path[i] != i in general).
        path, _ = accept(tree, lambda node: int(out["main_ids"][node, 0]))
        depths.append(len(path) - 1)
        reference.cache.compact(past, path)
        if compaction == "host":
            session.compact_on_host(past, path)
            pending = []
        else:
            pending = [past + node for node in path]
        past += len(path)
    assert max(depths) >= 2, "no deep path was accepted: the test lost its point"


def test_selected_nodes_give_the_same_rows(llama_msa):
    """stream_nodes / output_nodes only select rows: values equal the all-nodes step."""
    model, folder = llama_msa
    rng = np.random.default_rng(2)
    prompt = chain_tree(rng.integers(0, model.config.vocab_size, 6).tolist())
    reference = Reference(model)
    reference.step(prompt, 0)
    tree, _ = accepting_tree(reference, rng, 6, prompt.size)
    results = []
    for stream_nodes, output_nodes in ((None, None), ([0, 5], None), ([], [0, 3, 5]), ([], [2])):
        session = StepSession(read_folder(folder), "cpu")
        run_step(session, prompt, 0)
        results.append((run_step(session, tree, prompt.size, (), stream_nodes, output_nodes),
                        stream_nodes, output_nodes))
    full = results[0][0]
    assert int(full["draft_node"][0]) == 5
    for out, stream_nodes, output_nodes in results[1:]:
        rows = slice(None) if output_nodes is None else output_nodes
        np.testing.assert_allclose(out["logits"], full["logits"][rows], atol=1e-5)
        np.testing.assert_array_equal(out["main_ids"], full["main_ids"][rows])
        if stream_nodes:  # node 5 ends the accepted path, and it has stream rows here too
            assert int(out["draft_node"][0]) == 5
            np.testing.assert_allclose(out["stream_probs"], full["stream_probs"], atol=1e-5)
        else:
            assert int(out["draft_node"][0]) == -1


@pytest.mark.parametrize("family", ["opt"])  # Qwen2 (biases): test_engine's base-model test
def test_other_families_match_reference(family, tiny_model_dir, tmp_path):
    model = msa_model(tiny_model_dir(family), mode="shared")
    folder = export_tiny(model, tiny_model_dir(family), tmp_path / family, full_logits=True)
    session = StepSession(read_folder(folder), "cpu")
    reference = Reference(model)
    rng = np.random.default_rng(3)
    prompt = chain_tree(rng.integers(0, model.config.vocab_size, 8).tolist())
    main, streams, _ = reference.step(prompt, 0)
    out = run_step(session, prompt, 0)
    np.testing.assert_allclose(out["logits"], main, atol=1e-4, rtol=1e-4)
    assert_draft_matches(prompt, out, streams)
    tree, (main, streams, _) = accepting_tree(reference, rng, 8, prompt.size)
    out = run_step(session, tree, prompt.size)
    assert_top_matches(out["main_ids"], out["main_probs"], main)
    assert_draft_matches(tree, out, streams)


def test_fp16_export_runs_close_to_fp32(llama_msa, tmp_path):
    model, folder32 = llama_msa
    folder16 = export_tiny(model, Path(folder32), tmp_path / "fp16", dtype="fp16", full_logits=True)
    assert read_folder(folder16).dtype == "fp16"
    rng = np.random.default_rng(4)
    prompt = chain_tree(rng.integers(0, model.config.vocab_size, 9).tolist())
    out16 = run_step(StepSession(read_folder(folder16), "cpu"), prompt, 0)
    out32 = run_step(StepSession(read_folder(folder32), "cpu"), prompt, 0)
    np.testing.assert_allclose(out16["logits"], out32["logits"], atol=0.05, rtol=0.05)


# ------------------------------------------------------------------------------ sampler
def test_in_graph_sampler_is_exact(tmp_path):
    """A stratified grid of uniforms through the exported sampler: each token's share
    equals its probability under temperature / top-k / top-p to within 1/rows."""
    import onnxruntime as ort

    from streamspec.exporter import ops, sampler  # noqa: F401
    from streamspec.runtime.sampling import SamplingParams, filtered_distribution

    class Sample(torch.nn.Module):
        def forward(self, logits, temperature, top_k, top_p, uniform):
            return torch.ops.streamspec.sample_tokens(logits, temperature, top_k, top_p, uniform)

    rows, vocab = 4000, 12
    dim = torch.export.Dim
    path = tmp_path / "sampler.onnx"
    torch.onnx.export(
        Sample().eval(), (torch.zeros(5, vocab), torch.ones(1), torch.zeros(1, dtype=torch.int64), torch.ones(1),
                   torch.zeros(5)),
        str(path), dynamo=True, input_names=["logits", "temperature", "top_k", "top_p", "uniform"],
        dynamic_shapes=({0: dim("rows"), 1: dim("vocab")}, None, None, None, {0: dim("rows")}),
        custom_translation_table={torch.ops.streamspec.sample_tokens.default: sampler.sample_tokens})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = np.random.default_rng(5).normal(0, 2, vocab).astype(np.float32)
    grid = ((np.arange(rows) + 0.5) / rows).astype(np.float32)
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (0.8, 6, 0.7),
                                      (1.0, 1, 1.0), (2.0, 40, 0.95)):
        tokens = session.run(None, {"logits": np.tile(logits, (rows, 1)),
                                    "temperature": np.array([temperature], np.float32),
                                    "top_k": np.array([top_k], np.int64), "top_p": np.array([top_p], np.float32),
                                    "uniform": grid})[0]
        order = np.argsort(-logits, kind="stable")
        ids, probs = filtered_distribution(order, logits[order], SamplingParams(temperature, top_p, top_k))
        expected = np.zeros(vocab)
        expected[ids] = probs
        share = np.bincount(tokens, minlength=vocab) / rows
        np.testing.assert_allclose(share, expected, atol=1.5 / rows, err_msg=f"T={temperature} k={top_k} p={top_p}")


# ------------------------------------------------------------------------------ folder
def test_folder_contents_and_schema(llama_msa):
    model, folder = llama_msa
    config = json.loads((folder / "streamspec.json").read_text())
    assert config["format"] == "streamspec-deployable" and config["format_version"] == 1
    assert config["streams"] == {"num_streams": 2, "num_msa_layers": 2, "mode": "lossless"}
    assert config["attention"]["backend"] == "portable"
    assert config["graph"]["cache_inputs"][:2] == ["key_cache.0", "value_cache.0"]
    assert {"tree_mask", "tree_parent", "compact_src", "stream_nodes"} <= set(config["graph"]["inputs"])
    assert config["tokens"]["eos_token_ids"] == [2]
    assert (folder / "tokenizer.json").is_file() and (folder / "chat_template.jinja").is_file()
    import onnx

    ops = {node.op_type for node in onnx.load(str(folder / "model.onnx")).graph.node}
    assert "SimplifiedLayerNormalization" in ops and "Pow" not in ops  # RMSNorm fused (fusions.py)
    assert not list(folder.parent.glob(".*tmp*"))


def test_custom_backend_emits_tree_attention(llama_msa, tmp_path):
    """The seam for custom_ops/: the graph calls streamspec.TreeAttention with its inputs."""
    import onnx

    from streamspec.exporter import custom
    from streamspec.exporter.pipeline import trace

    model, _ = llama_msa
    proto = trace(model, CANDIDATES, False, "custom")
    nodes = [n for n in proto.graph.node if n.domain == custom.DOMAIN]
    assert len(nodes) == model.config.num_layers and {n.op_type for n in nodes} == {"TreeAttention"}
    assert {a.name for a in nodes[-1].attribute} == {"num_heads", "kv_num_heads", "scale", "num_streams"}
    assert onnx.helper.get_attribute_value(next(a for a in nodes[-1].attribute if a.name == "num_streams")) == 2
    assert onnx.helper.get_attribute_value(next(a for a in nodes[0].attribute if a.name == "num_streams")) == 0
    assert "tree_parent" in [i.name for i in proto.graph.input]


def test_export_refuses_existing_folder_and_leaves_nothing_on_failure(llama_msa, tmp_path, monkeypatch):
    from streamspec.exporter import pipeline as export_module

    model, folder = llama_msa
    with pytest.raises(StreamspecError, match="already exists"):
        export_tiny(model, folder, folder)
    with pytest.raises(StreamspecError, match="fp32 or fp16"):
        export_tiny(model, folder, tmp_path / "x", dtype="int3")
    with pytest.raises(StreamspecError, match="max-length"):
        export_tiny(model, folder, tmp_path / "x", max_length=10 ** 6)

    def broken(*args, **kwargs):
        raise StreamspecError("simulated failure while tracing.")

    monkeypatch.setattr(export_module, "trace", broken)
    with pytest.raises(StreamspecError, match="simulated"):
        export_tiny(model, folder, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_command_reports_bad_input(tmp_path, capsys, monkeypatch):
    from streamspec.tools import cli

    # Only this command: the others are other people's and may be mid-change.
    monkeypatch.setattr(cli, "COMMANDS", {"export": "export"})
    main = cli.main

    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_export_command_attention_option():
    """--attention picks the backend; --backend is the same option."""
    from streamspec.tools import cli

    parser = cli.build_parser()
    for flag in ("--attention", "--backend"):
        args = parser.parse_args(["export", "ckpt", "--out", "o", flag, "custom"])
        assert args.backend == "custom"
    assert parser.parse_args(["export", "ckpt", "--out", "o"]).backend == "portable"


def _export_checkpoint(tiny_model_dir, tmp_path: Path, deploy: dict):
    """A tiny 3-stream checkpoint whose streamspec.json holds `deploy` (the measured
    tree), exported with `export(spec)`. Returns (the model, the folder)."""
    from streamspec.exporter import export
    from streamspec.models.checkpoint import save_checkpoint
    from streamspec.models.loading import base_fingerprint

    base = tiny_model_dir("llama")
    model = msa_model(base, num_streams=3, msa_layers=1, seed=9)
    checkpoint = save_checkpoint(tmp_path / "ckpt", model, base, base_fingerprint(base))
    meta = json.loads((checkpoint / "streamspec.json").read_text())
    meta["deploy"] = deploy
    (checkpoint / "streamspec.json").write_text(json.dumps(meta))
    return model, export(checkpoint, tmp_path / "onnx", max_length=MAX_LENGTH, candidates=CANDIDATES, progress=False)


def test_export_of_a_checkpoint_folder(tiny_model_dir, tmp_path, monkeypatch):
    """`export(spec)` resolves a training checkpoint (streams from streams.safetensors)
    and takes its measured tree (`deploy`: budget and prompt lookup) as the folder's
    default; here the weights also go to external data, as they do for large models."""
    from streamspec.exporter import pipeline

    monkeypatch.setattr(pipeline, "EXTERNAL_DATA_BYTES", 0)
    model, folder = _export_checkpoint(tiny_model_dir, tmp_path, {"budget": 3, "lookup": 5})
    config = read_folder(folder)
    assert config.raw["source"]["kind"] == "checkpoint" and config.num_streams == 3
    assert (config.tree.budget, config.tree.lookup) == (3, 5)
    assert config.eos_token_ids == [2]
    assert config.graph["external_data"] == "model.onnx.data" and (folder / "model.onnx.data").is_file()
    session = StepSession(config, "cpu")
    prompt = chain_tree([5, 6, 7, 8])
    main, streams, _ = Reference(model).step(prompt, 0)
    out = run_step(session, prompt, 0, output_nodes=[3])  # as a prefill: drafts from the last token
    assert int(out["draft_node"][0]) == 3
    assert_top_matches(out["stream_ids"], out["stream_probs"], streams[3])  # the trained streams came along


def test_a_small_budget_deploys_only_the_streams_it_can_use(tiny_model_dir, tmp_path):
    """A tree of B draft nodes is at most B deep, so a checkpoint whose measured budget is
    below γ deploys B streams (fewer rows per step), which compute what the first B of
    the trained streams compute; an explicit --streams or a larger budget keeps them all."""
    from streamspec.runtime.tree_settings import default_streams

    assert [default_streams(3, b) for b in (0, 1, 2, 3, 8)] == [None, 1, 2, None, None]
    model, folder = _export_checkpoint(tiny_model_dir, tmp_path, {"budget": 2, "lookup": 0})
    config = read_folder(folder)
    assert config.num_streams == 2 and config.tree.budget == 2
    prompt = chain_tree([5, 6, 7, 8])
    _, streams, _ = Reference(model).step(prompt, 0)
    out = run_step(StepSession(config, "cpu"), prompt, 0, output_nodes=[3])
    assert out["stream_ids"].shape[-2] == 2
    assert_top_matches(out["stream_ids"], out["stream_probs"], streams[3][:2])
