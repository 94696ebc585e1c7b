"""`streamspec profile` and `streamspec report` on tiny exported models: every section
of the JSON report, the numbers agreeing with each other, the live view and the report
rendering without a terminal and on a narrow one, no torch on the profiler's path.

Drafts of random streams are almost never accepted, so one test plants the true
continuation to a depth that cycles 0..3 (as the engine's oracle test does): the
acceptance figures then have something to count.
"""

from __future__ import annotations

import io
import json
from itertools import count
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from streamspec.runtime import Engine
from streamspec.runtime.engine import StepRecord
from streamspec.runtime.tree import Tree
from streamspec.tools.profiler import report as reports
from streamspec.tools.profiler.charts import bar, sparkline
from streamspec.tools.profiler.collect import ProfileSettings, load_prompts, run_profile
from streamspec.tools.profiler.figures import PHASES
from streamspec.tools.profiler.live import LiveView
from streamspec.tools.profiler.measure import CURVE_NODES
from streamspec.tools.profiler.trace import operator_table
from helpers import assert_runs_without_heavy_imports

PROMPTS = ([5, 40, 41, 42, 9, 77], [10, 11, 12])
NEW_TOKENS = 24
SMALL_COPY = 8 * 2 ** 20  # the bandwidth figure is not under test; keep memory and time low


@pytest.fixture(scope="module")
def folders(shared_export):
    """A tiny llama with 3 streams, and a plain qwen2 base model (no streams); shared
    with other test files: read only."""
    return dict(streams=shared_export("llama", streams=3), base=shared_export("qwen2", streams=0))


@pytest.fixture
def oracle_drafts(folders, monkeypatch):
    """Trees whose chain holds the greedy continuation to depths 0, 1, 2, 3, 0, ...
    behind a wrong first child, so acceptance varies and compaction moves rows."""
    from streamspec.runtime import engine as engine_module

    engine = Engine(folders["streams"], provider="cpu", fallback=False)
    reference = {tuple(p): engine.generate(p, max_new_tokens=NEW_TOKENS + 4, speculative=False,
                                           ignore_eos=True).token_ids for p in PROMPTS}
    state = dict(tokens=[], produced=1, depths=count())
    original_generate = Engine.generate

    def generate(self, prompt, *args, **kwargs):  # a new generation: start the walk again
        state.update(tokens=reference.get(tuple(prompt), []), produced=1)
        return original_generate(self, prompt, *args, **kwargs)

    def oracle_tree(root, stream_ids, stream_probs, budget):
        depth, p, truth = next(state["depths"]) % 4, state["produced"], state["tokens"]
        state["produced"] += depth + 1
        right = [truth[p + i] if p + i < len(truth) else 0 for i in range(3)]
        chain = [t if i < depth else (t + 1) % 128 for i, t in enumerate(right)]
        tokens = [root, (right[0] + 1) % 128] + chain
        return Tree(np.array(tokens, np.int64), np.array([-1, 0, 0, 2, 3], np.int32),
                    np.array([0, 1, 1, 2, 3], np.int32), np.ones(5, np.float32))

    monkeypatch.setattr(Engine, "generate", generate)
    monkeypatch.setattr(engine_module, "build_tree", oracle_tree)


def settings(folder: Path, **options) -> ProfileSettings:
    options = dict(dict(prompts=list(PROMPTS), max_new_tokens=NEW_TOKENS, provider="cpu", ignore_eos=True,
                        curve_repeats=1, copy_bytes=SMALL_COPY), **options)
    return ProfileSettings(folder, **options)


# ------------------------------------------------------------------------------ the JSON report
def test_report_has_every_section_and_consistent_numbers(folders, oracle_drafts, tmp_path):
    report = reports.load(reports.save(run_profile(settings(folders["streams"], compare_ar=True)),
                                       tmp_path / "p.json"))  # what a user reads back: plain JSON
    assert set(reports.SECTIONS) <= set(report)
    gens = report["generations"]
    assert [g["mode"] for g in gens] == ["speculative", "autoregressive", "autoregressive", "speculative"]

    for g in gens:
        steps = g["per_step"]
        assert g["steps"] == len(steps["accepted"]) == len(steps["seconds"]["run"])
        # Every token is the prefill's, an accepted draft or a correction, less the cut at the end.
        assert g["new_tokens"] == NEW_TOKENS == 1 + sum(steps["committed"])
        assert all(c <= a + 1 for a, c in zip(steps["accepted"], steps["committed"]))
        # The cache holds the prompt, then each step's root and accepted drafts.
        assert steps["cache_rows"][-1] == g["prompt_tokens"] + sum(a + 1 for a in steps["accepted"])
    acc = report["acceptance"]
    assert acc["new_tokens"] == acc["prefill_tokens"] + acc["accepted_drafts"] + acc["corrections"] - acc["trimmed"]
    assert sum(h["steps"] for h in acc["histogram"]) == acc["steps"]
    assert sum(1 for h in acc["histogram"] if h["steps"]) >= 3  # the oracle's depths show up
    assert acc["zero_share"] == pytest.approx(acc["histogram"][0]["share"])
    assert acc["by_depth"][0]["rate"] == pytest.approx(1 - acc["zero_share"])  # every tree reaches depth 1
    assert [d["accepted"] for d in acc["by_depth"]] == sorted((d["accepted"] for d in acc["by_depth"]), reverse=True)

    for mode, split in report["time_split"].items():
        assert set(split["phases"]) == set(PHASES)
        assert split["accounted_seconds"] == pytest.approx(split["total_seconds"], rel=0.05), mode
        assert sum(p["share"] for p in split["phases"].values()) == pytest.approx(1.0, rel=0.05)
    summary = report["summary"]
    assert summary["speculative"]["mean_accepted_length"] == pytest.approx(acc["mean_accepted_length"])
    assert summary["autoregressive"]["mean_accepted_length"] == 1.0

    curve = report["latency_curve"]
    nodes = {p["nodes"] for p in curve["points"] if p["drafting"]}
    assert nodes <= set(CURVE_NODES) | {curve["budget_nodes"]} and curve["budget_nodes"] in nodes
    assert all(curve["past_length"] + p["rows"] <= report["model"]["max_length"] for p in curve["points"])
    assert curve["autoregressive_ms"] > 0

    roof = report["roofline"]
    for mode, m in roof["modes"].items():
        assert m["weight_bytes_per_second"] == pytest.approx(roof["weight_bytes"] * m["forward_passes_per_second"])
        assert m["fraction_of_bandwidth"] == pytest.approx(m["weight_bytes_per_second"]
                                                           / roof["bandwidth"]["bytes_per_second"])
    compare = report["compare_ar"]
    assert compare["speedup"] == pytest.approx(compare["speculative_tokens_per_second"]
                                               / compare["autoregressive_tokens_per_second"])
    assert [p["prompt"] for p in compare["per_prompt"]] == [0, 1]
    assert compare["forward_pass_ratio"] < 1  # accepted drafts save forward passes

    ort = report["ort_profile"]
    assert ort["available"] and ort["operators"] and ort["steps"] >= 1
    assert sum(op["share"] for op in ort["operators"]) <= 1 + 1e-9
    memory = report["memory"]
    assert memory["kv_cache_bytes"] > 0 and 0 < memory["peak_cache_fill"] <= 1


def test_plain_base_model_profiles_autoregressive_decoding(folders):
    report = run_profile(settings(folders["base"], prompts=[PROMPTS[0]], compare_ar=True, ort_profile=False))
    assert [g["mode"] for g in report["generations"]] == ["autoregressive"]
    assert report["acceptance"] is None and report["compare_ar"] is None
    assert report["summary"]["speculative"] is None
    assert report["ort_profile"]["available"] is False
    curve = report["latency_curve"]
    assert not any(p["drafting"] for p in curve["points"])
    assert curve["budget_nodes"] in {p["nodes"] for p in curve["points"]}
    assert report["roofline"]["modes"]["autoregressive"]["source"] == "generation"
    text = render_text(report, 100)
    assert "no speculative streams" in text and "Step latency" in text


def test_speculative_generations_without_a_tree_step_have_no_acceptance():
    """A speculative generation whose prompt alone reached max_new_tokens (or one the
    engine ran without trees) has no step to score: no acceptance section rather than
    a table of empty ratios (which used to crash the rendering)."""
    from streamspec.tools.profiler import figures

    empty = {"mode": "speculative", "new_tokens": 0,
             "per_step": {"accepted": [], "tree_depth": [], "committed": [], "tree_nodes": []}}
    assert figures.acceptance([empty, dict(empty)], num_streams=3) is None
    one = {"mode": "speculative", "per_step": {"accepted": [1], "tree_depth": [2], "committed": [2], "tree_nodes": [4]},
           "new_tokens": 3}
    assert figures.acceptance([empty, one], num_streams=3)["mean_tree_nodes"] == 4


# ------------------------------------------------------------------------------ rendering
def render_text(report: dict, width: int) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(reports.render(report, width))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= width
    return text


def test_report_and_live_view_render_without_terminal_and_narrow(folders):
    report = json.loads(json.dumps(run_profile(settings(folders["streams"], prompts=[PROMPTS[1]], compare_ar=True,
                                                        ort_profile=False))))
    for width in (120, 40):
        text = render_text(report, width)
        for heading in ("Speculation", "Generation", "Time split", "Accepted draft tokens", "Step latency",
                        "Roofline", "same prompts", "Memory"):
            assert heading in text, (width, heading)
    assert "◀ budget" in render_text(report, 120)

    view = LiveView()
    view.begin("streamspec profile · tiny · cpu", 96, 3, 8, lambda: dict(host_rss_bytes=300 * 2 ** 20))
    view.start_generation("speculative", 0, 2, 6)
    for step in range(1, 30):
        view.step(StepRecord(step, 0.0, 9, 3, step % 4, step % 4 + 1, 6 + 2 * step, {}, 9))
    for width in (120, 40):
        console = Console(record=True, width=width, file=io.StringIO())
        console.print(view)
        text = console.export_text()
        assert max(len(line) for line in text.splitlines()) <= width
        assert "tokens/s" in text and "tokens/step" in text and "KV cache" in text and "RSS 300.0 MiB" in text
        assert sparkline([3], 3, 1) in text  # the accepted-length sparkline


def test_profile_and_report_commands(folders, tmp_path, capsys, monkeypatch):
    from streamspec.tools import cli

    # Only these commands: the others are other people's and may be mid-change.
    monkeypatch.setattr(cli, "COMMANDS", {"profile": "profile", "report": "report"})
    out = tmp_path / "report.json"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello"}\n{"messages": [{"role": "user", "content": "Hi"}]}\n')
    assert cli.main(["profile", str(folders["streams"]), "--prompts", str(prompts), "--max-new-tokens", "6",
                     "--provider", "cpu", "--repeats", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out  # not a terminal: the live view leaves nothing behind
    assert "Time split" in printed and "Most expensive operators" in printed and out.is_file()
    assert cli.main(["report", str(out), "--width", "60"]) == 0
    again = capsys.readouterr().out
    assert "Time split" in again and max(len(line) for line in again.splitlines()) <= 60

    assert cli.main(["report", str(prompts)]) == 1
    assert "not a JSON file" in capsys.readouterr().err
    (tmp_path / "other.json").write_text("{}")
    assert cli.main(["report", str(tmp_path / "other.json")]) == 1
    assert "streamspec profile --json" in capsys.readouterr().err
    assert cli.main(["profile", str(folders["streams"]), "--prompts", str(tmp_path / "missing.txt")]) == 1
    assert "Cannot read" in capsys.readouterr().err
    assert cli.main(["profile", str(folders["streams"]), "--prompt", "x" * 90, "--max-new-tokens", "20"]) == 1
    assert "maximum length" in capsys.readouterr().err  # before any measurement


def test_profiler_imports_no_torch(folders):
    assert_runs_without_heavy_imports(
        "from streamspec.tools.profiler.collect import ProfileSettings, run_profile; "
        "from streamspec.tools.commands import profile, report; "
        f"run_profile(ProfileSettings({str(folders['streams'])!r}, prompts=['ab'], max_new_tokens=3, "
        "provider='cpu', curve_repeats=1, copy_bytes=2 ** 20))")


# ------------------------------------------------------------------------------ small parts
def test_ort_trace_leaves_the_prefill_out(tmp_path):
    def node(ts, op, dur):
        return dict(cat="Node", name=f"n{ts}_kernel_time", ts=ts, dur=dur,
                    args=dict(op_name=op, provider="CPUExecutionProvider"))

    events = [dict(cat="Session", name="model_run", ts=0, dur=100), node(1, "MatMul", 90),
              dict(cat="Session", name="model_run", ts=200, dur=10), node(201, "MatMul", 6), node(207, "Add", 2),
              dict(cat="Node", name="n208_fence_before", ts=208, dur=1, args={}),
              dict(cat="Session", name="model_run", ts=300, dur=10), node(301, "MatMul", 4), node(305, "Add", 4)]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(events))
    table = operator_table(path, prefill_runs={0})
    assert table["steps"] == 2 and table["run_ms_per_step"] == pytest.approx(0.010)
    assert [(o["op"], o["provider"], o["calls_per_step"]) for o in table["operators"]] == [("MatMul", "CPU", 1),
                                                                                         ("Add", "CPU", 1)]
    assert table["operators"][0]["share"] == pytest.approx(10 / 16)


def test_charts_and_prompt_files(tmp_path):
    assert sparkline([0, 1, 2, 3], 3, 10) == "▁▃▆█" and sparkline([0, 3, 3], 3, 2) == "██"
    assert bar(1.0, 4) == "████" and bar(0.5, 3) == "█▌" and bar(None, 4) == bar(0.0, 4) == ""
    text = tmp_path / "p.txt"
    text.write_text("first\n\nsecond\n")
    assert load_prompts(text) == ["first", "second"]
    assert load_prompts(text, chat=True)[0] == [{"role": "user", "content": "first"}]
