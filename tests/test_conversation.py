"""Conversations and the automatic fallback.

Sessions: a conversation run turn by turn (reusing the KV cache) gives the same tokens
as each turn's whole history run from scratch; rewinding, regenerating and editing
reuse the rows they keep; another generation in between only costs a prefill; a saved
conversation restores into a fresh engine (and only into the model that saved it).
Oracle trees (the true continuation off the first branch) make long accepted paths, so
that graph compaction leaves rows pending at the end of a turn, the case where the next
turn's prefill must move them first.

Fallback: fake step costs (the measured seconds replaced) make speculation lose or pay;
the engine switches accordingly, says so in the statistics, and the tokens never change.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from builders import SHARPEN
from helpers import oracle_tree
from streamspec.errors import StreamspecError
from streamspec.runtime import Engine
from streamspec.runtime.conversation import Conversation
from streamspec.runtime.fallback import AUTOREGRESSIVE, SPECULATIVE, Fallback
from streamspec.runtime.session import CacheContents, common_prefix

TURNS = ("Hi! Who are you?", "Tell me more.", "And then?")
NEW = dict(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(shared_export):
    """A tiny llama with 3 streams whose greedy text varies (sharpened weights); shared
    with other test files: read only."""
    return shared_export(sharpen=SHARPEN, max_length=256)


@pytest.fixture(scope="module")
def scratch(folder):
    """A separate engine for from-scratch references (no cache reuse)."""
    return Engine(folder, provider="cpu", fallback=False)


def plant_oracle_trees(monkeypatch, engine: Engine, expected: list[int]) -> None:
    """Trees whose first branch is wrong and whose second holds the next 3 tokens of
    `expected` (prompt + answer), located by the cache's row count: accepted paths with
    path[i] != i, so compaction moves rows every step."""
    from streamspec.runtime import engine as engine_module

    def planted(root, stream_ids, stream_probs, budget):
        past = engine.session.contents.rows  # the root's position
        return oracle_tree(root, list(expected[past + 1:past + 4]))

    monkeypatch.setattr(engine_module, "build_tree", planted)


# ------------------------------------------------------------------------------ sessions
@pytest.mark.parametrize("compaction", ["host", "graph"])
def test_turn_by_turn_equals_from_scratch(folder, scratch, compaction):
    engine = Engine(folder, provider="cpu", compaction=compaction, budget=6)
    chat = engine.conversation(system="Be brief.")
    previous = None
    for turn in TURNS:
        history = chat.messages + [{"role": "user", "content": turn}]
        held, ids = engine.cached_ids, scratch.prompt_ids(history)
        result = chat.send(turn, **NEW)
        reference = scratch.generate(history, **NEW)
        assert result.token_ids == reference.token_ids and result.text == reference.text
        assert chat.messages == history + [{"role": "assistant", "content": result.text}]
        assert chat.token_ids == ids + result.token_ids
        # Reused: all the rows the cache held for this history. The answer's text, encoded
        # again by the template, may differ from the generated ids, so not always all of them.
        assert result.stats.cached_tokens == common_prefix(held, ids)
        if previous is not None:
            assert result.stats.cached_tokens >= previous.stats.prompt_tokens
        previous = result
    assert chat.cached_rows >= len(chat.token_ids) - 1  # all but (at most) the last token


def test_sampled_turns_equal_from_scratch_with_the_same_seed(folder, scratch):
    """One random number per generated token: the same seed gives the same tokens, turn
    by turn or from scratch, speculative or autoregressive, fallback or not."""
    engine = Engine(folder, provider="cpu", budget=6)
    chat = engine.conversation()
    sampling = dict(NEW, temperature=0.9, top_p=0.95, seed=11)
    for turn in TURNS[:2]:
        history = chat.messages + [{"role": "user", "content": turn}]
        result = chat.send(turn, **sampling)
        assert result.token_ids == scratch.generate(history, **sampling).token_ids
        assert result.token_ids == scratch.generate(history, speculative=False, **sampling).token_ids


@pytest.mark.parametrize("compaction", ["host", "graph"])
def test_oracle_trees_across_turns_and_save_restore(folder, scratch, compaction, monkeypatch, tmp_path):
    """Long accepted paths in every turn; with graph compaction the last path's rows are
    still pending when a turn ends, and when the conversation is saved."""
    engine = Engine(folder, provider="cpu", compaction=compaction, fallback=False)
    chat = engine.conversation(system="Be brief.")
    for turn in TURNS[:2]:
        history = chat.messages + [{"role": "user", "content": turn}]
        reference = scratch.generate(history, **NEW)
        plant_oracle_trees(monkeypatch, engine, scratch.prompt_ids(history) + reference.token_ids)
        result = chat.send(turn, **NEW)
        assert result.token_ids == reference.token_ids
        assert max(result.stats.accepted) >= 2
    if compaction == "graph":
        assert len(engine.session.contents.pending) > 0, "the test should end a turn with rows pending"
    saved = chat.save(tmp_path / "chat")
    state = json.loads((saved / "conversation.json").read_text())
    assert state["rows"] == chat.cached_rows >= len(chat.token_ids) - 1 and state["token_ids"] == chat.token_ids

    restored = Conversation.load(Engine(folder, provider="cpu", compaction=compaction, fallback=False), saved)
    assert restored.messages == chat.messages and restored.cached_rows == state["rows"]
    history = chat.messages + [{"role": "user", "content": TURNS[2]}]
    reference = scratch.generate(history, **NEW)
    monkeypatch.undo()
    for conversation in (restored, chat):  # the restored copy and the original continue alike
        result = conversation.send(TURNS[2], **NEW)
        assert result.token_ids == reference.token_ids
        assert result.stats.cached_tokens == min(common_prefix(state["token_ids"], scratch.prompt_ids(history)),
                                                 state["rows"]) > 0


def test_rewind_regenerate_and_edit_reuse_the_kept_rows(folder, scratch):
    engine = Engine(folder, provider="cpu", budget=6)
    chat = engine.conversation(system="Be brief.")
    first = chat.send(TURNS[0], **NEW)
    second = chat.send(TURNS[1], **NEW)

    again = chat.regenerate(**NEW)  # greedy: the same answer, and only the last prompt token runs
    assert again.token_ids == second.token_ids and again.stats.prefill_tokens == 1
    assert len(chat.messages) == 5

    edited = chat.edit("Say something else.", **NEW)
    history = chat.messages[:-1]
    assert history[-1]["content"] == "Say something else." and len(chat.messages) == 5
    assert edited.token_ids == scratch.generate(history, **NEW).token_ids
    assert edited.stats.cached_tokens >= first.stats.prompt_tokens + len(first.token_ids) - 1

    chat.rewind()  # back to the state after the first answer
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]
    assert chat.token_ids == engine.tokenizer.encode_chat(chat.messages, add_generation_prompt=False)
    third = chat.send(TURNS[2], **NEW)
    assert third.token_ids == scratch.generate(chat.messages[:-1], **NEW).token_ids
    assert third.stats.cached_tokens >= first.stats.prompt_tokens

    with pytest.raises(StreamspecError, match="Cannot rewind 3 turns"):
        chat.rewind(3)
    empty = engine.conversation()
    with pytest.raises(StreamspecError, match="no user message"):
        empty.regenerate()


def test_token_level_continuation_and_truncate(folder, scratch):
    """Without a chat template: the whole token history plus new ids, or a truncated one."""
    engine = Engine(folder, provider="cpu", budget=6)
    chat = Conversation(engine)
    prompt = [5, 40, 41, 42, 9, 77, 10, 11]
    first = chat.generate(prompt, **NEW)
    assert chat.token_ids == prompt + first.token_ids
    longer = chat.token_ids + [60, 61, 62]
    second = chat.generate(longer, **NEW)
    assert second.token_ids == scratch.generate(longer, **NEW).token_ids
    assert second.stats.prefill_tokens == 4  # the last answer token and the 3 new ones
    chat.truncate(len(prompt) + 3)  # rewind into the first answer, continue differently
    branch = chat.token_ids + [70]
    third = chat.generate(branch, **NEW)
    assert third.token_ids == scratch.generate(branch, **NEW).token_ids
    assert third.stats.prefill_tokens == 1


def test_another_generation_in_between_costs_only_a_prefill(folder, scratch):
    """One cache per engine: the conversation finds its rows gone and runs them again."""
    engine = Engine(folder, provider="cpu", budget=6)
    chat = engine.conversation()
    chat.send(TURNS[0], **NEW)
    assert chat.cached_rows == len(chat.token_ids) - 1
    engine.generate("Something unrelated entirely.", **NEW)  # a plain generation: no reuse asked
    assert chat.cached_rows == 0
    history = chat.messages + [{"role": "user", "content": TURNS[1]}]
    result = chat.send(TURNS[1], **NEW)
    assert result.stats.cached_tokens == 0
    assert result.token_ids == scratch.generate(history, **NEW).token_ids


def test_refused_turn_leaves_the_conversation_alone(folder):
    engine = Engine(folder, provider="cpu", max_length=64)
    chat = engine.conversation()
    chat.send("Hi", max_new_tokens=4)
    before = (list(chat.messages), list(chat.token_ids))
    with pytest.raises(StreamspecError, match="maximum length of 64"):
        chat.send("x" * 80, max_new_tokens=4)
    assert (chat.messages, chat.token_ids) == before


def test_restore_refuses_another_model_and_corrupt_files(folder, tmp_path):
    engine = Engine(folder, provider="cpu")
    chat = engine.conversation()
    chat.send(TURNS[0], **NEW)
    saved = chat.save(tmp_path / "chat")

    other = tmp_path / "other-model"
    shutil.copytree(folder, other)
    config = json.loads((other / "streamspec.json").read_text())
    config["tree"] = {"budget": 3}  # any change to the folder makes another model
    (other / "streamspec.json").write_text(json.dumps(config))
    with pytest.raises(StreamspecError, match="saved with another model"):
        Conversation.load(Engine(other, provider="cpu"), saved)

    with pytest.raises(StreamspecError, match="not a saved conversation"):
        Conversation.load(engine, tmp_path)
    pickled = tmp_path / "pickled"
    shutil.copytree(saved, pickled)
    np.savez(pickled / "kv.npz", kv=np.array([{"not": "an array"}], dtype=object))  # needs pickle to load
    with pytest.raises(StreamspecError, match="not a saved KV cache"):
        Conversation.load(engine, pickled)
    np.savez(pickled / "kv.npz", kv=np.zeros((1, 2, 3), dtype=np.float32))
    with pytest.raises(StreamspecError, match="corrupt"):
        Conversation.load(engine, pickled)
    (pickled / "conversation.json").write_text("{broken")
    with pytest.raises(StreamspecError, match="not valid JSON"):
        Conversation.load(engine, pickled)


def test_cache_contents_bookkeeping():
    """Rows held, reuse, and rows still pending after graph compaction."""
    contents = CacheContents()
    assert contents.reusable([1, 2, 3]) == 0
    tokens = [7, 8, 9, 10, 11, 12]
    contents.set(tokens, 5, np.array([6, 8]))  # rows 3, 4 still at 6 and 8
    assert contents.held() == [7, 8, 9, 10, 11]
    assert contents.row_index().tolist() == [0, 1, 2, 6, 8]
    assert contents.reusable([7, 8, 9, 10, 11, 12, 13]) == 5
    assert contents.reusable([7, 8, 9]) == 2  # the last prompt token always runs
    assert contents.reusable([7, 8, 0, 10]) == 2
    assert contents.keep(4).tolist() == [6] and contents.rows == 4
    assert contents.keep(2).tolist() == [] and contents.row_index().tolist() == [0, 1]
    contents.set([1, 2, 3], 5, np.array([9, 10, 11]))  # a cut generation: rows beyond its tokens
    assert contents.rows == 3 and contents.row_index().tolist() == [0, 1, 9]


# ------------------------------------------------------------------------------ fallback
def fake_costs(monkeypatch, engine: Engine, speculative_seconds: float, ar_seconds: float = 1.0) -> None:
    """Replace the measured step time by a fixed cost per kind of step."""
    record = engine.fallback.record
    monkeypatch.setattr(engine.fallback, "record", lambda speculated, seconds, tokens: record(
        speculated, speculative_seconds if speculated else ar_seconds, tokens))


def test_fallback_switches_when_speculation_loses_and_probes_again(folder, monkeypatch):
    plain = Engine(folder, provider="cpu", budget=6, fallback=False)
    engine = Engine(folder, provider="cpu", budget=6, fallback=Fallback(window=3, backoff=4, max_backoff=8))
    fake_costs(monkeypatch, engine, speculative_seconds=5.0)  # a tree step costs 5 one-token steps
    prompt = [5, 40, 41, 42, 9, 77]
    result = engine.generate(prompt, max_new_tokens=60, ignore_eos=True)
    assert result.token_ids == plain.generate(prompt, max_new_tokens=60, ignore_eos=True).token_ids
    stats = result.stats
    modes = [d["mode"] for d in stats.decisions]
    assert modes[:3] == [AUTOREGRESSIVE, SPECULATIVE, AUTOREGRESSIVE]  # fall back, probe, fall back
    first = stats.decisions[0]
    assert first["speculative_tokens_per_second"] < first["autoregressive_tokens_per_second"] == 1.0
    assert "loses" in first["reason"] and first["step"] == 2 + 3  # calibration, then a window of 3
    assert stats.fallback_steps > stats.steps / 2
    assert stats.as_dict()["decisions"] == stats.decisions
    assert engine.fallback.backoff == 8  # doubled after each loss, capped


def test_fallback_keeps_speculating_when_it_pays(folder, monkeypatch):
    engine = Engine(folder, provider="cpu", budget=6, fallback=Fallback(window=3, refresh=1000))
    fake_costs(monkeypatch, engine, speculative_seconds=0.5)  # every speculative step beats a one-token step
    result = engine.generate([5, 40, 41, 42], max_new_tokens=40, ignore_eos=True)
    stats = result.stats
    assert stats.fallback_steps == 2  # the calibration only
    assert [d["mode"] for d in stats.decisions] == [SPECULATIVE] and "pays" in stats.decisions[0]["reason"]
    again = engine.generate([5, 40, 41, 42], max_new_tokens=40, ignore_eos=True)
    assert again.stats.fallback_steps == 0 and again.token_ids == result.token_ids  # the engine remembers


def test_fallback_off_and_autoregressive_generation_never_consult_it(folder, monkeypatch):
    engine = Engine(folder, provider="cpu", fallback=False)
    assert engine.fallback is None
    result = engine.generate([5, 40, 41], max_new_tokens=10, ignore_eos=True)
    assert result.stats.fallback_steps == 0 and not result.stats.decisions
    engine = Engine(folder, provider="cpu")
    monkeypatch.setattr(engine.fallback, "record", lambda *args: pytest.fail("consulted"))
    assert engine.generate([5, 40, 41], max_new_tokens=10, speculative=False, ignore_eos=True).stats.steps == 9
    with pytest.raises(ValueError):
        Fallback(window=0)
