"""Prompts written by the base model itself (models/self_prompts.py), on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamspec.models.distill import read_prompts
from streamspec.models.errors import StreamspecError
from streamspec.models.self_prompts import (ALL_DOMAINS, DOMAINS, candidate, generate_prompts, normalise,
                                            parse_domains, split_of)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_candidates_are_a_pure_function_of_seed_domain_index():
    assert candidate("code", 7, seed=0) == candidate("code", 7, seed=0)
    openers = {candidate(domain, i).opener for domain in DOMAINS for i in range(40)}
    assert len(openers) > 200  # of 360: open-ended openers ("Why do people") repeat, the sampled rest differs
    assert candidate("story", 3, seed=0) != candidate("story", 3, seed=1)
    assert "{" not in "".join(openers)  # every placeholder filled


def test_parse_domains():
    assert parse_domains(None) == list(ALL_DOMAINS) == parse_domains("all")
    assert parse_domains("code, stdlib,code") == ["code", "stdlib"]
    with pytest.raises(StreamspecError, match="^Unknown domain 'poetry'; choose from"):
        parse_domains("code,poetry")


@pytest.fixture()
def quick_turn_end(monkeypatch):
    """A random tiny model seldom says <|im_end|>; let 24 of its 128 tokens end a turn,
    so that messages end after a few tokens (the pipeline, not the model, is under test)."""
    import streamspec.models.self_prompts as self_prompts

    monkeypatch.setattr(self_prompts, "_turn_end_ids", lambda tokenizer: list(range(40, 64)))


def test_generate_spreads_over_domains_dedupes_and_resumes(tiny_model_dir, tmp_path, quick_turn_end):
    folder = tiny_model_dir("llama")
    out = tmp_path / "prompts.jsonl"
    settings = dict(domains=["qa", "code"], batch_size=4, max_new_tokens=24, progress=False)
    stats = generate_prompts(str(folder), out, 6, **settings)
    assert stats["kept"] == stats["written"] == 6
    records = lines(out)
    assert sorted(r["domain"] for r in records) == ["code"] * 3 + ["qa"] * 3
    assert len({normalise(r["messages"][0]["content"]) for r in records}) == 6
    for r in records:
        assert r["split"] == split_of(r["id"]) and r["id"] == f"self:{r['domain']}:{r['index']:05d}"
        assert r["messages"][0]["content"].startswith(candidate(r["domain"], r["index"]).opener.strip())
    assert len(read_prompts(out)) == 6  # what distillation reads

    # Killed mid-write: the half line is dropped, the run goes on after the highest index.
    kept = out.read_text().splitlines()[:4]
    out.write_text("\n".join(kept) + '\n{"id": "self:qa:0009", "dom')
    before = {r["domain"]: max(x["index"] for x in map(json.loads, kept) if x["domain"] == r["domain"])
              for r in map(json.loads, kept)}
    stats = generate_prompts(str(folder), out, 6, **settings)
    records = lines(out)
    assert stats["kept"] == 6 and stats["written"] == 2 and len(records) == 6
    assert all(r["index"] > before[r["domain"]] for r in records[4:] if r["domain"] in before)
    assert generate_prompts(str(folder), out, 6, **settings)["written"] == 0  # done: nothing to do
    assert generate_prompts(str(folder), out, 8, **settings)["written"] == 2  # a larger count adds


def test_generate_refuses_bad_requests(tiny_model_dir, tmp_path):
    folder = str(tiny_model_dir("llama"))
    with pytest.raises(StreamspecError, match="at least 1"):
        generate_prompts(folder, tmp_path / "p.jsonl", 0, progress=False)
    with pytest.raises(StreamspecError, match="other than 'stdlib'"):
        generate_prompts(folder, tmp_path / "p.jsonl", 4, domains=["stdlib"], progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    with pytest.raises(StreamspecError, match="^Line 1 of .* is not a self-prompt record"):
        generate_prompts(folder, bad, 4, progress=False)


def test_distill_command_writes_self_prompts_answers_and_the_mix(tiny_model_dir, tmp_path, quick_turn_end, capsys):
    """`streamspec distill --self-prompts N --domains ...`: prompts, then answers tagged with
    their domain, then OUT.mix.json counting answers per domain and split."""
    from streamspec.tools.cli import main

    folder = tiny_model_dir("llama")
    out = tmp_path / "d.jsonl"
    argv = ["distill", "--base", str(folder), "--out", str(out), "--self-prompts", "4", "--domains", "story,json",
            "--max-new-tokens", "6", "--batch-size", "3", "--no-progress"]
    assert main(argv) == 0
    answers = lines(out)
    assert sorted(r["domain"] for r in answers) == ["json", "json", "story", "story"]
    assert all(len(r["answer_ids"]) <= 6 for r in answers)
    mix = json.loads((tmp_path / "d.mix.json").read_text())
    assert mix["settings"]["domains"] == ["story", "json"] and mix["settings"]["self_prompts"] == 4
    assert sum(e["answers"] for d in mix["domains"].values() for e in d.values()) == 4
    assert main(argv) == 0 and len(lines(out)) == 4  # resumed: nothing new to do
    assert main(argv[:5] + ["--domains", "stdlib", "--self-prompts", "4"]) == 1
    assert "at least one model-written domain" in capsys.readouterr().err
