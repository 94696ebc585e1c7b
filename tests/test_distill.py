"""Self-distillation on tiny models, and prompt harvesting from the standard library."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import pytest
import torch

from streamspec.models.distill import distill, read_prompts
from streamspec.models.errors import StreamspecError
from streamspec.models.loading import load_base_model, load_tokenizer
from streamspec.models.prompts import KINDS, MAX_CHARS, harvest

MAX_NEW = 8
PROMPTS = [  # different lengths, so the batch really is left padded
    {"id": "a", "split": "train", "messages": [{"role": "user", "content": "Say hi."}]},
    {"id": "b", "split": "heldout", "messages": [{"role": "user", "content": "Explain def f(x): return x + 1"}]},
    {"id": "c", "split": "train", "messages": [{"role": "user", "content": "Summarise: a module for tiny tests."}]},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def unbatched_greedy(folder: Path, messages: list[dict], eos_ids: set[int]) -> tuple[list[int], list[int]]:
    """Prompt ids and the greedy answer of one prompt on its own (no padding)."""
    tokenizer, model = load_tokenizer(folder), load_base_model(folder)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=2)
    answer = out[0, len(prompt):].tolist()
    cut = next((i + 1 for i, t in enumerate(answer) if t in eos_ids), len(answer))
    return prompt, answer[:cut]


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_batched_answers_equal_unbatched_greedy(tiny_model_dir, prompts_file, tmp_path, family):
    folder = tiny_model_dir(family)
    out = tmp_path / "out.jsonl"
    stats = distill(str(folder), prompts_file, out, max_new_tokens=MAX_NEW, batch_size=3, progress=False)
    assert stats == {"total": 3, "skipped": 0, "written": 3}
    records = {r["id"]: r for r in read_jsonl(out)}
    assert set(records) == {"a", "b", "c"}
    tokenizer = load_tokenizer(folder)
    for prompt in PROMPTS:
        record = records[prompt["id"]]
        expected_prompt, expected_answer = unbatched_greedy(folder, prompt["messages"], {2})
        assert record["prompt_ids"] == expected_prompt
        assert record["answer_ids"] == expected_answer
        assert record["split"] == prompt["split"]
        assert record["text"] == tokenizer.decode(expected_answer, skip_special_tokens=True)


def test_answer_ends_with_eos(tiny_llama_dir, prompts_file, tmp_path):
    """When EOS comes within the budget, the answer stops there and keeps the EOS id."""
    folder = Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))
    _, free_answer = unbatched_greedy(folder, PROMPTS[0]["messages"], {2})
    eos = free_answer[2]  # make the model's third greedy token its EOS
    generation = json.loads((folder / "generation_config.json").read_text())
    generation["eos_token_id"] = eos
    (folder / "generation_config.json").write_text(json.dumps(generation))

    out = tmp_path / "out.jsonl"
    distill(str(folder), prompts_file, out, max_new_tokens=MAX_NEW, batch_size=2, progress=False)
    answer = {r["id"]: r for r in read_jsonl(out)}["a"]["answer_ids"]
    assert answer == free_answer[: free_answer.index(eos) + 1] and answer[-1] == eos
    assert len(answer) < MAX_NEW


def test_resume_after_kill(tiny_llama_dir, prompts_file, tmp_path):
    out = tmp_path / "out.jsonl"
    first = distill(str(tiny_llama_dir), prompts_file, out, max_new_tokens=MAX_NEW, limit=2, progress=False)
    assert first["written"] == 2
    with open(out, "a") as handle:  # a run killed halfway through writing a line
        handle.write('{"id": "c", "split": "tra')
    second = distill(str(tiny_llama_dir), prompts_file, out, max_new_tokens=MAX_NEW, batch_size=1, progress=False)
    assert second == {"total": 3, "skipped": 2, "written": 1}
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids) == ["a", "b", "c"]  # no duplicates, no partial line
    third = distill(str(tiny_llama_dir), prompts_file, out, max_new_tokens=MAX_NEW, progress=False)
    assert third["written"] == 0 and len(read_jsonl(out)) == 3


def test_resume_refuses_another_base(tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "out.jsonl"
    distill(str(tiny_model_dir("llama")), prompts_file, out, max_new_tokens=2, limit=1, progress=False)
    with pytest.raises(StreamspecError, match="another base model"):
        distill(str(tiny_model_dir("llama", seed=1)), prompts_file, out, max_new_tokens=2, progress=False)


def test_bad_prompt_files(tmp_path):
    with pytest.raises(StreamspecError, match="does not exist"):
        read_prompts(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PROMPTS[0]) + "\n{oops\n")
    with pytest.raises(StreamspecError, match=r"^Line 2 of .* is not valid JSON\.$"):
        read_prompts(bad)
    bad.write_bytes(json.dumps(PROMPTS[0]).encode() + b"\n\xff\xfe\x00\n")
    with pytest.raises(StreamspecError, match=r"^Line 2 of .* is not UTF-8 text\.$"):
        read_prompts(bad)
    write_jsonl(bad, [PROMPTS[0], {"id": "x", "messages": "hi"}])
    with pytest.raises(StreamspecError, match="^Line 2 of .*'messages'"):
        read_prompts(bad)
    write_jsonl(bad, [PROMPTS[0], {**PROMPTS[1], "split": "dev"}])
    with pytest.raises(StreamspecError, match="^Line 2 of .*split other than"):
        read_prompts(bad)
    write_jsonl(bad, [PROMPTS[0], PROMPTS[0]])
    with pytest.raises(StreamspecError, match="^Line 2 of .*repeats the id 'a'"):
        read_prompts(bad)


# ---------------------------------------------------------------- prompts


def test_harvest_is_deterministic_and_split_by_file(tmp_path):
    counts = harvest(tmp_path / "one", limit=300)
    assert harvest(tmp_path / "two", limit=300) == counts
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()

    assert counts["train"] + counts["heldout"] == 300 and counts["heldout"] > 0
    records = read_jsonl(tmp_path / "one" / "train.jsonl") + read_jsonl(tmp_path / "one" / "heldout.jsonl")
    assert len({r["id"] for r in records}) == 300
    assert {r["kind"] for r in records} == set(KINDS)
    splits_of_file = collections.defaultdict(set)
    for record in records:
        splits_of_file[record["source"]].add(record["split"])
        (message,) = record["messages"]
        assert message["role"] == "user" and 0 < len(message["content"]) <= MAX_CHARS
        assert counts[f"{record['split']}/{record['kind']}"] > 0
    assert all(len(splits) == 1 for splits in splits_of_file.values())
    # The harvest's records are what distillation reads.
    assert len(read_prompts(tmp_path / "one" / "train.jsonl")) == counts["train"]


# ---------------------------------------------------------------- continuous batching


def test_slot_decoder_refills_slots_and_matches_unbatched_greedy(tiny_model_dir):
    """Two slots for five prompts of other lengths and budgets: slots are refilled as
    answers end, and every answer equals greedy decoding of that prompt alone (transformers,
    no cache sharing), up to a near-tie of the reference's logits."""
    from helpers import assert_tokens_match

    from streamspec.models.batched import Job, SlotDecoder
    from streamspec.models.model import build_model

    folder = tiny_model_dir("llama")
    hf = load_base_model(folder)
    prompts = [[5, 9, 11], [7] * 12, [40, 41, 42, 43, 44, 45, 46], [99, 3], list(range(10, 30))]
    budgets = [9, 4, 12, 7, 5]
    jobs = [Job(i, p, n) for i, (p, n) in enumerate(zip(prompts, budgets))]
    decoder = SlotDecoder(build_model(folder), slots=2, max_length=48)
    answers = dict((job.key, tokens) for job, tokens in decoder.decode(jobs, eos_ids=[]))
    assert sorted(answers) == list(range(5))

    def reference_logits(prompt):
        def logits(prefix):
            with torch.no_grad():
                return hf(torch.tensor([prompt + prefix])).logits[0, -1].numpy()
        return logits

    for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=budget,
                              min_new_tokens=budget, pad_token_id=2)
        reference = out[0, len(prompt):].tolist()
        assert len(answers[i]) == budget
        assert_tokens_match(answers[i], reference, reference_logits(prompt))


def test_slot_decoder_sampling_does_not_depend_on_the_batch(tiny_model_dir):
    """A sampled job draws the same tokens whether it shares the batch or runs alone: its
    draws come from its own seeded chooser over its own logits."""
    from streamspec.models.batched import Job, SlotDecoder
    from streamspec.models.model import build_model
    from streamspec.runtime.sampling import SamplingParams

    model = build_model(tiny_model_dir("llama"))
    params = dict(temperature=1.0, top_p=0.9, top_k=40)
    jobs = [Job(i, [4 + i, 20, 30 + i], 10, SamplingParams(seed=100 + i, **params)) for i in range(4)]
    together = dict((job.key, t) for job, t in SlotDecoder(model, 4, 16).decode(jobs, eos_ids=[]))
    alone = {job.key: next(iter(SlotDecoder(model, 1, 16).decode([job], eos_ids=[])))[1] for job in jobs}
    assert together == alone
    assert len({tuple(t) for t in together.values()}) == 4  # four seeds, four different draws
    with pytest.raises(StreamspecError, match="top_k"):
        list(SlotDecoder(model, 1, 16).decode([Job(0, [5], 2, SamplingParams(temperature=1.0, seed=0))], []))
    with pytest.raises(StreamspecError, match="does not fit"):
        list(SlotDecoder(model, 1, 16).decode([Job(0, [5] * 10, 7)], []))


def test_bench_distill_compares_the_three_paths_on_the_same_prompts(tiny_model_dir, prompts_file, tmp_path, capsys):
    from streamspec.tools import bench_distill

    more = write_jsonl(tmp_path / "more.jsonl", PROMPTS + [{**p, "id": p["id"] + "2"} for p in PROMPTS])
    out = tmp_path / "report.json"
    code = bench_distill.main(["--base", str(tiny_model_dir("llama")), "--prompts", str(more), "--num-prompts", "3",
                               "--rounds", "2", "--max-new-tokens", "6", "--padded-batch", "2", "--slots", "2",
                               "--threads", "1", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert [r["system"] for r in report["systems"]] == list(bench_distill.SYSTEMS)
    for row in report["systems"]:
        assert row["answers"] == 6 and row["equal_to_one_at_a_time"] == 6 and row["answers_per_hour"] > 0
    assert "continuous" in capsys.readouterr().out
    assert bench_distill.main(["--prompts", str(prompts_file), "--num-prompts", "3", "--rounds", "2",
                               "--json", str(out)]) == 1  # 3 prompts cannot fill 2 rounds
