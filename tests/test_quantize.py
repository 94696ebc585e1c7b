"""Reduced precision: weight-only int8 / int4 exports (exporter/quantize.py), the int8 /
int4 KV cache (exporter/kv_cache.py), the memory estimate (runtime/memory.py) and the
precision benchmark (tools/bench_precision.py).

The promise that quantization must keep: greedy speculative output equals greedy
autoregressive output of the same quantized folder, because every row of a tree step
gets exactly the arithmetic it gets alone. Agreement with fp32 is measured, not
asserted: a quantized model is a different model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from builders import (MAX_LENGTH, export_tiny, msa_model, random_tree, run_step, save_tiny_model, sharpened_msa,
                      tied_graph)
from helpers import assert_runs_without_heavy_imports, assert_tokens_match, generate_with_oracle_trees
from streamspec.errors import StreamspecError
from streamspec.runtime import Engine
from streamspec.runtime.folder import read_folder
from streamspec.runtime.memory import estimate_memory, kv_cache_bytes
from streamspec.runtime.session import StepSession
from streamspec.runtime.tree import Tree, chain_tree

PROMPTS = ([5, 40, 41, 42, 9, 77], [10, 11, 12], [100, 3, 66, 67, 68, 69, 70, 71, 33])
MAX_NEW = 24
# precision (bench_precision's names) -> export options
PRECISIONS = {"fp32": {}, "int8": dict(quantize="int8"), "int4": dict(quantize="int4"),
              "fp32+kv8": dict(kv_dtype="int8"), "int4+kv4": dict(quantize="int4", kv_dtype="int4")}
REDUCED = [name for name in PRECISIONS if name != "fp32"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """precision -> folder of one tiny llama with 3 streams whose greedy text varies
    (sharpened weights), exported with full logits at each of PRECISIONS."""
    root = tmp_path_factory.mktemp("quantize")
    hf, model = sharpened_msa(root, seed=0)
    return {name: export_tiny(model, hf, root / name.replace("+", "-"), full_logits=True, **options)
            for name, options in PRECISIONS.items()}


def graph_ops(folder: Path) -> dict[str, int]:
    ops: dict[str, int] = {}
    for node in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


# ------------------------------------------------------------------------------ the folder
@pytest.mark.parametrize("name, bits", [("int8", 8), ("int4", 4)])
def test_folder_records_the_quantization_and_shrinks(folders, name, bits):
    record = read_folder(folders[name]).graph["quantization"]
    assert record["method"] == "MatMulNBits" and record["bits"] == bits and record["block_size"] == 32
    assert record["lm_head"] is True and record["matmuls"] > 0 and record["accuracy_level"] == 1  # fp32 by default
    assert read_folder(folders["fp32"]).graph["quantization"] is None
    ops = graph_ops(folders[name])
    # Every MatMul is quantized or kept (the activations' products and the rank-4 stream
    # adapters); the fusions then merge siblings (q, k, v; gate, up) into one node.
    merged = read_folder(folders[name]).graph["fusions"]["merged_matmuls"]
    assert merged > 0 and ops["MatMulNBits"] < record["matmuls"]
    assert ops["MatMulNBits"] + ops.get("MatMul", 0) + merged == record["matmuls"] + record["matmuls_kept_fp32"]
    assert ("GatherBlockQuantized" in ops) == (bits == 4) == (record["embedding"] == "GatherBlockQuantized")
    size = (folders[name] / "model.onnx").stat().st_size
    assert size < (0.45 if bits == 8 else 0.3) * (folders["fp32"] / "model.onnx").stat().st_size


def test_tied_head_is_stored_once(folders):
    """The three LM-head MatMuls (main, streams, exit) share one quantized weight."""
    graph = onnx.load(str(folders["int4"] / "model.onnx")).graph
    vocab = read_folder(folders["int4"]).vocab_size
    wide = [node.input[1] for node in graph.node if node.op_type == "MatMulNBits"
            and next(a.i for a in node.attribute if a.name == "N") == vocab]  # heads, and MLPs as wide
    assert max(wide.count(name) for name in wide) == 3
    names = [t.name for t in graph.initializer]
    assert len(names) == len(set(names))


# ------------------------------------------------------------------------------ exactness
def own_logits(folder: Path, prompt: list[int]):
    """The folder's own next-token logits after prompt + a prefix (a one-step chain), the
    reference that tells a near-tie from a bug (tests/helpers.py)."""
    def logits(prefix: list[int]) -> np.ndarray:
        session = StepSession(read_folder(folder), "cpu")
        return run_step(session, chain_tree(prompt + prefix), 0, stream_nodes=[])["logits"][-1]

    return logits


@pytest.mark.parametrize("compaction", ["host", "graph"])
@pytest.mark.parametrize("name", REDUCED)
def test_quantized_speculative_equals_autoregressive(folders, name, compaction, monkeypatch):
    """Plain greedy in both modes, and trees that hold the true continuation (long
    accepted paths, KV compaction every step, on the host or in the graph, where a
    quantized cache's rows are dequantized and quantized again): the autoregressive
    tokens of the same folder (a divergence only at a near-tie, as for fp32)."""
    engine = Engine(folders[name], provider="cpu", fallback=False, compaction=compaction)
    varied = 0
    for prompt in PROMPTS:
        ar = engine.generate(prompt, max_new_tokens=MAX_NEW, speculative=False, ignore_eos=True).token_ids
        spec = engine.generate(prompt, max_new_tokens=MAX_NEW, speculative=True, ignore_eos=True).token_ids
        assert_tokens_match(spec, ar, own_logits(folders[name], prompt))
        oracle, stats = generate_with_oracle_trees(engine, prompt, ar, MAX_NEW, monkeypatch)
        assert_tokens_match(oracle[:MAX_NEW], ar, own_logits(folders[name], prompt))
        assert stats.forward_passes < MAX_NEW  # the trees were accepted: many rows per step
        varied += len(set(ar)) > 3
    assert varied, "the tiny model repeats one token: the test lost its point"


@pytest.mark.parametrize("name", REDUCED)
def test_tree_rows_equal_single_rows(folders, name):
    """Per-row logits of a tree step equal those of the same tokens run one row at a
    time (a chain), and a node's logits do not depend on its siblings."""
    rng = np.random.default_rng(0)
    vocab = read_folder(folders[name]).vocab_size
    prompt = chain_tree(rng.integers(0, vocab, 7).tolist())
    chain = rng.integers(0, vocab, 5).tolist()

    tree_session = StepSession(read_folder(folders[name]), "cpu")
    run_step(tree_session, prompt, 0)
    together = run_step(tree_session, chain_tree(chain), prompt.size)["logits"]
    single_session = StepSession(read_folder(folders[name]), "cpu")
    run_step(single_session, prompt, 0)
    alone = [run_step(single_session, chain_tree([token]), prompt.size + i)["logits"][0]
             for i, token in enumerate(chain)]
    # The tolerance of fp32 exports (test_export.py): the rows differ by rounding only.
    np.testing.assert_allclose(together, np.stack(alone), rtol=0, atol=1e-4)

    tree = random_tree(rng, 9, vocab)
    full = run_step(tree_session, tree, prompt.size)["logits"]
    for node in (3, 8):
        path = [node]
        while tree.parents[path[-1]] >= 0:
            path.append(int(tree.parents[path[-1]]))
        path = path[::-1]
        only_path = Tree(tree.tokens[path], np.array([-1] + list(range(len(path) - 1)), np.int32),
                         np.arange(len(path), dtype=np.int32), np.ones(len(path), np.float32))
        out = run_step(tree_session, only_path, prompt.size)["logits"]
        np.testing.assert_allclose(full[node], out[-1], rtol=0, atol=1e-4)


def test_quantized_logits_stay_near_fp32(folders):
    """A sanity bound, not exactness: the error grows as bits shrink. (A sharpened random
    model amplifies weight noise layer by layer, so the bound is loose; the next test
    checks the arithmetic on one layer.)"""
    rng = np.random.default_rng(1)
    prompt = chain_tree(rng.integers(0, read_folder(folders["fp32"]).vocab_size, 9).tolist())
    logits = {name: run_step(StepSession(read_folder(folder), "cpu"), prompt, 0)["logits"]
              for name, folder in folders.items()}
    spread = np.abs(logits["fp32"]).max()
    error = {name: np.abs(logits[name] - logits["fp32"]).max() for name in REDUCED}
    assert error["int8"] < 0.15 * spread and error["int8"] < error["int4"] / 3
    assert error["fp32+kv8"] < 0.5 * spread and error["int4+kv4"] < 2 * spread


@pytest.mark.parametrize("quantize, bound", [("int8", 0.01), ("int4", 0.15)])
def test_quantizer_on_a_tied_head(quantize, bound):  # bound: relative error of one MatMul
    """Graph surgery of exporter/quantize.py on a small graph: the transposed table is
    folded and quantized once, the head kept fp32 on request, results near numpy's."""
    import onnxruntime as ort

    from streamspec.exporter.quantize import quantize_weights

    proto, table, mlp = tied_graph()
    ids = np.array([1, 5, 90], np.int64)
    x = table[ids]
    for head in (True, False):
        quantized, record = quantize_weights(onnx.ModelProto.FromString(proto.SerializeToString()), quantize, 32,
                                             vocab_size=96, head=head)
        ops = [node.op_type for node in quantized.graph.node]
        assert "Transpose" not in ops and record["lm_head"] is head
        assert ops.count("MatMulNBits") == (4 if head else 2) and ops.count("MatMul") == (0 if head else 2)
        session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
        logits, _, narrow = session.run(None, {"ids": ids})
        for got, want, matmuls in ((logits, x @ table.T, 1), (narrow, x @ mlp, 2)):
            assert np.abs(got - want).max() < matmuls * bound * np.abs(want).max()


# ------------------------------------------------------------------------------ KV cache
@pytest.mark.parametrize("name, storage, width", [("fp32+kv8", np.int8, 1), ("int4+kv4", np.uint8, 2)])
def test_quantized_cache_folder_and_session(folders, name, storage, width):
    config = read_folder(folders[name])
    kv = "int8" if storage is np.int8 else "int4"
    assert config.graph["kv_dtype"] == kv and config.graph["kv_cache"]["bit_width"] == 8 // width
    assert read_folder(folders["fp32"]).graph["kv_dtype"] is None
    graph = onnx.load(str(folders[name] / "model.onnx")).graph
    cache = {v.name: v.type.tensor_type for v in graph.input if v.name in config.graph["cache_inputs"]}
    assert {t.elem_type for t in cache.values()} == {onnx.TensorProto.INT8 if width == 1 else onnx.TensorProto.UINT8}
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert all(n.input[12] == f"{n.input[3]}.scale" and n.input[13] == f"{n.input[4]}.scale" for n in attention)
    session = StepSession(config, "cpu")
    assert session.host_cache.dtype == storage and session.host_cache.shape[-1] == config.head_dim // width
    fp32 = estimate_memory(read_folder(folders["fp32"])).kv_cache
    assert estimate_memory(config).kv_cache * 4 * width == fp32
    # The rows hold integers within the calibrated range, seldom saturated.
    run_step(session, chain_tree([5, 40, 41, 42, 9, 77]), 0)
    rows = session.host_cache[:, 0, :, :6].astype(int)
    if width == 2:  # two 4-bit values per byte, each stored as value + 8
        rows = np.concatenate([rows & 15, rows >> 4], axis=-1) - 8
    top = 127 if width == 1 else 7
    assert rows.any() and (np.abs(rows) < top).mean() > 0.9


def test_kv_scales_from_calibration():
    from streamspec.exporter.kv_cache import HEADROOM, QMAX, scales

    peak = np.abs(np.random.default_rng(0).normal(size=(4, 2, 8))).astype(np.float32)  # 2 layers, KV 2, D 8
    peak[1, 0, :] = 0.0  # a value channel that never moved still gets a positive scale
    result = scales(peak, "int8", rotary_pairs=True)
    assert result.shape == (4, 1, 2, 1, 8) and (result > 0).all()
    keys = result[0::2, 0, :, 0, :]
    np.testing.assert_array_equal(keys[..., :4], keys[..., 4:])  # RoPE pairs share a scale
    np.testing.assert_allclose(result[1, 0, 1, 0], peak[1, 1] * HEADROOM["int8"] / QMAX["int8"], rtol=1e-6)
    np.testing.assert_allclose(scales(peak, "int4", rotary_pairs=False)[0, 0, :, 0],
                               peak[0] * HEADROOM["int4"] / QMAX["int4"], rtol=1e-6)


# ------------------------------------------------------------------------------ options
def test_bad_quantization_options_give_one_sentence(folders, tmp_path):
    hf = folders["fp32"].parent / "hf"
    model = msa_model(hf, num_streams=1, msa_layers=1)
    cases = [(dict(quantize="int3"), "--quantize must be none, int8 or int4"),
             (dict(quantize="int8", block_size=24), "power of two"),
             (dict(quantize="int4", quant_activations="fp16"), "--quant-activations"),
             (dict(kv_dtype="fp8"), "--kv-dtype must be none, int8 or int4"),
             (dict(kv_dtype="int8", backend="custom"), "needs --attention portable")]
    for options, message in cases:
        with pytest.raises(StreamspecError, match=message) as error:
            export_tiny(model, hf, tmp_path / "out", **options)
        assert str(error.value).count(". ") == 0 and str(error.value).endswith(".")
    assert not (tmp_path / "out").exists()


def test_export_command_quantizes_and_prints_memory(tmp_path, capsys, monkeypatch):
    """fp16 + int4 weights with int8 activations and an fp32 head, through the CLI."""
    from streamspec.tools import cli

    monkeypatch.setattr(cli, "COMMANDS", {"export": "export"})  # the others are other people's
    hf = save_tiny_model("llama", tmp_path / "hf", seed=2)
    out = tmp_path / "int4"
    assert cli.main(["export", str(hf), "--out", str(out), "--quantize", "int4", "--dtype", "fp16",
                     "--max-length", "64", "--no-quantize-head", "--quant-activations", "int8"]) == 0
    err = capsys.readouterr().err
    assert "Memory estimate: weights" in err and "KV cache" in err and "activations" in err
    config = read_folder(out)
    record = config.graph["quantization"]
    assert config.dtype == "fp16" and record["bits"] == 4 and record["lm_head"] is False
    assert record["accuracy_level"] == 4
    engine = Engine(out, provider="cpu")
    assert len(engine.generate([5, 6, 7], max_new_tokens=4, ignore_eos=True).token_ids) == 4
    assert cli.main(["export", str(hf), "--out", str(tmp_path / "x"), "--quantize", "int4", "--block-size",
                     "48"]) == 1
    err = capsys.readouterr().err
    assert "power of two" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------ memory
def test_memory_estimate(folders):
    config = read_folder(folders["int4"])
    estimate = estimate_memory(config)
    assert estimate.weights == (folders["int4"] / "model.onnx").stat().st_size
    assert estimate.kv_cache == 2 * config.num_layers * config.num_kv_heads * MAX_LENGTH * config.head_dim * 4
    assert estimate.kv_cache == kv_cache_bytes(config.num_layers, config.num_kv_heads, config.head_dim, MAX_LENGTH,
                                               "fp32")
    assert 0 < estimate.activations < estimate_memory(config, max_length=MAX_LENGTH, budget=32).activations
    assert estimate_memory(config, max_length=32).kv_cache * 3 == estimate.kv_cache
    assert estimate.total == estimate.weights + estimate.kv_cache + estimate.activations
    assert "KV cache" in estimate.summary() and json.dumps(estimate.as_dict())
    assert estimate_memory(read_folder(folders["fp32"])).weights > 3 * estimate.weights


# ------------------------------------------------------------------------------ benchmark
def test_bench_precision_on_exported_folders(folders, tmp_path, capsys):
    from streamspec.tools import bench_precision

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": text}) for text in ("def add(a, b):", "Hello")) + "\n",
                       encoding="utf-8")
    out = tmp_path / "report.json"
    code = bench_precision.main([str(folders[name]) for name in ("int4", "fp32", "fp32+kv8", "int8")] + [
        "--prompts", str(prompts), "--max-new-tokens", "12", "--repeats", "2", "--threads", "1", "--json", str(out),
        "--no-progress"])
    assert code == 0
    report = json.loads(out.read_text())
    assert [s["precision"] for s in report["precisions"]] == ["fp32", "fp32+kv8", "int8", "int4"]
    for summary in report["precisions"]:
        assert summary["spec_equals_ar"] is True
        assert summary["weights_bytes"] > 0 and summary["peak_rss_mib"] is not None
        assert summary["speedup_spec_over_ar"] > 0
    rows = {(r["precision"], r["mode"]): r for r in report["rows"]}
    assert len(rows) == 8
    assert rows[("fp32", "ar")]["agreement_prefix"] == 1.0 and rows[("fp32", "ar")]["agreement_exact"] == 2
    for row in rows.values():
        assert 0.0 <= row["agreement_prefix"] <= 1.0 and row["stable"]
    table = capsys.readouterr().out
    assert "int4" in table and "spec=AR" in table


def test_bench_precision_tells_folders_of_one_precision_apart(folders, tmp_path):
    """Two folders of one precision (before and after a change) are labelled by name;
    the first fp32 folder is the reference."""
    import shutil

    from streamspec.tools.bench_precision import resolve_folders

    other = shutil.copytree(folders["int4"], tmp_path / "int4-other")
    labels = resolve_folders([str(folders["int4"]), str(other), str(folders["fp32"])], [], None, 32, 64, False)
    assert list(labels) == ["fp32", "int4 (int4)", "int4 (int4-other)"]
    assert labels["int4 (int4-other)"] == other


def test_bench_precision_bad_input(folders, tmp_path, capsys):
    from streamspec.tools import bench_precision

    code = bench_precision.main([str(folders["int4"]), str(folders["int4"]), "--no-progress",
                                 "--json", str(tmp_path / "r.json")])
    assert code == 1 and "given twice" in capsys.readouterr().err
    code = bench_precision.main([str(folders["int4"]), str(tmp_path), "--no-progress"])
    assert code == 1 and "not a mix" in capsys.readouterr().err
    assert bench_precision.agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert bench_precision.agreement([1, 9, 3], [1, 2, 3, 4]) == 0.25
    assert bench_precision.agreement([1, 2], [1, 2, 3, 4]) == 0.5
    assert bench_precision.parse_precision("int4+kv8") == ("int4", "int8")
    assert bench_precision.parse_precision("fp32") == ("none", "none")
    with pytest.raises(StreamspecError, match="Unknown precision 'int3'"):
        bench_precision.parse_precision("int3")


def test_bench_precision_exports_once_and_reuses(tmp_path, monkeypatch):
    """One source is exported per precision, and a later run reuses a folder only when
    its streamspec.json matches (source, quantization, KV dtype, max length)."""
    import streamspec.exporter
    from streamspec.tools import bench_precision

    calls = []

    def fake_export(source, folder, max_length, quantize, block_size, quant_activations, kv_dtype, **_):
        calls.append((Path(folder).name, quantize, kv_dtype))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.onnx").write_bytes(b"")
        record = None if quantize == "none" else {"bits": int(quantize[3:]), "block_size": block_size,
                                                  "activations": quant_activations}
        graph = {"quantization": record, "kv_dtype": None if kv_dtype == "none" else kv_dtype,
                 "max_length": max_length}
        (folder / "streamspec.json").write_text(json.dumps({"source": {"name": str(source)}, "graph": graph}))

    monkeypatch.setattr(streamspec.exporter, "export", fake_export)
    run = lambda block=32: bench_precision.export_precisions(  # noqa: E731
        "ckpt", ["int4+kv8", "fp32", "int8"], tmp_path, block, 256, False)
    folders = run()
    assert list(folders) == ["fp32", "int8", "int4+kv8"]
    assert sorted(calls) == [("fp32", "none", "none"), ("int4+kv8", "int4", "int8"), ("int8", "int8", "none")]
    calls.clear()
    run()
    assert calls == []
    run(block=64)
    assert sorted(calls) == [("int4+kv8", "int4", "int8"), ("int8", "int8", "none")]


def test_memory_module_is_torch_free():
    assert_runs_without_heavy_imports("import streamspec.runtime.memory", timeout=60)


@pytest.mark.parametrize("method", ["symmetric", "rtn", "k_quant", "hqq"])
def test_quantizer_algorithms_on_a_tied_head(method):
    """--quant-method: each of ONNX Runtime's algorithms quantizes the graph's MatMuls to
    4-bit MatMulNBits at the requested accuracy level, near numpy's results; symmetric
    ones carry no zero points (the kernel's default). (An even number of blocks per row:
    ONNX Runtime's rtn / k_quant packing fails on odd counts, which no real model has:
    SmolLM2's rows hold 18 or 48 blocks.)"""
    import onnxruntime as ort

    from streamspec.exporter.quantize import quantize_weights

    proto, table, mlp = tied_graph(vocab=128)
    quantized, record = quantize_weights(onnx.ModelProto.FromString(proto.SerializeToString()), "int4", 32,
                                         vocab_size=128, activations="int8", method=method)
    nodes = [node for node in quantized.graph.node if node.op_type == "MatMulNBits"]
    assert len(nodes) == 4 and record["algorithm"] == method
    assert all(next(a.i for a in n.attribute if a.name == "accuracy_level") == 4 for n in nodes)
    assert record["symmetric"] == (method == "symmetric")
    if method == "symmetric":
        assert all(len(n.input) == 3 for n in nodes)
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([1, 5, 120], np.int64)
    logits, _, narrow = session.run(None, {"ids": ids})
    x = table[ids]
    for got, want, matmuls in ((logits, x @ table.T, 1), (narrow, x @ mlp, 2)):
        assert np.abs(got - want).max() < matmuls * 0.2 * np.abs(want).max()
    from streamspec.exporter.quantize import check_quantization

    if method == "symmetric":
        assert check_quantization("int8", 32, method=method) == 8
        return
    with pytest.raises(StreamspecError, match="4 bits only"):
        check_quantization("int8", 32, method=method)


def test_bench_kernels_reports_every_variant(tmp_path, capsys):
    """`streamspec bench kernels`: every kernel variant at every row count, against the fp32
    MatMul of the same shape (structure only: timings are never asserted)."""
    from streamspec.tools import bench_kernels

    out = tmp_path / "kernels.json"
    assert bench_kernels.main(["--shapes", "mlp", "--rows", "1", "3", "--repeats", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    kernels = {v.name for v in bench_kernels.VARIANTS}
    assert {(r["kernel"], r["rows"]) for r in report["results"]} == {(k, rows) for k in kernels for rows in (1, 3)}
    assert all(r["median_us"] > 0 for r in report["results"])
    assert all(r["times_fp32"] == pytest.approx(1.0) for r in report["results"] if r["bits"] is None)
    out = capsys.readouterr().out
    assert "float zero points" in out and "[rows, 576]" in out
    assert bench_kernels.main(["--rows", "0", "--json", str(out)]) == 1
