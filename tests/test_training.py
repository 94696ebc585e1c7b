"""Training: the cached fast path, lossless exactness, learning, exact resume, the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from streamspec.models.attention import EagerAttention, MainKVAttention, causal_tree_mask
from streamspec.models.config import StreamConfig
from streamspec.models.data import Record, Window
from streamspec.models.errors import StreamspecError
from streamspec.models.model import build_model
from streamspec.models.train import (StreamObjective, TrainConfig, build_for_training, evaluate, greedy_walk,
                                     sequence_states, train)
from streamspec.tools import cli

VOCAB = 128  # conftest.TINY_VOCAB
FIRST_ID = 4  # ids below are special tokens
CYCLE = [17, 90, 5, 66, 42, 121, 33, 58]  # the answers' vocabulary, in order


def write_data(path: Path, records: int = 48, answer: int = 24, seed: int = 0) -> Path:
    """Synthetic distilled data with learnable structure: every answer walks the same
    cycle of CYCLE tokens from a random point, so stream j's target is a fixed function
    of the current token (the one j + 1 further along). Prompts are random; every 8th
    record is held out."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(records):
            prompt = [rng.randrange(FIRST_ID, VOCAB) for _ in range(5)]
            offset = rng.randrange(len(CYCLE))
            answer_ids = [CYCLE[(offset + k) % len(CYCLE)] for k in range(answer)]
            line = {"id": f"r{i}", "split": "heldout" if i % 8 == 0 else "train",
                    "prompt_ids": prompt, "answer_ids": answer_ids, "text": ""}
            handle.write(json.dumps(line) + "\n")
    return path


def tiny_config(base: Path, data: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(streams=2, msa_layers=2, lora_rank=8, lora_alpha=16.0, steps=30, batch=4, window=12,
                    lr=1e-2, warmup=3, eval_every=1000, eval_records=6, save_every=1000, budgets=(1, 4),
                    device="cpu", threads=1)  # tiny models: more threads only contend
    settings.update(overrides)
    return TrainConfig(data=str(data), out=str(out), base=str(base), **settings)


@pytest.fixture()
def data(tmp_path) -> Path:
    return write_data(tmp_path / "data.jsonl")


def randomized(model):
    """Give the (zero-initialised) adapters random values, so stream rows differ from main rows."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


# ------------------------------------------------------------------ the cached path


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_stream_upper_over_cached_main_kv_equals_upper(tiny_model_dir, family):
    model = randomized(build_model(tiny_model_dir(family), StreamConfig(num_streams=3, num_msa_layers=2, lora_rank=4)))
    record = Record(0, "r", "train", tuple(range(10, 22)), tuple(range(30, 50)))
    states = sequence_states(model, record, with_main=True, device="cpu")
    start, end = 13, 25
    with torch.no_grad():
        full = model.upper(states.hidden[:, :end], states.positions[:, :end],
                           EagerAttention(causal_tree_mask(end), 3))
        attention = MainKVAttention({i: k[:, :, :end] for i, k in states.main_keys.items()},
                                    {i: v[:, :, :end] for i, v in states.main_values.items()},
                                    causal_tree_mask(end)[:, start:end], 3)
        streams = model.stream_upper(states.hidden[:, start:end], states.positions[:, start:end], attention)
    torch.testing.assert_close(streams, full.stream_logits[:, start:end], rtol=1e-5, atol=1e-5)
    main = torch.log_softmax(full.main_logits[0, record.first_position:end], -1)
    torch.testing.assert_close(states.answer_logprobs[0, :end - record.first_position], main, rtol=1e-5, atol=1e-5)


def test_cached_and_plain_objectives_agree(tiny_llama_dir, data, tmp_path):
    config = tiny_config(tiny_llama_dir, data, tmp_path / "run")
    _, _, model = build_for_training(config)
    randomized(model)
    record = Record(0, "r", "train", tuple(range(10, 20)), tuple(range(40, 70)))
    windows = [Window(record, 9, 21), Window(record, 21, 33), Window(record, 33, 39)]
    results = []
    for cached in (True, False):
        model.zero_grad(set_to_none=True)
        loss, stats = StreamObjective(model, config, cached)(windows)
        loss.backward()
        results.append((loss.detach(), stats, {n: p.grad.clone() for n, p in model.trainable_parameters().items()}))
    (loss_a, stats_a, grads_a), (loss_b, stats_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert torch.equal(stats_a["stream_count"], torch.tensor([29.0, 28.0]))  # targets run out at the end
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ training


def test_lossless_training_changes_no_base_weight_and_keeps_main_logits_bitwise(tiny_llama_dir, data, tmp_path):
    config = tiny_config(tiny_llama_dir, data, tmp_path / "run", steps=5)
    _, _, fresh = build_for_training(config)
    tokens = torch.tensor([list(range(5, 40))])
    positions = torch.arange(tokens.shape[1])[None]
    attention = lambda: EagerAttention(causal_tree_mask(tokens.shape[1]), 2)  # noqa: E731
    with torch.no_grad():
        before = fresh(tokens, positions, attention())
    trained = train(config, progress=False, echo=False).model
    with torch.no_grad():
        after = trained(tokens, positions, attention())
    adapters = trained.trainable_parameters()
    fresh_parameters = dict(fresh.named_parameters())
    for name, parameter in trained.named_parameters():
        if name not in adapters:
            assert torch.equal(parameter, fresh_parameters[name]), name
    assert not all(torch.equal(p, fresh_parameters[n]) for n, p in adapters.items())  # it did train
    assert torch.equal(after.main_logits, before.main_logits)
    assert not torch.equal(after.stream_logits, before.stream_logits)


def test_training_lowers_stream_loss_and_raises_accuracy(tiny_llama_dir, data, tmp_path):
    # Measured: held-out stream loss 4.85 -> 3.85 and accuracy 0 -> 53% / 42% (streams 1 / 2).
    result = train(tiny_config(tiny_llama_dir, data, tmp_path / "run", steps=40, eval_every=40),
                   progress=False, echo=False)
    first, last = result.history[0], result.history[-1]
    assert (first["step"], last["step"]) == (0, 40)
    for j in range(2):
        assert last["stream_loss"][j] < first["stream_loss"][j] - 0.5, (first, last)
        assert last["stream_accuracy"][j] > first["stream_accuracy"][j] + 0.25, (first, last)
    assert last["tokens_per_pass"]["4"] > first["tokens_per_pass"]["4"] + 0.3
    assert result.best_step == 40
    assert (result.out / "streamspec.json").is_file() and (result.out / "last" / "trainer_state.json").is_file()


def test_evaluation_reports_each_domain_and_their_mean(tiny_llama_dir, tmp_path):
    """Two domains, one learnable (answers walk CYCLE), one not (random answers): each
    gets its own held-out figures, the headline is their unweighted mean, and the
    learnable domain is the one that gains."""
    path = write_data(tmp_path / "data.jsonl")
    rng = random.Random(5)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for i, record in enumerate(records):
        if (i // 8) % 2:  # blocks of 8: each domain gets held-out records (every 8th)
            record["domain"] = "noise"
            record["answer_ids"] = [rng.randrange(FIRST_ID, VOCAB) for _ in record["answer_ids"]]
        else:
            record["domain"] = "cycle"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = train(tiny_config(tiny_llama_dir, path, tmp_path / "run", steps=30, eval_every=30, eval_records=3),
                   progress=False, echo=False)
    last = result.history[-1]
    assert set(last["domains"]) == {"cycle", "noise"}
    assert all(d["records"] == 3 for d in last["domains"].values())
    per = {name: d["tokens_per_pass"]["4"] for name, d in last["domains"].items()}
    assert last["tokens_per_pass"]["4"] == pytest.approx((per["cycle"] + per["noise"]) / 2)
    assert per["cycle"] > per["noise"] + 0.3, per
    meta = json.loads((result.out / "streamspec.json").read_text())
    assert meta["training"]["heldout_domains"] == {"cycle": 3, "noise": 3}


def test_training_over_a_drafting_vocabulary(tiny_llama_dir, data, tmp_path):
    """--draft-vocab N: stream rows and the exit head learn a softmax over the N most
    frequent answer tokens (as deployed); the checkpoint stores that vocabulary, and
    exporting it loads the same ids."""
    from streamspec.models.checkpoint import load_checkpoint
    from streamspec.models.train import StreamObjective, draft_columns

    result = train(tiny_config(tiny_llama_dir, data, tmp_path / "run", steps=40, eval_every=40, draft_vocab=6),
                   progress=False, echo=False)
    first, last = result.history[0], result.history[-1]
    vocab = result.model.draft_vocab
    assert len(vocab) == 7 and 2 in vocab.tolist()  # 6 most frequent answer tokens + the EOS id
    assert set(vocab.tolist()) - {2} < set(CYCLE)  # 2 of the 8 cycle tokens are left out
    assert last["tokens_per_pass"]["4"] > first["tokens_per_pass"]["4"] + 0.2
    assert all(0 < a < 0.9 for a in last["stream_accuracy"])  # out-of-vocabulary targets count as misses
    columns = draft_columns(result.model)
    assert columns[vocab].tolist() == list(range(7)) and (columns >= 0).sum() == 7
    meta = json.loads((result.out / "streamspec.json").read_text())
    assert meta["draft_vocab"]["size"] == 7 and meta["training"]["draft_vocab"] == 6
    loaded, _ = load_checkpoint(result.out)
    assert torch.equal(loaded.draft_vocab, vocab)
    # A window whose stream targets all lie outside the vocabulary adds nothing to the loss.
    objective = StreamObjective(result.model, tiny_config(tiny_llama_dir, data, tmp_path / "x", draft_vocab=6), True)
    outside = [t for t in range(4, VOCAB) if t not in vocab.tolist()][:20]
    record = Record(0, "o", "train", (5, 6, 7), tuple(outside))
    loss, stats = objective([Window(record, 2, 14)])
    assert stats["stream_count"].sum() == 0 and stats["stream_loss"].sum() == 0


def test_resume_continues_exactly(tiny_llama_dir, data, tmp_path):
    straight = train(tiny_config(tiny_llama_dir, data, tmp_path / "a", steps=6), progress=False, echo=False)
    paused = train(tiny_config(tiny_llama_dir, data, tmp_path / "b", steps=6, stop_at=3), progress=False, echo=False)
    assert paused.step == 3
    resumed = train(tiny_config(tiny_llama_dir, data, tmp_path / "b", steps=6), progress=False, echo=False)
    assert resumed.step == 6
    expected = straight.model.trainable_parameters()
    for name, parameter in resumed.model.trainable_parameters().items():
        assert torch.equal(parameter, expected[name]), name
    with pytest.raises(StreamspecError, match="other settings"):
        train(tiny_config(tiny_llama_dir, data, tmp_path / "b", steps=6, lr=2e-2), progress=False, echo=False)
    restarted = train(tiny_config(tiny_llama_dir, data, tmp_path / "b", steps=2, lr=2e-2, restart=True),
                      progress=False, echo=False)
    assert restarted.step == 2


def test_init_starts_a_new_run_from_a_checkpoint(tiny_llama_dir, data, tmp_path):
    first = train(tiny_config(tiny_llama_dir, data, tmp_path / "a", steps=6), progress=False, echo=False)
    trained = first.model.trainable_parameters()
    # A step with a vanishing learning rate leaves the warm-started weights where --init put them.
    warm = train(tiny_config(tiny_llama_dir, data, tmp_path / "b", steps=1, lr=1e-12, init=str(tmp_path / "a" / "last")),
                 progress=False, echo=False)
    cold = train(tiny_config(tiny_llama_dir, data, tmp_path / "c", steps=1, lr=1e-12), progress=False, echo=False)
    warm_params, cold_params = warm.model.trainable_parameters(), cold.model.trainable_parameters()
    assert all(torch.allclose(warm_params[n], trained[n], atol=1e-6) for n in trained)
    assert not all(torch.allclose(cold_params[n], trained[n], atol=1e-6) for n in trained)
    # Resuming b with another starting point (or none) is another run.
    with pytest.raises(StreamspecError, match="other settings"):
        train(tiny_config(tiny_llama_dir, data, tmp_path / "b", steps=2, lr=1e-12), progress=False, echo=False)
    with pytest.raises(StreamspecError, match="same --streams"):
        train(tiny_config(tiny_llama_dir, data, tmp_path / "d", streams=3, init=str(tmp_path / "a" / "last")),
              progress=False, echo=False)
    with pytest.raises(StreamspecError, match="does not exist"):
        train(tiny_config(tiny_llama_dir, data, tmp_path / "e", init=str(tmp_path / "missing")), progress=False, echo=False)


def test_init_can_grow_the_lora_rank_keeping_what_the_streams_compute(tiny_llama_dir, data, tmp_path):
    """--init from rank 8 (alpha 16) into rank 16 with another alpha: the old adapters
    fill the first rows/columns, rescaled to the new scale, the new columns of B start at
    zero, so the warm-started streams compute what the checkpoint's did; a smaller rank
    is refused."""
    first = train(tiny_config(tiny_llama_dir, data, tmp_path / "a", steps=6), progress=False, echo=False)
    init = str(tmp_path / "a" / "last")
    grown = train(tiny_config(tiny_llama_dir, data, tmp_path / "b", steps=1, lr=1e-12, lora_rank=16,
                              lora_alpha=8.0, init=init), progress=False, echo=False)
    tokens = torch.tensor([list(range(5, 30))])
    positions = torch.arange(tokens.shape[1])[None]
    mask = causal_tree_mask(tokens.shape[1])
    with torch.no_grad():
        before = first.model(tokens, positions, EagerAttention(mask, 2)).stream_logits
        after = grown.model(tokens, positions, EagerAttention(mask, 2)).stream_logits
    ranks = {p.shape[0] for n, p in grown.model.trainable_parameters().items() if n.endswith("lora_A")}
    assert ranks == {16}
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    with pytest.raises(StreamspecError, match="--lora-rank of at least 8"):
        train(tiny_config(tiny_llama_dir, data, tmp_path / "c", lora_rank=4, init=init), progress=False, echo=False)


def test_shared_mode_adapts_the_main_stream(tiny_llama_dir, data, tmp_path):
    with pytest.raises(StreamspecError, match="lossless"):
        train(tiny_config(tiny_llama_dir, data, tmp_path / "x", mode="shared", path="cached"), progress=False, echo=False)
    config = tiny_config(tiny_llama_dir, data, tmp_path / "run", mode="shared", steps=3)
    _, _, fresh = build_for_training(config)
    trained = train(config, progress=False, echo=False).model
    tokens = torch.tensor([list(range(5, 30))])
    positions = torch.arange(tokens.shape[1])[None]
    with torch.no_grad():
        before = fresh(tokens, positions, EagerAttention(causal_tree_mask(tokens.shape[1]), 2)).main_logits
        after = trained(tokens, positions, EagerAttention(causal_tree_mask(tokens.shape[1]), 2)).main_logits
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("budget", [1, 4])
def test_held_out_tokens_per_pass_are_what_speculative_decoding_takes(budget):
    """The trainer's figure (`evaluate`: one causal pass, then `greedy_walk` over the
    streams' top-k) counts exactly the steps that speculative decoding takes on the
    model's own greedy answer (ReferenceDecoder: tree steps with a KV cache), so held-out
    tokens per pass predict deployment."""
    from streamspec.models.config import ModelConfig
    from streamspec.models.model import Transformer, load_base_weights
    from streamspec.models.reference import ReferenceDecoder
    from tiny_models import VOCAB, tiny_hf_model

    hf = tiny_hf_model("llama", sharpen=4.0)  # repeats itself, so untrained streams get drafts accepted
    model = Transformer(ModelConfig.from_hf(hf.config), StreamConfig(num_streams=3, num_msa_layers=2, lora_rank=4))
    load_base_weights(model, hf.state_dict())
    decoder = ReferenceDecoder(model, max_length=128, budget=budget, top_k=budget)
    config = TrainConfig(data="unused", out="unused")
    accepted = 0
    for seed in range(3):
        prompt = torch.randint(0, VOCAB, (8,), generator=torch.Generator().manual_seed(seed)).tolist()
        decoded = decoder.generate(prompt, 40)
        record = Record(0, f"r{seed}", "heldout", tuple(prompt), tuple(decoded.tokens))
        tokens_per_pass = evaluate(model, [record], [budget], config)["tokens_per_pass"][str(budget)]
        assert (len(decoded.tokens) - 1) / tokens_per_pass == pytest.approx(decoded.steps)
        accepted += sum(decoded.accepted)
    assert accepted > 0


def test_greedy_walk_counts_forward_passes():
    gamma, top_k = 2, 3
    tokens = np.arange(100, 112)  # prompt 100..102, answer 103..111 (9 tokens)
    first = 2
    positions = len(tokens) - 1 - first
    perfect = np.zeros((positions, gamma, top_k), dtype=np.int64) - 1
    for i in range(positions):
        for j in range(gamma):
            if first + i + 2 + j < len(tokens):
                perfect[i, j, 0] = tokens[first + i + 2 + j]
    probs = np.tile(np.array([0.9, 0.05, 0.05], dtype=np.float32), (positions, gamma, 1))
    # The prefill yields 103; each pass then commits γ drafted tokens + 1: 8 tokens in 3 passes.
    assert greedy_walk(tokens, first, perfect, probs, budget=4) == 3
    assert greedy_walk(tokens, first, perfect, probs, budget=0) == 8  # autoregressive
    wrong = np.full_like(perfect, 7)
    assert greedy_walk(tokens, first, wrong, probs, budget=4) == 8


# ------------------------------------------------------------------ command line


@pytest.fixture()
def run_cli(monkeypatch, capsys):
    # Only this part's commands: the parser imports every listed module.
    monkeypatch.setattr(cli, "COMMANDS", {"train": "train", "distill": "distill"})

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.mark.parametrize("command", ["train", "distill"])
def test_help(run_cli, command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(command, "--help")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--base" in text and "--out" in text


def test_train_bad_input_is_one_sentence(run_cli, tiny_llama_dir, data, tmp_path):
    unknown = tmp_path / "gpt2"
    unknown.mkdir()
    for path in tiny_llama_dir.iterdir():
        if path.is_file():
            (unknown / path.name).write_bytes(path.read_bytes())
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    binary = tmp_path / "weights.safetensors"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    not_json = tmp_path / "bad.jsonl"
    not_json.write_text('{"prompt_ids": [5], "answer_ids": [6]}\n{oops\n')
    out_of_vocab = tmp_path / "vocab.jsonl"
    out_of_vocab.write_text(json.dumps({"prompt_ids": [5], "answer_ids": [6, 100000]}) + "\n")
    common = ["--streams", "2", "--msa-layers", "2", "--steps", "1", "--no-progress", "--device", "cpu"]
    cases = [
        (["--base", str(tmp_path / "missing"), "--data", str(data)], "does not exist"),
        (["--base", str(data), "--data", str(data)], "neither a model folder nor a .gguf"),
        (["--base", str(unknown), "--data", str(data)], "gpt2"),
        (["--base", str(tiny_llama_dir), "--data", str(tmp_path / "none.jsonl")], "does not exist"),
        (["--base", str(tiny_llama_dir), "--data", str(binary)], "not a JSONL"),
        (["--base", str(tiny_llama_dir), "--data", str(not_json)], "line 2 is not valid JSON"),
        (["--base", str(tiny_llama_dir), "--data", str(out_of_vocab)], "outside the model's vocabulary"),
        (["--base", str(tiny_llama_dir), "--data", str(data), "--msa-layers", "9"], "--msa-layers"),
    ]
    for i, (args, message) in enumerate(cases):
        code, _, err = run_cli("train", *common, "--out", str(tmp_path / f"out{i}"), *args)
        assert code == 1, (args, err)
        assert message in err and err.startswith("streamspec train: ") and err.count("\n") == 1, err


def test_distill_command_passes_options_through(run_cli, monkeypatch, tmp_path):
    import streamspec.models.distill as distill_module

    calls = []

    def fake_distill(base, prompts_paths, out_path, **options):
        calls.append((base, [Path(p) for p in prompts_paths], Path(out_path), options))
        Path(out_path).write_text("")
        return {"total": 3, "skipped": 1, "written": 2}

    monkeypatch.setattr(distill_module, "distill", fake_distill)
    code, out, _ = run_cli("distill", "--base", "B", "--prompts", "p1.jsonl", "p2.jsonl", "--out",
                           str(tmp_path / "d.jsonl"), "--limit", "5", "--batch-size", "2", "--no-progress")
    assert code == 0 and "Wrote 2 answers" in out and "(1 were already there)" in out
    assert len(calls) == 1 and [p.name for p in calls[0][1]] == ["p1.jsonl", "p2.jsonl"]
    assert calls[0][0] == "B" and calls[0][3]["limit"] == 5 and calls[0][3]["batch_size"] == 2
    assert calls[0][3]["progress"] is False


def test_distill_bad_input_is_one_sentence(run_cli, tmp_path):
    code, _, err = run_cli("distill", "--prompts", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "d.jsonl"))
    assert code == 1 and "does not exist" in err and err.count("\n") == 1
