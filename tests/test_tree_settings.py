"""Tree settings (runtime/tree_settings.py) and the engine's step.

TreeSettings: the defaults, the one-sentence refusals, the `tree` entry read and written
atomically, and `streamspec tune`'s choice going through it. Engine: `configure` (and the
checked property setters) refuse bad values and change nothing then; a step accepts
exactly the path that the model's own choices follow through a planted tree.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil

import numpy as np
import pytest

from builders import PROMPTS
from helpers import oracle_tree
from streamspec.errors import StreamspecError
from streamspec.runtime import Engine
from streamspec.runtime.folder import read_folder
from streamspec.runtime.tree_settings import MAX_NODES, TreeSettings

BAD_VALUES = [
    ("budget", -1, "tree budget"), ("budget", MAX_NODES + 1, "tree budget"), ("budget", 2.0, "tree budget"),
    ("budget", True, "tree budget"), ("budget", "8", "tree budget"), ("budget", None, "tree budget"),
    ("lookup", -3, "prompt-lookup length"), ("lookup", 1.5, "prompt-lookup length"),
    ("prune", 1.0, "pruning threshold"), ("prune", -0.1, "pruning threshold"), ("prune", math.nan, "pruning threshold"),
    ("prune", "0.1", "pruning threshold"), ("prune", False, "pruning threshold"),
]


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and message.count(". ") == 0


# ------------------------------------------------------------------------------ TreeSettings
def test_defaults_and_normalized_values():
    assert TreeSettings() == TreeSettings(8, 0, 0.0) == TreeSettings.from_entry(None) == TreeSettings.from_entry({})
    settings = TreeSettings.from_entry({"budget": np.int64(3), "prune": 0, "tuned": {"date": "today"}})
    assert settings == TreeSettings(3, 0, 0.0)
    assert type(settings.budget) is int and type(settings.prune) is float  # they end up in JSON
    assert settings.replace(lookup=4) == TreeSettings(3, 4, 0.0)
    assert settings.replace() == settings and settings.replace(prune=0.0).prune == 0.0  # 0 is a value, None keeps


@pytest.mark.parametrize("name, value, words", BAD_VALUES)
def test_bad_values_are_refused_in_one_sentence(name, value, words):
    makers = [lambda: TreeSettings(**{name: value}), lambda: TreeSettings.from_entry({name: value})]
    if value is not None:  # None keeps a value in `replace`
        makers.append(lambda: TreeSettings().replace(**{name: value}))
    for make in makers:
        with pytest.raises(StreamspecError, match=words) as refused:
            make()
        assert one_sentence(str(refused.value)), str(refused.value)
    with pytest.raises(StreamspecError, match="must be an object"):
        TreeSettings.from_entry([8, 0, 0.0])


def test_settings_are_frozen():
    with pytest.raises(AttributeError):
        TreeSettings().budget = 3


def test_write_round_trip_keeps_the_rest_of_the_file(tmp_path):
    path = tmp_path / "streamspec.json"
    raw = {"format": "x", "graph": {"max_length": 64}, "tree": {"budget": 8, "note": "kept"}}
    path.write_text(json.dumps(raw))
    settings = TreeSettings(budget=5, lookup=2, prune=0.25)
    settings.write(path, raw, tuned={"reason": "test"})
    written = json.loads(path.read_text())
    assert TreeSettings.from_entry(written["tree"]) == settings
    assert written["tree"]["note"] == "kept" and written["tree"]["tuned"] == {"reason": "test"}
    assert {k: v for k, v in written.items() if k != "tree"} == {k: v for k, v in raw.items() if k != "tree"}
    assert raw["tree"] == {"budget": 8, "note": "kept"}  # the caller's dictionary is not changed
    TreeSettings().write(path, written)  # without `tuned`: an earlier measurement stays
    assert json.loads(path.read_text())["tree"]["tuned"] == {"reason": "test"}


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "streamspec.json"
    path.write_text('{"tree": {"budget": 8}}\n')

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        TreeSettings(budget=2).write(path, {"tree": {"budget": 8}})
    assert path.read_text() == '{"tree": {"budget": 8}}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["streamspec.json"]  # no temporary file left


# ------------------------------------------------------------------------------ a folder and an engine
@pytest.fixture(scope="module")
def folder(shared_export):
    """A tiny llama with 3 streams, shared with other test files: read only."""
    return shared_export("llama", streams=3)


def test_export_writes_every_setting_and_tune_rewrites_them(folder, tmp_path):
    assert read_folder(folder).raw["tree"] == TreeSettings().as_entry()
    tuned = shutil.copytree(folder, tmp_path / "tuned")
    from streamspec.tools import tune

    choice = {"budget": 3, "lookup": 2, "prune": 0.0, "expected_speedup": 1.5, "reason": "test"}
    tune.write_choice(tuned, {"choice": choice, "date": "today", "system": {"device_name": "cpu"}, "threads": 1})
    config = read_folder(tuned)
    assert config.tree == TreeSettings(3, 2, 0.0) and config.raw["tree"]["tuned"]["expected_speedup"] == 1.5
    engine = Engine(tuned, provider="cpu")
    assert engine.tree_settings == config.tree and (engine.budget, engine.lookup) == (3, 2)
    with pytest.raises(StreamspecError, match="tree budget"):  # a bad choice never reaches the file
        tune.write_choice(tuned, {"choice": dict(choice, budget=-1), "date": "today",
                                  "system": {"device_name": "cpu"}, "threads": 1})
    assert read_folder(tuned).tree == TreeSettings(3, 2, 0.0)


@pytest.mark.parametrize("budget", [0, 2, 4])
def test_tune_points_to_the_leaner_export_of_its_choice(folder, tmp_path, capsys, monkeypatch, budget):
    """When `streamspec tune` picks autoregressive decoding for a folder that carries the
    tree machinery, it says that `export --autoregressive` gives a leaner graph; when it
    picks a budget below the folder's 3 streams, that `export --streams B` does."""
    from streamspec.tools import tune
    from streamspec.tools.cli import main

    candidate = {"budget": 4, "lookup": 0, "prune": 0.0, "tokens_per_pass": 1.5, "nodes_per_step": 5.0,
                 "kept_per_step": 5.0, "expected_tokens_per_second": 10.0, "measured_tokens_per_second": 10.0,
                 "identical": True}
    report = {"system": {"device_name": "cpu"}, "past": 10, "candidates": [candidate], "domains": [],
              "autoregressive": {"step_ms": 50.0, "expected_tokens_per_second": 20.0, "measured_tokens_per_second": 20.0},
              "choice": {"budget": budget, "lookup": 0, "prune": 0.0, "reason": "test", "expected_speedup": 1.0}}
    monkeypatch.setattr(tune, "run_tune", lambda *args, **kwargs: report)
    monkeypatch.chdir(tmp_path)
    assert main(["tune", str(folder), "--dry-run", "--num-prompts", "1", "--json", "tune.json"]) == 0
    said = " ".join(capsys.readouterr().out.split())  # rich wraps lines
    assert ("export it again with --autoregressive" in said) == (budget == 0)
    assert ("export it again with --streams 2" in said) == (budget == 2)


@pytest.mark.parametrize("name, value, words", [bad for bad in BAD_VALUES if bad[1] is not None])
def test_engine_refuses_bad_settings_and_keeps_its_own(folder, name, value, words):
    """None keeps a value in the constructor and `configure`; the setters refuse it (below)."""
    with pytest.raises(StreamspecError, match=words):
        Engine(folder, provider="cpu", **{name: value})
    engine = Engine(folder, provider="cpu", budget=4, lookup=1)
    before = engine.tree_settings
    with pytest.raises(StreamspecError, match=words):
        engine.configure(**{name: value})
    with pytest.raises(StreamspecError, match=words):
        setattr(engine, name, value)
    assert engine.tree_settings == before


def test_configure_changes_the_next_generation(folder):
    engine = Engine(folder, provider="cpu", budget=6, fallback=False)
    with pytest.raises(StreamspecError, match="tree budget"):
        engine.budget = None
    with pytest.raises(StreamspecError, match="created without tree pruning"):
        engine.configure(budget=2, prune=0.1)  # no split graphs loaded: refused, budget 2 not applied either
    assert engine.tree_settings == TreeSettings(6, 0, 0.0)
    options = dict(max_new_tokens=12, ignore_eos=True)
    speculative = engine.generate(PROMPTS[0], **options)
    assert set(speculative.stats.drafted_sizes) == {7}  # the root and 6 drafts
    assert engine.configure(budget=0) == TreeSettings(0, 0, 0.0)
    plain = engine.generate(PROMPTS[0], **options)
    assert set(plain.stats.tree_sizes) == {1} and plain.token_ids == speculative.token_ids
    engine.lookup = 3
    assert engine.tree_settings == TreeSettings(0, 3, 0.0) and engine.configure(prune=0).prune == 0.0


# ------------------------------------------------------------------------------ the step
def test_step_accepts_the_path_of_the_models_own_choices(folder, monkeypatch):
    """Planted trees: root -> a wrong child (node 1), and the next 3 tokens of the
    autoregressive output as a chain at nodes 2, 3, 4. Every step must accept exactly
    [0, 2, 3, 4] (where the output has that many tokens left), correct with the token
    after them, and draft the next tree from node 4's streams.

    Seen through the public seams only: `Engine.on_step` (each step's record), the
    session's `run` (each forward pass: the verified tree in, the graph's outputs out)
    and `build_tree` (the draft each next tree is built from)."""
    from streamspec.runtime import engine as engine_module

    engine = Engine(folder, provider="cpu", fallback=False)
    new = 24
    reference = engine.generate(PROMPTS[0], max_new_tokens=new, speculative=False, ignore_eos=True).token_ids
    runs = []  # every forward pass: (feeds, outputs)
    steps = []  # every step: (tokens generated before it, its StepRecord, its forward pass)
    drafts = {}  # tokens generated when a tree was built -> the stream ids [γ, K] it was built from
    generated = lambda: 1 + sum(record.committed for _, record, _ in steps)  # noqa: E731 (the prefill's 1 first)
    real_run = engine.session.run

    def run(feeds):
        out = real_run(feeds)
        runs.append(tuple({name: np.array(value) for name, value in arrays.items()} for arrays in (feeds, out)))
        return out

    def planted(root, stream_ids, stream_probs, budget):
        drafts[generated()] = stream_ids
        return oracle_tree(root, reference[generated():generated() + 3])

    monkeypatch.setattr(engine.session, "run", run)
    monkeypatch.setattr(engine, "on_step", lambda record: steps.append((generated(), record, runs[-1])))
    monkeypatch.setattr(engine_module, "build_tree", planted)
    result = engine.generate(PROMPTS[0], max_new_tokens=new, ignore_eos=True)
    assert result.token_ids == reference
    assert len(runs) == 1 + len(steps)  # the prefill, then one forward pass per step (no pruning)
    full = [(start, record, ran) for start, record, ran in steps if start + 4 <= new]
    assert len(full) >= 4
    for start, record, (feeds, out) in full:
        tree_tokens = feeds["input_ids"].tolist()
        assert len(tree_tokens) == out["main_ids"].shape[0] == record.tree_nodes == record.drafted_nodes == 5
        # Accepted: 3 drafts, and the graph drafts from node 4, where the host's walk ended
        # (the engine refuses a disagreement): the path is [0, 2, 3, 4], not through node 1.
        assert record.accepted == 3 and int(out["draft_node"][0]) == 4
        assert tree_tokens[2:5] == reference[start:start + 3]  # the path's tokens
        assert int(out["main_ids"][4, 0]) == reference[start + 3] and record.committed == 4  # the correction
        assert out["stream_ids"].shape[0] == 3  # [γ, K]: the next tree's draft
        if start + 4 < new:  # a next step follows: its tree was built from node 4's streams
            np.testing.assert_array_equal(drafts[start + 4], out["stream_ids"])
    assert result.stats.accepted == [record.accepted for _, record, _ in steps]
