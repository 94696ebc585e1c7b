"""Integration on the embedded SmolLM2-135M-Instruct: logits parity and exact speculation.

The streams are untrained (random stream embeddings, zero LoRA), so acceptance is low;
exactness must hold regardless.
"""

import pytest
import torch

from helpers import assert_tokens_match
from streamspec.models.attention import EagerAttention, causal_tree_mask
from streamspec.models.config import StreamConfig
from streamspec.models.loading import load_tokenizer
from streamspec.models.model import build_model
from streamspec.models.reference import ReferenceDecoder

PROMPTS = ["What does the Python function sorted() return?",
           "Write a haiku about the sea.",
           "Summarise: the os.path module implements useful functions on pathnames."]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ours = build_model(smollm2_dir, StreamConfig(num_streams=3, num_msa_layers=10))
    return hf, ours, load_tokenizer(smollm2_dir)


def chat_ids(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_dict=False)


def test_logits_match_transformers(smollm2):
    hf, ours, tokenizer = smollm2
    ids = torch.tensor([chat_ids(tokenizer, PROMPTS[0])])
    with torch.no_grad():
        reference = hf(ids).logits
        n = ids.shape[1]
        main = ours(ids, torch.arange(n)[None], EagerAttention(causal_tree_mask(n), 3)).main_logits
    assert ((main - reference).abs().max() / reference.abs().max()).item() <= 1e-4


def test_reference_decoder_equals_transformers_generate(smollm2):
    hf, ours, tokenizer = smollm2
    decoder = ReferenceDecoder(ours, max_length=512, budget=4, top_k=4)
    for text in PROMPTS:
        prompt = chat_ids(tokenizer, text)
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
        reference = out[0, len(prompt):].tolist()
        speculative = decoder.generate(prompt, 24)

        def logits(generated, prompt=prompt):
            with torch.no_grad():
                return hf(torch.tensor([prompt + generated])).logits[0, -1].numpy()

        assert_tokens_match(speculative.tokens, reference, logits)
