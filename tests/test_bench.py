"""`streamspec bench` on a tiny exported model: the report's rows and fields, output
equality with transformers, end-of-sequence semantics, bad input. No timing asserts:
the figures themselves are the benchmark's business, not the test suite's."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from builders import export_tiny, msa_model, save_tiny_model
from streamspec.tools import bench
from streamspec.tools.cli import main

PROMPTS = ['{"prompt": "Hi there"}', '{"messages": [{"role": "user", "content": "abc abc abc"}]}',
           '{"id": "third", "prompt": "Why?"}']
SYSTEMS = ["streamspec", "streamspec-ar", "transformers"]
ROW_FIELDS = {"system", "label", "status", "note", "tokens_per_second", "ratio_to_baseline", "tokens_per_pass",
              "passes_per_token", "new_tokens", "forward_passes", "peak_rss_mib", "resident_rss_mib",
              "equal_prompts", "prompts", "per_prompt"}
MAX_NEW = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF folder, exported folder with streams, prompts file) of a tiny llama whose
    greedy text varies (sharpened weights) rather than repeating one token."""
    root = tmp_path_factory.mktemp("bench")
    hf = save_tiny_model("llama", root / "hf", seed=0, sharpen=4.0)
    folder = export_tiny(msa_model(hf, num_streams=3), hf, root / "onnx", slim=False)
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return hf, folder, prompts


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The bench sets torch's thread count; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(folder: Path, hf: Path, prompts: Path, systems=SYSTEMS, ignore_eos=False, repeats=2) -> dict:
    # One thread: a tiny model gains nothing from more, and a busy machine's cores
    # make a parallel region wait for a descheduled thread.
    settings = bench.make_settings(folder, systems, 1, ignore_eos, hf)
    records = bench.load_prompts(prompts, None)
    return bench.run_bench(settings, bench.tokenize_prompts(folder, records), systems, MAX_NEW, repeats,
                           baseline="transformers", progress=False, prompt_names=[p.id for p in records])


def rows(report: dict) -> dict[str, dict]:
    return {row["system"]: row for row in report["systems"]}


def test_report_has_every_row_and_field(tiny, tmp_path, monkeypatch):
    hf, folder, prompts = tiny
    monkeypatch.setattr(bench.GenaiAdapter, "unavailable", lambda self: "not on this machine")
    report = run(folder, hf, prompts, SYSTEMS + ["ort-genai"])
    path = tmp_path / "bench.json"
    bench.write_report(report, path)
    report = json.loads(path.read_text(encoding="utf-8"))  # what the JSON file holds

    assert [p["id"] for p in report["prompts"]] == ["prompts.jsonl:1", "prompts.jsonl:2", "third"]
    assert report["settings"]["max_new_tokens"] == MAX_NEW and report["settings"]["reference"] == "transformers"
    by_name = rows(report)
    assert list(by_name) == SYSTEMS + ["ort-genai"]
    assert by_name["ort-genai"] == {"system": "ort-genai", "label": by_name["ort-genai"]["label"],
                                    "status": "skipped", "note": "not on this machine"}
    reference = by_name["transformers"]
    for name in SYSTEMS:
        row = by_name[name]
        assert set(row) == ROW_FIELDS and row["status"] == "ok" and row["note"] is None
        assert row["equal_prompts"] == row["prompts"] == 3
        assert all(p["equal_to_reference"] and p["stable"] and len(p["seconds"]) == 2 for p in row["per_prompt"])
        assert row["ratio_to_baseline"] == pytest.approx(row["tokens_per_second"] / reference["tokens_per_second"])
        assert row["tokens_per_pass"] * row["passes_per_token"] == pytest.approx(1.0)
        assert row["new_tokens"] == sum(p["new_tokens"] for p in row["per_prompt"])
        assert row["peak_rss_mib"] >= row["resident_rss_mib"] - 1e-9 and math.isfinite(row["peak_rss_mib"])
    assert reference["ratio_to_baseline"] == pytest.approx(1.0)
    # Autoregressive systems run one forward pass per token (the prefill gives the first).
    for name in ("streamspec-ar", "transformers"):
        assert by_name[name]["forward_passes"] == by_name[name]["new_tokens"]
    assert by_name["streamspec"]["forward_passes"] <= by_name["streamspec"]["new_tokens"]

    from rich.console import Console

    console = Console(file=io.StringIO(), width=120)
    console.print(bench.render_table(report))
    text = console.file.getvalue()
    assert "streamspec speculative" in text and "3/3" in text and "n/a" in text


def test_eos_is_honoured_alike_or_ignored_alike(tiny, tmp_path):
    """With a token that greedy decoding produces mid-answer declared end-of-sequence,
    every system stops right after it; with ignore_eos every system runs past it."""
    hf, folder, prompts = tiny
    plain = rows(run(folder, hf, prompts, ["transformers"], repeats=1))["transformers"]["per_prompt"][0]["token_ids"]
    eos = next(t for i, t in enumerate(plain) if i >= 2 and t not in plain[:i])
    stop_at = plain.index(eos) + 1
    folder_eos = tmp_path / "onnx-eos"
    shutil.copytree(folder, folder_eos)
    config = json.loads((folder_eos / "streamspec.json").read_text(encoding="utf-8"))
    config["tokens"]["eos_token_ids"] = [eos]
    (folder_eos / "streamspec.json").write_text(json.dumps(config), encoding="utf-8")

    stopped = rows(run(folder_eos, hf, prompts, repeats=1))
    ignored = rows(run(folder_eos, hf, prompts, ignore_eos=True, repeats=1))
    for name in SYSTEMS:
        assert stopped[name]["per_prompt"][0]["token_ids"] == plain[:stop_at]
        assert ignored[name]["per_prompt"][0]["token_ids"] == plain
        assert stopped[name]["equal_prompts"] == ignored[name]["equal_prompts"] == 3


def test_command_line(tiny, tmp_path, capsys):
    hf, folder, prompts = tiny
    out = tmp_path / "report.json"
    code = main(["bench", str(folder), "--hf-model", str(hf), "--only", "streamspec-ar,transformers",
                 "--prompts", str(prompts), "--num-prompts", "1", "--max-new-tokens", "4", "--repeats", "1",
                 "--json", str(out), "--no-progress"])
    assert code == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [row["system"] for row in report["systems"]] == ["streamspec-ar", "transformers"]
    assert len(report["prompts"]) == 1 and "streamspec AR" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--only", "streamspec,vllm"], "Unknown system 'vllm' in --only"),
    (["--prompts", "MISSING"], "does not exist"),
    (["--prompts", "BAD"], "Line 2 of"),
    (["--only", "transformers"], "pass it with --hf-model"),
])
def test_bad_input_is_one_sentence(tiny, tmp_path, capsys, extra, message):
    _, folder, _ = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt here"}\n', encoding="utf-8")
    extra = [{"MISSING": str(tmp_path / "none.jsonl"), "BAD": str(bad)}.get(arg, arg) for arg in extra]
    only = [] if "--only" in extra else ["--only", "streamspec-ar"]
    assert main(["bench", str(folder), "--no-progress", *only, *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_folder(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nowhere"), "--only", "streamspec-ar"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_the_other_benchmarks_are_bench_subcommands(capsys):
    """`streamspec bench precision|pruning|attention|distill` are commands of their own;
    `python -m streamspec.tools.bench_<kind>` runs the same command."""
    from streamspec.tools import bench_pruning, cli

    assert cli.join_command(["bench", "pruning", "DIR", "--repeats", "2"]) == ["bench pruning", "DIR", "--repeats", "2"]
    assert cli.join_command(["bench", "DIR"]) == ["bench", "DIR"]
    assert bench_pruning.main(["DIR", "--prune", "1.5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("streamspec bench pruning: --prune must be a number in (0, 1)") and err.count("\n") == 1
    assert main(["bench", "attention", "--trees", "0"]) == 1
    assert "--trees must be between 1 and 4096, got 0" in capsys.readouterr().err


def test_llama_cpp_row_needs_the_library_and_a_gguf_base(tiny, monkeypatch):
    """llama.cpp runs the base's own GGUF file: a Hugging Face base has none, and a
    machine without llama-cpp-python says so; either way the row is skipped with why."""
    import importlib.util

    hf, folder, _ = tiny
    settings = bench.make_settings(folder, ["llama-cpp"], 1, False, hf)
    adapter = bench.LlamaCppAdapter(settings)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    assert "pip install llama-cpp-python" in adapter.unavailable()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "llama_cpp" else real(name, *a))
    assert "no GGUF file" in adapter.unavailable()
