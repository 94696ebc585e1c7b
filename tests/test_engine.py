"""The ONNX Runtime engine: exactness against transformers, exact sampling, the KV
cache, text streaming, bad input, the light import, the `generate` command.

Greedy output must equal transformers' greedy `generate` token for token; where it
diverges the divergence must be a near-tie of the reference (tests/helpers.py).
"""

from __future__ import annotations

import json
import math
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from builders import PROMPTS, export_tiny, hf_greedy
from helpers import assert_runs_without_heavy_imports, assert_tokens_match, generate_with_oracle_trees
from streamspec.errors import StreamspecError
from streamspec.models.config import ModelConfig, StreamConfig
from streamspec.models.model import Transformer
from streamspec.runtime import Engine


@pytest.fixture(scope="module")
def engines(tiny_model_dir, shared_export):
    """family -> (HF folder, exported MSA folder with 3 streams) for the tiny families
    (shared: read only)."""
    return {family: (tiny_model_dir(family), shared_export(family, streams=3)) for family in ("llama", "opt")}


# ------------------------------------------------------------------------------ greedy exactness
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_greedy_equals_transformers(engines, family):
    """Random streams: drafts are rarely right, so this checks verification and the
    AR path; the oracle test below makes long accepted paths."""
    hf_folder, folder = engines[family]
    engines = [Engine(folder, provider="cpu", compaction=compaction, budget=6) for compaction in ("host", "graph")]
    for prompt in PROMPTS:
        reference, logits = hf_greedy(hf_folder, prompt, 40)
        for engine in engines:
            for speculative in (False, True):
                result = engine.generate(prompt, max_new_tokens=40, speculative=speculative, ignore_eos=True)
                assert_tokens_match(result.token_ids, reference, logits)
                assert result.stats.speculative == speculative


def test_prompt_lookup_drafts_keep_greedy_exact(engines):
    """Lookup chains beside the stream drafts (and alone, budget 0): the same tokens as
    autoregressive decoding, and some accepted tokens come from lookup (a tiny random
    model's greedy text soon repeats itself, which is what lookup copies). Lookup nodes
    get no stream rows: a step's nodes with streams are its stream-drafted ones (and the
    root), and a path that ends on a lookup node drafts no streams the next step."""
    _, folder = engines["llama"]
    plain = Engine(folder, provider="cpu", fallback=False)
    settings = [dict(budget=4, lookup=6), dict(budget=0, lookup=6)]
    looked_up = ended_on_lookup = 0
    for options in settings:
        engine = Engine(folder, provider="cpu", fallback=False, **options)
        for prompt in PROMPTS:
            expected = plain.generate(prompt, max_new_tokens=60, speculative=False, ignore_eos=True).token_ids
            records = []
            engine.on_step = records.append
            result = engine.generate(prompt, max_new_tokens=60, ignore_eos=True)
            assert result.token_ids == expected
            looked_up += result.stats.lookup_tokens
            assert sum(r.lookup_accepted for r in records) == result.stats.lookup_tokens
            assert all(r.lookup_accepted <= min(r.lookup_nodes, r.accepted) for r in records)
            assert result.stats.streamed_sizes == [
                (r.tree_nodes - r.lookup_nodes) if options["budget"] else 0 for r in records]
            if options["budget"] == 0:  # lookup alone: no stream rows, so no stream drafts
                assert result.stats.lookup_tokens == sum(result.stats.accepted)
            else:  # a path that ends on a lookup node (it accepted a lookup token: lookup nodes
                # follow the stream ones on a path) leaves the next step with the root's streams only
                stream_drafts = [r.tree_nodes - r.lookup_nodes - 1 for r in records]
                after_lookup = [d for r, d in zip(records, stream_drafts[1:]) if r.lookup_accepted]
                assert all(d == 0 for d in after_lookup) and any(d > 0 for d in stream_drafts)
                ended_on_lookup += len(after_lookup)
    assert looked_up > 0 and ended_on_lookup > 0


def test_memory_budget_sizes_the_cache_or_refuses(engines):
    from streamspec.runtime.memory import estimate_memory, parse_size

    _, folder = engines["llama"]
    config = Engine(folder, provider="cpu").config
    assert config.max_length > 80
    fits_80 = estimate_memory(config, 80, 4).total
    engine = Engine(folder, provider="cpu", budget=4, memory_budget=fits_80 + 1)
    assert engine.max_length == 80 and engine.memory.total <= fits_80 + 1
    assert engine.session.host_cache.shape[-2] == 80  # the cache really has 80 rows
    assert Engine(folder, provider="cpu", budget=4, memory_budget="10G").max_length == config.max_length
    with pytest.raises(StreamspecError, match="does not fit"):
        Engine(folder, provider="cpu", budget=4, memory_budget=estimate_memory(config, 64, 4).total - 1)
    with pytest.raises(StreamspecError, match="memory size"):
        parse_size("lots")
    assert parse_size("1.5G") == 3 << 29 and parse_size("800M") == 800 << 20


def test_plain_base_model_generates_like_transformers(tiny_model_dir, shared_export):
    folder = tiny_model_dir("qwen2")
    exported = shared_export("qwen2", streams=0)  # the plain base model (shared: read only)
    engine = Engine(exported, provider="cpu")
    assert not engine.can_speculate
    graph = engine.config.graph  # a base model's graph has no stream inputs or outputs
    assert "stream_ids" not in graph["outputs"] and "stream_nodes" not in graph["inputs"]
    assert "logits" not in graph["outputs"]
    reference, logits = hf_greedy(folder, PROMPTS[0], 30)
    result = engine.generate(PROMPTS[0], max_new_tokens=30, ignore_eos=True)  # speculative falls back to AR
    assert_tokens_match(result.token_ids, reference, logits)
    assert result.stats.steps == 29 and not result.stats.speculative


@pytest.mark.parametrize("mode, kv_dtype", [("lossless", "none"), ("shared", "none"), ("lossless", "int8")])
def test_autoregressive_export_keeps_the_tokens(tiny_model_dir, tmp_path, mode, kv_dtype):
    """`export --autoregressive`: the main stream alone, GroupQueryAttention's causal rule,
    no tree inputs, far fewer nodes; greedy tokens equal the full folder's autoregressive
    ones (and transformers' for the lossless model with a float cache, whose main stream
    is the base), also with an int8 cache, and draft budgets or lookup are refused in one
    sentence."""
    import onnx

    from builders import msa_model

    hf = tiny_model_dir("llama")
    model = msa_model(hf, num_streams=3, mode=mode)
    full, lean = (export_tiny(model, hf, tmp_path / name, autoregressive=name == "lean", kv_dtype=kv_dtype)
                  for name in ("full", "lean"))
    assert model.num_streams == 3  # the caller's model keeps its streams
    nodes = {f: len(onnx.load(str(f / "model.onnx"), load_external_data=False).graph.node) for f in (full, lean)}
    assert nodes[lean] < nodes[full] * (0.5 if mode == "lossless" else 0.75)  # shared: adapters stay
    # Packed QKV (pack_chain_attention): GroupQueryAttention rotates q and k itself and
    # every layer reads one shared sequence length. Not where stream adapters add to q, k
    # and v (shared mode's MSA layers): those keep their RotaryEmbedding nodes.
    lean_graph = onnx.load(str(lean / "model.onnx"), load_external_data=False).graph
    attention = [n for n in lean_graph.node if n.op_type == "GroupQueryAttention"]
    packed = [n for n in attention if any(a.name == "do_rotary" and a.i == 1 for a in n.attribute)]
    assert len(packed) == (model.config.num_layers if mode == "lossless" else model.msa_start) > 0
    assert all(n.input[1] == n.input[2] == "" and n.input[7] and n.input[8] for n in packed)
    assert len({n.input[5] for n in attention}) == 1 and len({n.input[6] for n in attention}) == 1
    rotations = sum(n.op_type == "RotaryEmbedding" for n in lean_graph.node)
    assert rotations == 2 * (len(attention) - len(packed))
    engine = Engine(lean, provider="cpu")
    inputs = engine.config.graph["inputs"]
    assert not {"tree_mask", "compact_src", "stream_nodes"} & set(inputs)
    assert ("positions" in inputs) == bool(rotations)
    assert not engine.can_speculate and not engine.config.can_tree and engine.budget == 0
    reference_engine = Engine(full, provider="cpu", budget=0)
    for prompt in PROMPTS:
        expected = reference_engine.generate(prompt, max_new_tokens=30, speculative=False, ignore_eos=True)
        result = engine.generate(prompt, max_new_tokens=30, ignore_eos=True)
        assert result.token_ids == expected.token_ids
        if mode == "lossless" and kv_dtype == "none":
            reference, logits = hf_greedy(hf, prompt, 30)
            assert_tokens_match(result.token_ids, reference, logits)
    for settings in ({"budget": 4}, {"lookup": 3}):
        with pytest.raises(StreamspecError, match="exported with --autoregressive"):
            engine.configure(**settings)
        with pytest.raises(StreamspecError, match="exported with --autoregressive"):
            Engine(lean, provider="cpu", **settings)


def test_oracle_drafts_are_accepted_and_compacted(engines, monkeypatch):
    """Trees that hold the true continuation off the first branch: long accepted paths
    with path[i] != i, so compaction moves rows every step; the output must not change."""
    hf_folder, folder = engines["llama"]
    prompt = PROMPTS[0]
    reference, logits = hf_greedy(hf_folder, prompt, 30)
    for compaction in ("host", "graph"):
        engine = Engine(folder, provider="cpu", compaction=compaction, fallback=False)
        pieces, _ = generate_with_oracle_trees(engine, engine.prompt_ids(prompt), reference, 30, monkeypatch)
        assert_tokens_match(pieces, reference, logits)
        assert len(pieces) == 30


# ------------------------------------------------------------------------------ sampling exactness
def small_vocab_folder(tokenizer_dir: Path, out: Path) -> tuple[Transformer, Path]:
    """A tiny MSA model over 6 tokens with peaked distributions (drafts often right)."""
    config = ModelConfig(family="llama", model_type="llama", vocab_size=6, hidden_size=32, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                         max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(7)
    model = Transformer(config, StreamConfig(num_streams=2, num_msa_layers=1, lora_rank=2)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1 and "lora_B" not in name and "exit_B" not in name:
                param.normal_(0, 0.4)
        model.stream_embed.zero_()  # stream j repeats the main prediction: often right here
    return model, export_tiny(model, tokenizer_dir, out, max_length=32)


def exact_joint(model: Transformer, prompt: list[int], length: int, temperature: float) -> dict[tuple, float]:
    """Probability of every sequence of `length` new tokens under temperature sampling."""
    probs = {(): 1.0}
    with torch.no_grad():
        for _ in range(length):
            nxt = {}
            for seq, p in probs.items():
                tokens = torch.tensor([prompt + list(seq)])
                from streamspec.models.attention import EagerAttention, causal_tree_mask

                logits = model(tokens, torch.arange(tokens.shape[1])[None],
                               EagerAttention(causal_tree_mask(tokens.shape[1]), 0), with_streams=False).main_logits
                q = torch.softmax(logits[0, -1].double() / temperature, -1).numpy()
                for t, qt in enumerate(q):
                    nxt[seq + (t,)] = p * qt
            probs = nxt
    return probs


def chi_square_rejects(counts: dict[tuple, int], probs: dict[tuple, float], runs: int) -> tuple[bool, float]:
    """Pearson chi-square at the 0.1% level (cells of expectation < 5 pooled)."""
    stat, df, pooled_obs, pooled_exp = 0.0, -1, 0, 0.0
    for key, p in probs.items():
        expected, observed = p * runs, counts.get(key, 0)
        if expected < 5:
            pooled_obs, pooled_exp = pooled_obs + observed, pooled_exp + expected
            continue
        stat += (observed - expected) ** 2 / expected
        df += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        df += 1
    # Wilson-Hilferty: the chi-square quantile from the normal one (z = 3.09 for 0.1%).
    critical = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3
    return stat > critical, stat / critical


def sample_counts(engine: Engine, prompt: list[int], runs: int, length: int, speculative: bool,
                  temperature: float) -> tuple[dict[tuple, int], float]:
    counts: dict[tuple, int] = {}
    accepted = 0
    for seed in range(runs):
        result = engine.generate(prompt, max_new_tokens=length, temperature=temperature, seed=seed,
                                 speculative=speculative, ignore_eos=True)
        key = tuple(result.token_ids)
        counts[key] = counts.get(key, 0) + 1
        accepted += sum(result.stats.accepted)
    return counts, accepted / runs


def test_sampling_is_exact_in_both_modes(tiny_model_dir, tmp_path, monkeypatch):
    """The first three sampled tokens follow the model's exact joint distribution, with
    and without speculation; an approximate acceptance rule fails the same test."""
    from streamspec.runtime import engine as engine_module

    model, folder = small_vocab_folder(tiny_model_dir("llama"), tmp_path / "v6")
    prompt, length, runs, temperature = [1, 4, 2], 3, 1200, 0.9
    probs = exact_joint(model, prompt, length, temperature)
    engine = Engine(folder, provider="cpu", budget=4, fallback=False)  # speculation must run, paying or not
    for speculative in (False, True):
        counts, accepted = sample_counts(engine, prompt, runs, length, speculative, temperature)
        rejected, ratio = chi_square_rejects(counts, probs, runs)
        assert not rejected, f"speculative={speculative}: chi-square {ratio:.2f} x the 0.1% critical value"
        if speculative:
            assert accepted > 0.5, "drafts were rarely accepted: the test would not see approximate acceptance"

    def accept_first_child(tree, choose):  # a biased rule: trust the draft's first branch
        path = [0]
        while True:
            children = [i for i in range(1, tree.size) if tree.parents[i] == path[-1]]
            if not children:
                return path, choose(path[-1])
            path.append(children[0])

    monkeypatch.setattr(engine_module, "accept", accept_first_child)
    # The engine also refuses a path that disagrees with the graph's own walk; lift that
    # check too, so that only the statistics can catch the biased rule.
    monkeypatch.setattr(engine_module, "_draft", lambda out, node: (out["stream_ids"], out["stream_probs"]))
    counts, _ = sample_counts(engine, prompt, runs, length, True, temperature)
    assert chi_square_rejects(counts, probs, runs)[0], "the test cannot tell approximate acceptance apart"


def test_sampling_parameters_and_seed(engines):
    _, folder = engines["llama"]
    engine = Engine(folder, provider="cpu")
    a = engine.generate(PROMPTS[0], max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=20, seed=3, ignore_eos=True)
    b = engine.generate(PROMPTS[0], max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=20, seed=3, ignore_eos=True)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12
    top1 = engine.generate(PROMPTS[0], max_new_tokens=12, temperature=1.5, top_k=1, seed=1, ignore_eos=True)
    greedy = engine.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True)
    assert top1.token_ids == greedy.token_ids  # top-k 1 leaves only the argmax


# ------------------------------------------------------------------------------ cache, text, stats
def test_kv_cache_is_allocated_once_and_written_in_place(engines):
    _, folder = engines["llama"]
    for compaction in ("host", "graph"):
        engine = Engine(folder, provider="cpu", compaction=compaction)
        buffers = [value.data_ptr() for value in engine.session.cache]
        cache_ids = [id(value) for value in engine.session.cache]
        for _ in range(2):
            engine.generate(PROMPTS[2], max_new_tokens=15, ignore_eos=True)
            bound = engine.session.binding.get_outputs()[len(engine.session.output_names):]
            assert [value.data_ptr() for value in bound] == buffers
        assert [value.data_ptr() for value in engine.session.cache] == buffers
        assert [id(value) for value in engine.session.cache] == cache_ids
        if compaction == "host":  # the bound buffers are the numpy cache itself
            assert engine.session.host_cache[0].__array_interface__["data"][0] == buffers[0]
            assert np.abs(engine.session.host_cache[:, :, :, :len(PROMPTS[2])]).sum() > 0


def test_stream_yields_the_generated_text(engines):
    _, folder = engines["llama"]
    engine = Engine(folder, provider="cpu")
    pieces = list(engine.stream("Hello there", max_new_tokens=20, ignore_eos=True))
    result = engine.last_result
    assert "".join(pieces) == result.text == engine.tokenizer.decode(result.token_ids)
    stats = result.stats
    assert stats.new_tokens == len(result.token_ids) == 20
    assert stats.forward_passes == stats.steps + 1 and len(stats.accepted) == stats.steps
    assert stats.mean_accepted_length == pytest.approx(1 + sum(stats.accepted) / stats.steps)
    assert 0 < stats.model_seconds <= stats.total_seconds and stats.tokens_per_second > 0


def test_stop_strings_and_eos(engines):
    _, folder = engines["llama"]
    engine = Engine(folder, provider="cpu")
    full = engine.generate("abc", max_new_tokens=30, ignore_eos=True)
    stop = full.text[5:7]
    cut = engine.generate("abc", max_new_tokens=30, stop=[stop], ignore_eos=True)
    assert cut.text == full.text[:full.text.index(stop)] and cut.stats.stop_reason == "stop"
    eos_at = next((i for i, t in enumerate(full.token_ids) if t == 2), None)
    normal = engine.generate("abc", max_new_tokens=30)
    if eos_at is None:
        assert normal.token_ids == full.token_ids
    else:
        assert normal.token_ids == full.token_ids[:eos_at + 1] and normal.stats.stop_reason == "eos"


def test_chat_template_matches_transformers(engines):
    from transformers import AutoTokenizer

    hf_folder, folder = engines["llama"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    expected = AutoTokenizer.from_pretrained(str(hf_folder)).apply_chat_template(messages, add_generation_prompt=True,
                                                                                          return_dict=False)
    assert Engine(folder, provider="cpu").prompt_ids(messages) == list(expected)


def test_text_stream_is_correct_across_utf8_boundaries():
    """A byte-level tokenizer (one token per byte): characters span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from streamspec.runtime.tokenizer import TextStream

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    text = "naïve café — 東京 🦉 ok"
    ids = tokenizer.encode(text).ids
    assert len(ids) == len(text.encode("utf-8"))
    stream = TextStream(types.SimpleNamespace(decode=lambda i: tokenizer.decode(i)))
    pieces = [stream.push([token]) for token in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


# ------------------------------------------------------------------------------ bad input
def test_bad_input_is_one_clear_error(engines, tmp_path):
    _, folder = engines["llama"]
    with pytest.raises(StreamspecError, match="is not a folder"):
        Engine(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "streamspec.json").write_text("{not json")
    with pytest.raises(StreamspecError, match="not valid JSON"):
        Engine(broken)
    config = json.loads((folder / "streamspec.json").read_text())
    (broken / "streamspec.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(StreamspecError, match="format version 99"):
        Engine(broken)
    (broken / "streamspec.json").write_text(json.dumps(config))
    (broken / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(StreamspecError, match="could not load"):
        Engine(broken)
    (broken / "model.onnx").unlink()
    with pytest.raises(StreamspecError, match="lacks model.onnx"):
        Engine(broken)

    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(StreamspecError, match="CUDA"):
            Engine(folder, provider="cuda")
    engine = Engine(folder, provider="cpu", max_length=32)
    with pytest.raises(StreamspecError, match="maximum length of 32"):
        engine.stream(PROMPTS[0], max_new_tokens=30)  # checked before any generation
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2), dict(max_new_tokens=0)):
        with pytest.raises(StreamspecError):
            engine.generate(PROMPTS[0], **{"max_new_tokens": 4, **bad})
    with pytest.raises(StreamspecError, match="Token ids"):
        engine.generate([10 ** 6])
    with pytest.raises(StreamspecError, match="empty"):
        engine.generate("")


def test_a_failing_onnxruntime_run_is_one_sentence(engines, monkeypatch):
    """An error ONNX Runtime raises mid-generation reaches the user as one sentence; the
    known CUDA GroupQueryAttention limit (no attention bias) comes with what to do."""
    import onnxruntime as ort

    _, folder = engines["llama"]
    engine = Engine(folder, provider="cpu")
    messages = {"portable": "Non-zero status code returned while running GroupQueryAttention node. Status "
                            "Message: attention_bias is not supported in GroupQueryAttention cuda kernel.",
                "other": "Non-zero status code returned while running MatMul node.\nmore detail"}
    for kind, message in messages.items():
        def fail(self, binding, message=message):
            raise ort.capi.onnxruntime_pybind11_state.Fail(message)

        monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", fail)
        with pytest.raises(StreamspecError) as raised:
            engine.generate([5, 6, 7], max_new_tokens=4)
        text = str(raised.value)
        assert "\n" not in text
        if kind == "portable":
            assert "--attention custom" in text and "newer onnxruntime-gpu" in text
        else:
            assert text == "onnxruntime failed to run the step (Non-zero status code returned while running MatMul node.)."


def test_runtime_imports_neither_torch_nor_transformers(engines):
    _, folder = engines["llama"]
    assert_runs_without_heavy_imports("import streamspec.runtime; from streamspec.runtime import Engine; "
                                      f"Engine({str(folder)!r}, provider='cpu').generate('ab', max_new_tokens=3)")


def test_generate_command(engines, capsys, monkeypatch):
    from streamspec.tools import cli

    # Only this command: the others are other people's and may be mid-change.
    monkeypatch.setattr(cli, "COMMANDS", {"generate": "generate"})
    main = cli.main

    _, folder = engines["llama"]
    assert main(["generate", str(folder), "--prompt", "Hello", "--max-new-tokens", "8", "--ar"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and "tokens/s" in captured.err
    assert main(["generate", str(folder), "--prompt", "Hello", "--temperature", "-1"]) == 1
    assert "temperature" in capsys.readouterr().err
    assert main(["generate", str(folder), "--prompt", "x" * 200, "--max-new-tokens", "10",
                 "--max-length", "64"]) == 1
    assert "maximum length" in capsys.readouterr().err


# ------------------------------------------------------------------------------ SmolLM2
@pytest.fixture(scope="session")
def smollm2_onnx(smollm2_dir, tmp_path_factory):
    """SmolLM2-135M-Instruct with the committed default streams (models/default: trained,
    with a drafting vocabulary), exported once per session with the pruning graphs."""
    from streamspec.models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(Path(__file__).resolve().parents[1] / "models" / "default", base=smollm2_dir)
    assert model.draft_vocab is not None
    return smollm2_dir, export_tiny(model, smollm2_dir, tmp_path_factory.mktemp("smol") / "onnx", max_length=256,
                                    pruning=True)


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers(smollm2_onnx):
    """Autoregressive, speculative, and speculative with pruning and prompt lookup."""
    from transformers import AutoTokenizer

    hf_folder, folder = smollm2_onnx
    engine = Engine(folder, provider="cpu", fallback=False)
    pruning = Engine(folder, provider="cpu", fallback=False, budget=8, prune=0.1, lookup=8)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_folder))
    prompts = ["The capital of France is", "def fibonacci(n):",
               [{"role": "user", "content": "Name three colours."}]]
    accepted = pruned = 0
    for prompt in prompts:
        ids = engine.prompt_ids(prompt)
        expected_ids = (tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
                        if isinstance(prompt, list) else tokenizer(prompt)["input_ids"])
        assert ids == list(expected_ids)
        reference, logits = hf_greedy(hf_folder, ids, 24)
        result = pruning.generate(prompt, max_new_tokens=24, ignore_eos=True)
        assert_tokens_match(result.token_ids, reference, logits)
        accepted += sum(result.stats.accepted)
        pruned += sum(result.stats.drafted_sizes) - sum(result.stats.tree_sizes)
        for speculative in (False, True):
            result = engine.generate(prompt, max_new_tokens=24, speculative=speculative, ignore_eos=True)
            assert_tokens_match(result.token_ids, reference, logits)
            accepted += sum(result.stats.accepted)
    assert accepted > 10 and pruned > 0  # the trained streams draft, and pruning drops some drafts
