"""The reduced drafting vocabulary: chosen from the answers, stored in the checkpoint,
scored by stream rows and the early-exit head of the export, never by verification."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from builders import PROMPTS, SHARPEN, Reference, export_tiny, hf_greedy, msa_model, run_step
from helpers import assert_tokens_match, assert_top_matches
from streamspec.models.errors import StreamspecError as ModelError
from streamspec.models.vocab import choose_draft_vocab, save_draft_vocab
from streamspec.runtime import Engine
from streamspec.runtime.folder import read_folder
from streamspec.runtime.session import StepSession
from streamspec.runtime.tree import chain_tree

VOCAB = torch.arange(0, 128, 3)  # 43 of the 128 tokens


def test_choose_keeps_the_most_frequent_answer_tokens():
    answers = [[5, 5, 5, 7, 7, 9], [5, 7, 11, 2]]
    ids, coverage = choose_draft_vocab(answers, vocab_size=16, size=2, always=[2])
    assert ids.tolist() == [2, 5, 7]  # 5 (4×), 7 (3×), plus the end-of-sequence id, sorted
    assert coverage == pytest.approx(8 / 10)
    with pytest.raises(ModelError, match="between 1 and 15"):
        choose_draft_vocab(answers, vocab_size=16, size=16)


@pytest.fixture(scope="module")
def reduced(tiny_model_dir, tmp_path_factory):
    """A sharpened tiny MSA model with a drafting vocabulary, exported with and without
    split graphs, and the same model with the whole vocabulary (its own exports: no
    other test file has this model)."""
    root = tmp_path_factory.mktemp("vocab")
    hf = tiny_model_dir("llama", seed=1, sharpen=SHARPEN)  # the llama of sharpened_msa(seed=1); shared: read only
    model = msa_model(hf, num_streams=3)
    model.draft_vocab = VOCAB
    return {"hf": hf, "model": model, "folder": export_tiny(model, hf, root / "reduced", pruning=True),
            "full": export_tiny(model, hf, root / "full", full_draft_vocab=True)}


def test_stream_and_exit_outputs_score_the_drafting_vocabulary(reduced):
    model, folder = reduced["model"], reduced["folder"]
    config = read_folder(folder)
    assert config.graph["draft_vocab"] == len(VOCAB) and read_folder(reduced["full"]).graph["draft_vocab"] is None
    prompt = chain_tree([5, 40, 41, 42, 9, 77, 12, 13])
    main, streams, exits = Reference(model).step(prompt, 0)
    out = run_step(StepSession(config, "cpu"), prompt, 0)
    # Verification: the whole vocabulary. Drafting: softmax over the kept tokens only.
    assert_top_matches(out["main_ids"], out["main_probs"], main)
    node = int(out["draft_node"][0])
    assert set(out["stream_ids"].ravel().tolist()) <= set(VOCAB.tolist())
    restricted = np.full_like(streams[node], -np.inf)
    restricted[:, VOCAB] = streams[node][:, VOCAB]
    assert_top_matches(out["stream_ids"], out["stream_probs"], restricted)
    restricted = np.full_like(exits, -np.inf)
    restricted[:, VOCAB] = exits[:, VOCAB]
    assert_top_matches(out["exit_ids"], out["exit_probs"], restricted)
    # The lower graph scores a token under its parent over the same set; 0 outside it.
    split = StepSession(config, "cpu", split=True)
    tokens = np.array([5, 40, 41, 42, 9, 77, 12, 13, 6, 7])  # 6 is in VOCAB, 7 is not
    parents = np.array([-1, 0, 1, 2, 3, 4, 5, 6, 7, 7], dtype=np.int32)
    depths = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 8])
    mask = np.eye(10, dtype=bool)
    for i in range(1, 10):
        mask[i] |= mask[parents[i]]
    feeds = dict(input_ids=tokens, positions=depths, tree_mask=mask, tree_parent=parents, past_length=np.array([0]),
                 compact_src=np.zeros(0, np.int64), exit_parents=np.array([7]), exit_nodes=np.array([8, 9]),
                 exit_rows=np.array([0, 0]))
    scores = split.run_lower(feeds)["exit_scores"]
    row = exits[7][VOCAB.numpy()]
    expected = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    assert scores[0] == pytest.approx(float(expected[VOCAB.tolist().index(6)]), rel=1e-4)
    assert scores[1] == 0.0


@pytest.mark.parametrize("prune", [0.0, 0.2])
def test_greedy_stays_exact_with_a_drafting_vocabulary(reduced, prune):
    engine = Engine(reduced["folder"], provider="cpu", budget=6, prune=prune, fallback=False)
    for prompt in PROMPTS:
        reference, logits = hf_greedy(reduced["hf"], prompt, 30)
        result = engine.generate(prompt, max_new_tokens=30, ignore_eos=True)
        assert_tokens_match(result.token_ids, reference, logits)


def test_checkpoint_carries_the_vocabulary(reduced, tiny_model_dir, tmp_path):
    from streamspec.exporter import export
    from streamspec.models.checkpoint import load_checkpoint, save_checkpoint
    from streamspec.models.loading import base_fingerprint
    from streamspec.models.vocab import main as vocab_main

    base = tiny_model_dir("llama")
    model = msa_model(base, num_streams=2, msa_layers=1)
    checkpoint = save_checkpoint(tmp_path / "ckpt", model, base, base_fingerprint(base))
    assert load_checkpoint(checkpoint)[0].draft_vocab is None
    save_draft_vocab(checkpoint, VOCAB, 0.9)
    loaded, info = load_checkpoint(checkpoint)
    assert torch.equal(loaded.draft_vocab, VOCAB) and info.draft_vocab["size"] == len(VOCAB)
    folder = export(checkpoint, tmp_path / "onnx", max_length=64, progress=False)
    assert read_folder(folder).graph["draft_vocab"] == len(VOCAB)
    # The command chooses from the training answers of a distill file.
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"id": str(i), "split": split, "prompt_ids": [1, 2], "answer_ids": answer})
                              for i, (split, answer) in enumerate([("train", [9, 9, 9, 4]), ("train", [9, 4, 7]),
                                                                   ("heldout", [11, 11, 11])])) + "\n")
    from streamspec.tools.commands.demo import exported_from

    assert exported_from(folder, checkpoint)
    assert vocab_main([str(checkpoint), "--data", str(data), "--size", "2"]) == 0
    assert not exported_from(folder, checkpoint)  # `streamspec demo` exports the changed checkpoint again
    loaded, info = load_checkpoint(checkpoint)
    assert loaded.draft_vocab.tolist() == sorted({9, 4} | set(model.config.eos_token_ids))
    assert info.draft_vocab["train_coverage"] == pytest.approx(6 / 7)  # 7 is not kept
    assert info.draft_vocab["heldout_coverage"] == 0.0  # the held-out answer's 11 is not either
    (checkpoint / "draft_vocab.safetensors").write_bytes(b"broken")
    with pytest.raises(ModelError, match="missing or corrupt"):
        load_checkpoint(checkpoint)
