"""The PyTorch reference decoder: greedy speculative == greedy autoregressive == transformers."""

import numpy as np
import pytest
import torch

from helpers import assert_tokens_match
from streamspec.models.config import ModelConfig, StreamConfig
from streamspec.models.errors import StreamspecError
from streamspec.models.model import Transformer, load_base_weights
from streamspec.models.reference import ReferenceDecoder
from tiny_models import VOCAB, tiny_hf_model


def hf_greedy(hf, prompt, max_new_tokens):
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                      do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def logits_after(hf, prompt):
    def fn(generated):
        with torch.no_grad():
            return hf(torch.tensor([prompt + generated])).logits[0, -1].numpy()
    return fn


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
@pytest.mark.parametrize("budget", [1, 6])
def test_speculative_equals_transformers_generate(family, budget):
    # Sharpened weights make the random model repeat itself, so drafts get accepted.
    hf = tiny_hf_model(family, sharpen=4.0)
    model = Transformer(ModelConfig.from_hf(hf.config),
                        StreamConfig(num_streams=3, num_msa_layers=2, lora_rank=4))
    load_base_weights(model, hf.state_dict())
    decoder = ReferenceDecoder(model, max_length=128, budget=budget, top_k=4)
    accepted = 0
    for seed in range(3):
        prompt = torch.randint(0, VOCAB, (8,), generator=torch.Generator().manual_seed(seed)).tolist()
        reference = hf_greedy(hf, prompt, 40)
        speculative = decoder.generate(prompt, 40)
        autoregressive = decoder.generate(prompt, 40, speculative=False)
        assert_tokens_match(speculative.tokens, reference, logits_after(hf, prompt))
        assert_tokens_match(autoregressive.tokens, reference, logits_after(hf, prompt))
        assert autoregressive.steps == 39  # one token per step after the prefill
        # Each step commits its accepted drafts plus one correction; the last may overshoot.
        committed = speculative.steps + sum(speculative.accepted)
        assert committed - speculative.accepted[-1] - 1 < 39 <= committed
        accepted += sum(speculative.accepted)
    # Untrained streams still guess some repeated tokens; the tree must use them exactly.
    assert accepted > 0


def test_eos_stops_generation():
    hf = tiny_hf_model("llama", sharpen=4.0)
    model = Transformer(ModelConfig.from_hf(hf.config), StreamConfig(num_streams=2, num_msa_layers=2))
    load_base_weights(model, hf.state_dict())
    decoder = ReferenceDecoder(model, max_length=128, budget=4)
    full = decoder.generate([1, 2, 3], 30).tokens
    eos = full[5]
    stopped = decoder.generate([1, 2, 3], 30, eos_ids=[eos]).tokens
    assert stopped == full[:full.index(eos) + 1]


def test_overlong_prompt_is_refused_before_generating():
    hf = tiny_hf_model("llama")
    model = Transformer(ModelConfig.from_hf(hf.config))
    load_base_weights(model, hf.state_dict())
    with pytest.raises(StreamspecError, match="do not fit"):
        ReferenceDecoder(model, max_length=32).generate(list(range(30)), 10)


def test_lookup_draft_and_branch_merge():
    from streamspec.runtime.tree import LOOKUP, STREAM, add_branch, build_tree, lookup_draft

    # The latest earlier occurrence of the longest suffix n-gram wins.
    assert lookup_draft([1, 2, 3, 9, 2, 3, 7, 5, 2, 3], 3) == [7, 5, 2]
    assert lookup_draft([4, 4], 2) == [4]  # a 1-gram match, cut at the history's end
    assert lookup_draft([1, 2, 3], 4) == []  # nothing repeats
    tree = build_tree(5, np.array([[7, 8], [9, 10]]), np.array([[0.6, 0.3], [0.5, 0.4]]), 3)
    merged = add_branch(tree, [7, 9, 11])  # shares 7 -> 9 with the stream drafts
    assert merged.tokens.tolist() == tree.tokens.tolist() + [11]
    assert merged.parents[-1] == 3 and merged.depths[-1] == 3
    assert [merged.source_of(i) for i in range(merged.size)] == [STREAM] * 4 + [LOOKUP]
    mask = merged.ancestor_mask()
    assert mask[-1].tolist() == [True, True, False, True, True]
