"""Parallel tree pruning: the split graphs, the pruning rule, and exactness with it on.

A folder exported with --pruning holds the step cut at the stream-insertion layer
(lower.onnx, upper.onnx). Pruning only removes draft candidates, so greedy output must
still equal transformers' greedy decoding and a seeded sample must equal the
autoregressive one, whatever the threshold.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from builders import PROMPTS, SHARPEN, export_tiny, hf_greedy, msa_model, random_tree, run_step
from helpers import assert_runs_without_heavy_imports, assert_tokens_match, count_generated
from streamspec.errors import StreamspecError
from streamspec.runtime import Engine
from streamspec.runtime.folder import read_folder
from streamspec.runtime.session import StepSession
from streamspec.runtime.tree import Tree, chain_tree, prune


@pytest.fixture(scope="module")
def folders(tiny_model_dir, shared_export):
    """HF folder, and its MSA model exported with and without the split graphs (shared
    with other test files: read only)."""
    # Sharpened weights: greedy text varies instead of repeating one token, so a cache
    # row in the wrong place changes the output.
    return {"hf": tiny_model_dir("llama", seed=1, sharpen=SHARPEN),
            "split": shared_export(seed=1, sharpen=SHARPEN, pruning=True),
            "plain": shared_export(seed=1, sharpen=SHARPEN)}


# ------------------------------------------------------------------------------ the rule
def test_prune_keeps_vouched_nodes_and_their_ancestors():
    # root 0; 1, 2 under 0; 3 under 1; 4 under 3; 5 under 2
    tree = Tree(np.array([9, 10, 11, 12, 13, 14]), np.array([-1, 0, 0, 1, 3, 2], np.int32),
                np.array([0, 1, 1, 2, 3, 2], np.int32), np.array([1, .5, .05, .3, .02, .01], np.float32))
    scored = np.array([2, 4, 5])  # below the threshold by their path probability
    kept = prune(tree, scored, np.array([0.01, 0.9, 0.9]), threshold=0.1)
    # 2 fails (0.05 and 0.01), so 5 goes with it although its exit probability is high;
    # 4 is vouched for by the exit head under 3.
    assert kept.tolist() == [0, 1, 3, 4]
    small = tree.select(kept)
    assert small.tokens.tolist() == [9, 10, 12, 13] and small.parents.tolist() == [-1, 0, 1, 2]
    assert small.depths.tolist() == [0, 1, 2, 3]
    assert prune(tree, scored, np.zeros(3), threshold=0.0).tolist() == list(range(6))
    assert prune(tree, scored, np.zeros(3), threshold=0.99).tolist() == [0]


# ------------------------------------------------------------------------------ the graphs
def test_folder_records_the_parts(folders):
    config = read_folder(folders["split"])
    parts = config.graph["parts"]
    assert config.can_prune and not read_folder(folders["plain"]).can_prune
    assert (folders["split"] / parts["lower"]["file"]).is_file() and (folders["split"] / parts["upper"]["file"]).is_file()
    # Each part binds its own layers' caches; together they are the step graph's.
    assert parts["lower"]["cache_inputs"] + parts["upper"]["cache_inputs"] == config.graph["cache_inputs"]
    assert {"hidden", "exit_scores"} <= set(parts["lower"]["outputs"])


def test_split_graphs_equal_the_step_graph(folders):
    """The same random trees through lower + upper (all nodes kept) and through model.onnx."""
    config = read_folder(folders["split"])
    whole = StepSession(config, provider="cpu", max_length=96)
    split = StepSession(config, provider="cpu", max_length=96, split=True)
    rng, vocab = np.random.default_rng(0), config.vocab_size
    prompt = chain_tree(rng.integers(0, vocab, size=20).tolist())
    for session in (whole, split):
        run_step(session, prompt, 0)
    for size in (1, 5, 12):
        tree = random_tree(rng, size, vocab)
        a, b = run_step(whole, tree, 20), run_step(split, tree, 20)
        np.testing.assert_array_equal(a["main_ids"][:, 0], b["main_ids"][:, 0])
        np.testing.assert_allclose(a["main_probs"], b["main_probs"], atol=1e-5)
        assert a["draft_node"] == b["draft_node"]
        np.testing.assert_array_equal(a["stream_ids"][:, 0], b["stream_ids"][:, 0])
        # The fusions may merge different sibling MatMuls in the whole step graph and in
        # its two parts (a graph's boundaries decide which MatMuls read the same value),
        # so sums can run in another order: rounding of ~1e-5 relative on caches up to ~5.
        np.testing.assert_allclose(whole.host_cache[:, :, :, :20 + size], split.host_cache[:, :, :, :20 + size],
                                   rtol=1e-4, atol=1e-5)


def test_exit_scores_are_the_exit_head_probabilities(folders):
    """lower.onnx's score of a node = its token's early-exit probability under its
    parent, as the whole graph's exit top-K gives it."""
    config = read_folder(folders["split"])
    whole = StepSession(config, provider="cpu", max_length=96)
    split = StepSession(config, provider="cpu", max_length=96, split=True)
    prompt = [5, 40, 41, 42, 9, 77]
    out = run_step(whole, chain_tree(prompt), 0)  # exit top-K of every prompt node
    # Score each prompt token after the first under its predecessor, and one top-ranked token.
    nodes = np.arange(1, len(prompt), dtype=np.int64)
    tokens = list(prompt) + [int(out["exit_ids"][-1, 0])]
    feeds = dict(input_ids=np.array(tokens), positions=np.arange(len(tokens)),
                 tree_mask=np.tri(len(tokens), dtype=bool), tree_parent=np.arange(-1, len(tokens) - 1, dtype=np.int32),
                 past_length=np.array([0]), compact_src=np.zeros(0, np.int64),
                 exit_parents=np.arange(len(tokens) - 1, dtype=np.int64),
                 exit_nodes=np.append(nodes, len(tokens) - 1), exit_rows=np.arange(len(tokens) - 1, dtype=np.int64))
    scores = split.run_lower(feeds)["exit_scores"]
    assert scores[-1] == pytest.approx(float(out["exit_probs"][-1, 0]), rel=1e-4)
    for i, node in enumerate(nodes):
        hit = np.flatnonzero(out["exit_ids"][node - 1] == tokens[node])
        if len(hit):
            assert scores[i] == pytest.approx(float(out["exit_probs"][node - 1, hit[0]]), rel=1e-4)
        else:
            assert scores[i] <= float(out["exit_probs"][node - 1, -1]) * (1 + 1e-4)


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("threshold", [0.02, 0.3, 0.9])
def test_pruned_greedy_equals_transformers(folders, threshold):
    engine = Engine(folders["split"], provider="cpu", budget=8, lookup=3, prune=threshold, fallback=False)
    drafted = kept = 0
    for prompt in PROMPTS:
        reference, logits = hf_greedy(folders["hf"], prompt, 30)
        result = engine.generate(prompt, max_new_tokens=30, ignore_eos=True)
        assert_tokens_match(result.token_ids, reference, logits)
        stats = result.stats
        assert all(k <= d for k, d in zip(stats.tree_sizes, stats.drafted_sizes))
        drafted, kept = drafted + sum(stats.drafted_sizes), kept + sum(stats.tree_sizes)
    assert kept < drafted  # the random exit head vouches for few drafts: pruning removes some
    if threshold == 0.9:
        assert kept < drafted / 2


def test_pruning_with_long_accepted_paths_compacts_both_layer_groups(folders, monkeypatch):
    """Planted trees: root, a wrong child (pruned), the true next 3 tokens as a chain
    (kept: path probability 1), and a wrong child under the chain (pruned). The lower
    layers' rows of the accepted path then sit at other indices than the upper layers'."""
    from streamspec.runtime import engine as engine_module

    prompt = PROMPTS[0]
    reference, logits = hf_greedy(folders["hf"], prompt, 30)
    engine = Engine(folders["split"], provider="cpu", prune=0.999, fallback=False)
    generated = count_generated(engine, monkeypatch)

    def planted(root, stream_ids, stream_probs, budget):
        right = list(reference[generated():generated() + 3]) or [0]
        tokens = [root, (right[0] + 1) % 128] + right + [(right[0] + 2) % 128]
        parents = [-1, 0, 0] + list(range(2, len(right) + 1)) + [2]
        depths = [0, 1] + list(range(1, len(right) + 1)) + [2]
        probs = [1.0, 0.0] + [1.0] * len(right) + [0.0]
        return Tree(np.array(tokens), np.array(parents, np.int32), np.array(depths, np.int32),
                    np.array(probs, np.float32))

    monkeypatch.setattr(engine_module, "build_tree", planted)
    result = engine.generate(prompt, max_new_tokens=30, ignore_eos=True)
    stats = result.stats
    assert_tokens_match(result.token_ids, reference, logits)
    assert max(stats.accepted) >= 2 and sum(stats.tree_sizes) < sum(stats.drafted_sizes)


def test_pruned_sampling_equals_autoregressive_with_the_same_seed(folders):
    engine = Engine(folders["split"], provider="cpu", budget=6, prune=0.2, fallback=False)
    for seed in (1, 2):
        options = dict(max_new_tokens=25, temperature=0.9, top_p=0.95, seed=seed, ignore_eos=True)
        assert (engine.generate(PROMPTS[2], **options).token_ids
                == engine.generate(PROMPTS[2], speculative=False, **options).token_ids)


def test_step_records_say_what_pruning_removed(folders):
    engine = Engine(folders["split"], provider="cpu", budget=8, prune=0.5, fallback=False)
    records = []
    engine.on_step = records.append
    engine.generate(PROMPTS[1], max_new_tokens=12, ignore_eos=True)
    assert records and all(r.tree_nodes <= r.drafted_nodes == 9 for r in records)
    assert engine.last_result.stats.drafted_sizes == [r.drafted_nodes for r in records]


# ------------------------------------------------------------------------------ refusals
def test_pruning_refusals(folders, tmp_path):
    with pytest.raises(StreamspecError, match="exported without --pruning"):
        Engine(folders["plain"], provider="cpu", prune=0.1)
    with pytest.raises(StreamspecError, match=r"threshold must be in \[0, 1\)"):
        Engine(folders["split"], provider="cpu", prune=1.0)
    with pytest.raises(StreamspecError, match="host compaction"):
        Engine(folders["split"], provider="cpu", prune=0.1, compaction="graph")
    model = msa_model(folders["hf"], num_streams=2)
    with pytest.raises(StreamspecError, match="cannot be combined"):
        export_tiny(model, folders["hf"], tmp_path / "kv", pruning=True, kv_dtype="int8")
    from streamspec.models.model import build_model

    with pytest.raises(StreamspecError, match="needs a model with streams"):
        export_tiny(build_model(folders["hf"]), folders["hf"], tmp_path / "base", pruning=True)
    assert not (tmp_path / "kv").exists() and not (tmp_path / "base").exists()
    # A tuned threshold in streamspec.json is the default; 0 turns pruning off.
    config = json.loads((folders["split"] / "streamspec.json").read_text())
    assert config["tree"].get("prune", 0) == 0
    assert Engine(folders["split"], provider="cpu").prune == 0 and not Engine(folders["split"], provider="cpu").session.split


# ------------------------------------------------------------------------------ the benchmark
def test_bench_pruning_runs_every_setting_and_checks_them(folders, tmp_path, capsys):
    from streamspec.tools import bench_pruning

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": text}) for text in ("abc abc abc", "hello there")) + "\n")
    out = tmp_path / "report.json"
    code = bench_pruning.main([str(folders["split"]), "--prompts", str(prompts), "--budgets", "2", "6",
                               "--prune", "0.3", "--lookup", "3", "--max-new-tokens", "12", "--repeats", "2",
                               "--threads", "1", "--json", str(out), "--no-progress"])
    assert code == 0
    report = json.loads(out.read_text())
    rows = {row["setting"]: row for row in report["rows"]}
    assert list(rows) == ["autoregressive", "B2 no pruning", "B2 pruning", "B2 pruning + lookup 3",
                          "B6 no pruning", "B6 pruning", "B6 pruning + lookup 3"]
    assert all(row["equals_autoregressive"] and row["tokens_per_second"] > 0 for row in rows.values())
    assert rows["B6 no pruning"]["kept_nodes_per_step"] == rows["B6 no pruning"]["drafted_nodes_per_step"] == 7
    assert rows["B6 pruning"]["kept_nodes_per_step"] < 7
    assert rows["B6 pruning"]["upper_rows_per_step"] == pytest.approx(rows["B6 pruning"]["kept_nodes_per_step"] * 4)
    assert "B6 pruning + lookup 3" in capsys.readouterr().out
    assert bench_pruning.main([str(folders["plain"]), "--json", str(out), "--no-progress"]) == 1
    assert "exported without --pruning" in capsys.readouterr().err


# ------------------------------------------------------------------------------ tune
def test_tune_measures_pruning_and_writes_the_threshold(folders, tmp_path, capsys, monkeypatch):
    import shutil

    from streamspec.tools.cli import main

    folder = shutil.copytree(folders["split"], tmp_path / "folder")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": text}) for text in ("abc abc abc", "hello there")) + "\n")
    monkeypatch.chdir(tmp_path)
    code = main(["tune", str(folder), "--prompts", str(prompts), "--num-prompts", "2", "--max-new-tokens", "12",
                 "--budgets", "2,6", "--prune", "0.3", "--repeats", "1", "--threads", "1", "--json", "tune.json"])
    assert code == 0
    report = json.loads((tmp_path / "tune.json").read_text())
    candidates = report["candidates"]
    assert [(c["budget"], c["prune"]) for c in candidates] == [(2, 0.0), (6, 0.0), (2, 0.3), (6, 0.3)]
    assert all(c["identical"] and c["kept_per_step"] <= c["nodes_per_step"] for c in candidates)
    assert candidates[3]["kept_per_step"] < candidates[3]["nodes_per_step"]
    pairs = {(p["drafted"], p["kept"]) for p in report["pruned_latency"]}
    assert pairs == {(round(c["nodes_per_step"]), round(c["kept_per_step"])) for c in candidates if c["prune"]}
    # The best expected setting is what the folder now holds, pruning threshold included.
    best = max(candidates, key=lambda c: c["expected_tokens_per_second"])
    tree = json.loads((folder / "streamspec.json").read_text())["tree"]
    choice = report["choice"]
    if choice["budget"]:
        assert (choice["budget"], choice["prune"]) == (best["budget"], best["prune"])
    assert (tree["budget"], tree["prune"]) == (choice["budget"], choice["prune"])
    assert Engine(folder, provider="cpu").prune == choice["prune"]
    assert main(["tune", str(folders["plain"]), "--prune", "0.1", "--json", "x.json"]) == 1
    assert "exported without --pruning" in capsys.readouterr().err


# ------------------------------------------------------------------------------ profile
def test_profile_reports_tree_sizes_before_and_after_pruning(folders, tmp_path, capsys):
    from streamspec.tools.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("abc abc abc\nhello there\n")
    out = tmp_path / "profile.json"
    assert main(["profile", str(folders["split"]), "--prompts", str(prompts), "--max-new-tokens", "10", "--budget", "6",
                 "--prune", "0.5", "--provider", "cpu", "--repeats", "1", "--json", str(out)]) == 0
    assert "nodes per step reach the upper layers" in " ".join(capsys.readouterr().out.split())  # rich wraps lines
    report = json.loads(out.read_text())
    steps = [g["per_step"] for g in report["generations"] if g["mode"] == "speculative"]
    drafted = [n for s in steps for n in s["tree_nodes"]]
    kept = [n for s in steps for n in s["tree_nodes_after_pruning"]]
    assert drafted and all(d == 7 for d in drafted) and all(k <= d for k, d in zip(kept, drafted)) and sum(kept) < sum(drafted)
    assert report["acceptance"]["mean_tree_nodes_after_pruning"] == pytest.approx(sum(kept) / len(kept))


def test_pruning_runtime_imports_neither_torch_nor_transformers(folders):
    assert_runs_without_heavy_imports(
        "from streamspec.runtime import Engine; "
        f"e = Engine({str(folders['split'])!r}, provider='cpu', budget=6, prune=0.3); "
        "e.generate('ab', max_new_tokens=8, ignore_eos=True); assert e.session.split")
