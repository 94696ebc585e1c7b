"""tools/harness.py, the loop every benchmark runs on: the alternating order, the medians,
the check against a reference arm, the step timer, the memory sampler and the prompts
file. Fake arms and a fake clock: no model, no timing asserts."""

from __future__ import annotations

import itertools

import pytest

from streamspec.errors import StreamspecError
from streamspec.tools import harness
from streamspec.tools.harness import Arm, Output


def fake_arms(outputs: dict[str, list[list[int]]], calls: list) -> list[Arm]:
    """Arms that return outputs[name][prompt index] (the prompt's first id is its index)
    and log (name, prompt index) to `calls`."""

    def arm(name: str) -> Arm:
        def generate(ids: list[int]) -> Output:
            calls.append((name, ids[0]))
            return Output(outputs[name][ids[0]], passes=len(ids))

        return Arm(name, generate)

    return [arm(name) for name in outputs]


PROMPTS = [[0, 7, 7], [1, 7], [2]]


def test_the_order_alternates_by_repeat_and_prompt():
    calls: list = []
    same = [[5], [6], [7]]
    arms = fake_arms({"a": same, "b": same, "c": same}, calls)
    measured = harness.measure(arms, PROMPTS, repeats=2, warm_up=[1, 7])
    warm, timed = calls[:3], calls[3:]
    assert warm == [("a", 1), ("b", 1), ("c", 1)]  # every arm once on the warm-up prompt, untimed
    assert timed == [("a", 0), ("b", 0), ("c", 0), ("c", 1), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("c", 2),
                     ("c", 0), ("b", 0), ("a", 0), ("a", 1), ("b", 1), ("c", 1), ("c", 2), ("b", 2), ("a", 2)]
    assert measured.order == [(name, prompt, repeat) for (name, prompt), repeat in zip(timed, [0] * 9 + [1] * 9)]
    # Each prompt sees both orders across repeats: who goes first is never always the same arm.
    for prompt in range(3):
        firsts = {next(n for n, p, r in measured.order if p == prompt and r == repeat) for repeat in (0, 1)}
        assert firsts == {"a", "c"}
    assert all(len(measured.runs[name][p]) == 2 for name in "abc" for p in range(3))


def test_medians_per_prompt_then_the_mean_over_prompts():
    # Wall seconds of the 2 arms x 2 prompts x 3 repeats in the order they run; the clock
    # is read once before and once after each call.
    seconds = iter([1.0, 2.0,  # repeat 0, prompt 0: a, b
                    4.0, 1.0,  # prompt 1: b, a
                    3.0, 2.0,  # repeat 1, prompt 0: b, a
                    1.0, 100.0,  # prompt 1: a, b (a disturbed run of b: the median ignores it)
                    2.0, 2.0,  # repeat 2, prompt 0: a, b
                    2.0, 4.0])  # prompt 1: b, a
    now = itertools.count()
    ticks = []
    for s in seconds:
        start = float(next(now)) * 1000
        ticks += [start, start + s]
    clock = iter(ticks).__next__
    outputs = {"a": [[1] * 6, [1] * 4], "b": [[1] * 6, [1] * 4]}
    measured = harness.measure(fake_arms(outputs, []), [[0], [1]], repeats=3, clock=clock)
    assert [[r.seconds for r in runs] for runs in measured.runs["a"]] == [[1.0, 2.0, 2.0], [1.0, 1.0, 4.0]]
    assert [[r.seconds for r in runs] for runs in measured.runs["b"]] == [[2.0, 3.0, 2.0], [4.0, 100.0, 2.0]]
    # a: prompt 0 median(6/1, 6/2, 6/2) = 3, prompt 1 median(4, 4, 1) = 4 -> mean 3.5
    assert measured.tokens_per_second("a") == pytest.approx(3.5)
    # b: prompt 0 median(3, 2, 3) = 3, prompt 1 median(1, 0.04, 2) = 1 -> mean 2
    assert measured.tokens_per_second("b") == pytest.approx(2.0)
    assert measured.stable("a") and measured.stable("b")


def test_outputs_are_checked_against_the_autoregressive_arm():
    reference = [[1, 2, 3], [4, 5], [6]]
    outputs = {"ar": reference, "spec": [[1, 2, 3], [4, 9], [6]], "lookup": [[1, 2, 3], [4, 5], [6]],
               "short": [[1, 2], [4, 5], []]}
    measured = harness.measure(fake_arms(outputs, []), PROMPTS, repeats=1)
    assert measured.same_as("spec", "ar") == [True, False, True]
    assert measured.same_as("lookup", "ar") == [True, True, True]
    assert measured.mismatches("ar") == {"spec": [1], "short": [0, 2]}


def test_an_output_that_changes_between_repeats_is_unstable():
    flips = itertools.cycle([[1], [2]])
    arm = Arm("flaky", lambda ids: Output(next(flips)))
    measured = harness.measure([arm], [[0]], repeats=2)
    assert not measured.stable("flaky")


def test_bad_loops_are_refused():
    with pytest.raises(StreamspecError, match="--repeats must be at least 1"):
        harness.measure(fake_arms({"a": [[1]]}, []), [[0]], repeats=0)
    with pytest.raises(StreamspecError, match="no prompts"):
        harness.measure(fake_arms({"a": [[1]]}, []), [], repeats=1)


def test_engine_arms_set_their_tree_before_each_call():
    class FakeEngine:
        budget, lookup, prune = 4, 0, 0.0

        def configure(self, **settings):  # as Engine.configure: None keeps a value
            for key, value in settings.items():
                if value is not None:
                    setattr(self, key, value)

        def generate(self, ids, max_new_tokens, speculative, **options):
            self.calls.append((self.budget, self.lookup, self.prune, speculative, options))
            stats = type("Stats", (), {"forward_passes": 1})()
            return type("Result", (), {"token_ids": [1], "stats": stats})()

    engine = FakeEngine()
    engine.calls = []
    arms = [harness.engine_arm("B2", engine, 8, budget=2, prune=0.3),
            harness.engine_arm("AR", engine, 8, speculative=False, ignore_eos=True)]
    harness.measure(arms, [[0], [1]], repeats=1)
    # B2 sets its tree; AR leaves the engine's (B2's) and asks for no speculation.
    assert engine.calls == [(2, 0, 0.3, True, {}), (2, 0, 0.3, False, {"ignore_eos": True}),
                            (2, 0, 0.3, False, {"ignore_eos": True}), (2, 0, 0.3, True, {})]


def test_step_timer_interleaves_and_settles():
    calls: list = []
    steps = {"p": lambda: calls.append("p"), "c": lambda: calls.append("c")}
    times = harness.time_steps(steps, repeats=2, warmup=1, settle=True)
    assert calls == ["p", "c", "p", "p", "c", "c", "c", "c", "p", "p"]
    assert {name: len(values) for name, values in times.items()} == {"p": 2, "c": 2}
    assert all(t >= 0 for values in times.values() for t in values)


def test_memory_sampler_sees_an_allocation():
    with harness.MemorySampler(release=True) as memory:
        block = bytearray(64 * harness.MIB)
        block[::4096] = b"x" * len(block[::4096])  # touch every page
    assert memory.peak_growth_mib > 48
    assert memory.resident_growth_mib > 48 and memory.peak >= memory.after
    del block
    assert harness.rss_bytes() > 0 and harness.peak_rss_bytes() >= harness.rss_bytes()
    assert harness.rss_bytes(2 ** 22 + 7) is None  # no such process


def test_one_prompts_file_format(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a", "domain": "code"}\n\n{"id": "x", "messages": [{"role": "user", '
                     '"content": "b"}]}\n{"prompt": "c", "domain": "code"}\n', encoding="utf-8")
    prompts = harness.read_prompt_file(jsonl)
    assert [(p.id, p.text, p.domain) for p in prompts] == [("p.jsonl:1", "a", "code"), ("x", None, ""),
                                                           ("p.jsonl:4", "c", "code")]
    assert prompts[1].messages == [{"role": "user", "content": "b"}]
    assert [p.text for p in harness.load_prompts(jsonl, 1, ["code"])] == ["a"]
    assert [p.text for p in harness.load_prompts(jsonl, 1, ["code"], from_end=True)] == ["c"]
    assert [p.text for p in harness.load_prompts(jsonl, None, from_end=True)] == ["a", None, "c"]
    text = tmp_path / "p.txt"
    text.write_text("first\n\nsecond {\n", encoding="utf-8")
    assert [(p.id, p.text) for p in harness.read_prompt_file(text)] == [("p.txt:1", "first"), ("p.txt:3", "second {")]
    for content, message in (('{"text": "x"}\n', "Line 1 of .* neither"), ("nope\n", "Line 1 of .* not valid JSON"),
                             ('{"prompt": "x", "domain": 3}\n', "domain"), ("\n", "holds no prompts")):
        jsonl.write_text(content, encoding="utf-8")
        with pytest.raises(StreamspecError, match=message):
            harness.read_prompt_file(jsonl)
    with pytest.raises(StreamspecError, match="does not exist"):
        harness.read_prompt_file(tmp_path / "missing.jsonl")
