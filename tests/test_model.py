"""The decoder matches transformers, and the MSA layers follow docs/design.md's attention rule."""

import pytest
import torch

from streamspec.models.attention import EagerAttention, causal_tree_mask
from streamspec.models.config import ModelConfig, StreamConfig
from streamspec.models.errors import StreamspecError
from streamspec.models.model import Transformer, load_base_weights
from streamspec.runtime.tree import Tree
from tiny_models import VOCAB, hf_configs, tiny_hf_model

FAMILIES = list(hf_configs())


def ours(hf, streams=None, seed=1) -> Transformer:
    model = Transformer(ModelConfig.from_hf(hf.config), streams)
    load_base_weights(model, hf.state_dict())
    if streams is not None:  # non-zero adapters, as after training
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.trainable_parameters().values():
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def run_chain(model, ids, with_streams=True):
    n = ids.shape[1]
    attention = EagerAttention(causal_tree_mask(n), model.num_streams if with_streams else 0)
    return model(ids, torch.arange(n)[None], attention, with_streams=with_streams)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family):
    hf = tiny_hf_model(family)
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = hf(ids).logits
        base = run_chain(ours(hf), ids).main_logits
        msa = run_chain(ours(hf, StreamConfig(num_streams=3, num_msa_layers=2, lora_rank=4)), ids)
    scale = reference.abs().max()
    assert (base - reference).abs().max() / scale <= 1e-4
    # Lossless MSA: the main stream is the base model.
    assert (msa.main_logits - reference).abs().max() / scale <= 1e-4
    assert msa.stream_logits.shape == (1, 24, 3, VOCAB)
    assert msa.exit_logits.shape == (1, 24, VOCAB)


def test_unsupported_architecture_is_one_sentence():
    with pytest.raises(StreamspecError, match="Unsupported architecture 'gpt2'"):
        ModelConfig.from_hf({"model_type": "gpt2"})


def test_rope_settings_from_either_transformers_layout():
    """transformers 4 writes rope_theta + rope_scaling, transformers 5 one rope_parameters
    dict; a folder may carry both (models/loading.py adds the 4.x keys), and a 4.x reader
    then also sees the 5.x dict, which wins."""
    base = {"model_type": "llama", "vocab_size": 8, "hidden_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 32}
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    layouts = [
        ({"rope_theta": 5e5, "rope_scaling": None}, (5e5, None)),
        ({"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}, (5e5, None)),
        ({"rope_theta": 1e4, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}, (5e5, None)),
        ({"rope_theta": 5e5, "rope_scaling": llama3}, (5e5, llama3)),
        ({"rope_parameters": {"rope_theta": 5e5, **llama3}}, (5e5, llama3)),
    ]
    for keys, (theta, scaling) in layouts:
        config = ModelConfig.from_hf({**base, **keys})
        assert (config.rope_theta, config.rope_scaling) == (theta, scaling), keys
    with pytest.raises(StreamspecError, match="'dynamic' is not supported"):
        ModelConfig.from_hf({**base, "rope_parameters": {"rope_theta": 1e4, "rope_type": "dynamic", "factor": 2.0}})


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_stream_rule(family):
    """Stream j of row t sees main rows <= t and streams 1..j of row t, nothing else."""
    hf = tiny_hf_model(family)
    model = ours(hf, StreamConfig(num_streams=3, num_msa_layers=2, lora_rank=4))
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = run_chain(model, ids)
        changed = ids.clone()
        changed[0, 8] = (changed[0, 8] + 1) % VOCAB  # a later main row
        after = run_chain(model, changed)
        assert torch.equal(before.stream_logits[:, :8], after.stream_logits[:, :8])
        assert not torch.equal(before.stream_logits[:, 8:], after.stream_logits[:, 8:])
        # Stream 3's embedding influences stream 3 only: streams 1 and 2 never see it.
        model.stream_embed[2] += 1.0
        bumped = run_chain(model, ids)
        assert torch.equal(before.stream_logits[..., :2, :], bumped.stream_logits[..., :2, :])
        assert not torch.equal(before.stream_logits[..., 2, :], bumped.stream_logits[..., 2, :])
        assert torch.equal(before.main_logits, bumped.main_logits)


def test_keep_streams_keeps_the_first_streams_exactly():
    """Deploying 2 of 3 trained streams gives streams 1 and 2 exactly as before."""
    hf = tiny_hf_model("llama")
    model = ours(hf, StreamConfig(num_streams=3, num_msa_layers=2, lora_rank=4))
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = run_chain(model, ids)
        model.keep_streams(2)
        after = run_chain(model, ids)
    assert model.num_streams == 2 and after.stream_logits.shape[-2] == 2
    assert torch.allclose(before.stream_logits[..., :2, :], after.stream_logits, atol=1e-5)
    assert torch.equal(before.main_logits, after.main_logits)


@pytest.mark.parametrize("mode", ["lossless", "shared"])
def test_adapters_touch_main_rows_only_in_shared_mode(mode):
    hf = tiny_hf_model("llama")
    model = ours(hf, StreamConfig(num_streams=2, num_msa_layers=2, lora_rank=4, mode=mode))
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        with_lora = run_chain(model, ids).main_logits
        for name, p in model.trainable_parameters().items():
            if ".lora_B" in name:
                p.zero_()
        without = run_chain(model, ids).main_logits
    assert torch.equal(with_lora, without) == (mode == "lossless")


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_tree_step_equals_each_path_run_as_a_sequence(family):
    """A node's main and stream logits in a tree step = its root path run after the prefix."""
    hf = tiny_hf_model(family)
    model = ours(hf, StreamConfig(num_streams=2, num_msa_layers=2, lora_rank=4))
    gen = torch.Generator().manual_seed(11)
    prefix = torch.randint(0, VOCAB, (1, 9), generator=gen)
    tree = Tree(tokens=torch.randint(0, VOCAB, (7,), generator=gen).numpy(),
                parents=torch.tensor([-1, 0, 0, 1, 1, 2, 4]).numpy().astype("int32"),
                depths=torch.tensor([0, 1, 1, 2, 2, 2, 3]).numpy().astype("int32"),
                path_probs=torch.ones(7).numpy())
    from streamspec.models.attention import KVCache
    cfg = model.config
    cache = KVCache(cfg.num_layers, 1, cfg.num_kv_heads, 64, cfg.head_dim)
    with torch.no_grad():
        model(prefix, torch.arange(9)[None], EagerAttention(causal_tree_mask(9), 2, cache, 0))
        mask = torch.from_numpy(tree.ancestor_mask())[None]
        step = model(torch.from_numpy(tree.tokens)[None], torch.from_numpy(tree.positions(9))[None],
                     EagerAttention(mask, 2, cache, 9))
        for node in range(tree.size):
            path = [node]
            while tree.parents[path[-1]] >= 0:
                path.append(int(tree.parents[path[-1]]))
            seq = torch.cat([prefix, torch.from_numpy(tree.tokens[path[::-1]])[None]], dim=1)
            full = run_chain(model, seq)
            torch.testing.assert_close(step.main_logits[0, node], full.main_logits[0, -1],
                                       rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(step.stream_logits[0, node], full.stream_logits[0, -1],
                                       rtol=1e-4, atol=1e-4)
