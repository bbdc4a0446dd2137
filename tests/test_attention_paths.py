"""Naive (expanded K/V) and absorbed (latent-space) MLA attention compute the same thing."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from vllm_transmla.hf.configuration import LlamaMLAConfig, Qwen2MLAConfig
from vllm_transmla.hf.modeling import LlamaMLAForCausalLM, Qwen2MLAForCausalLM, set_absorbed
from vllm_transmla.testing.tiny import TINY_MODELS

# Random MLA shapes of the compressed kind: nope > 0, a rope block of its own, low latent rank.
RANDOM_SHAPES = {
    "llama-1block": (LlamaMLAConfig, LlamaMLAForCausalLM, dict(kv_lora_rank=24, qk_rope_head_dim=8,
                     qk_nope_head_dim=16, v_head_dim=16, qk_rope_num_blocks=1)),
    "llama-interleaved": (LlamaMLAConfig, LlamaMLAForCausalLM, dict(kv_lora_rank=20, qk_rope_head_dim=16,
                          qk_nope_head_dim=12, v_head_dim=8, qk_rope_num_blocks=2, rope_interleave=True)),
    "qwen2-biases": (Qwen2MLAConfig, Qwen2MLAForCausalLM, dict(kv_lora_rank=16, qk_rope_head_dim=8,
                     qk_nope_head_dim=16, v_head_dim=16, mla_q_bias=True, mla_kv_a_bias=True)),
}


def _random_model(name):
    config_cls, model_cls, shape = RANDOM_SHAPES[name]
    torch.manual_seed(1)
    config = config_cls(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, head_dim=16, initializer_range=0.1,
                        softmax_scale=16 ** -0.5, **shape)
    return model_cls(config).eval()


def _both_paths(model, tokens):
    with torch.no_grad():
        set_absorbed(model, False)
        naive = model(tokens).logits
        set_absorbed(model, True)
        absorbed = model(tokens).logits
    return naive, absorbed


@pytest.mark.parametrize("name", list(RANDOM_SHAPES))
def test_paths_agree_random_mla(name):
    torch.manual_seed(0)
    naive, absorbed = _both_paths(_random_model(name), torch.randint(0, 128, (2, 40)))
    assert naive.abs().max() > 0.5
    assert (naive - absorbed).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_paths_agree_converted(name, exact_converted):
    model = AutoModelForCausalLM.from_pretrained(exact_converted[name]).eval()
    torch.manual_seed(0)
    naive, absorbed = _both_paths(model, torch.randint(3, 384, (2, 40)))
    assert (naive - absorbed).abs().max().item() < 1e-5


@pytest.mark.parametrize("absorb", [False, True])
def test_incremental_decoding_uses_latent_cache(absorb):
    """Decoding token by token from the latent cache reproduces the full forward; the cache holds only
    [c_kv ; k_pe] per token."""
    model = _random_model("llama-1block")
    set_absorbed(model, absorb)
    tokens = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        full = model(tokens).logits
        cache = DynamicCache(config=model.config)
        prefix = model(tokens[:, :12], past_key_values=cache, use_cache=True).logits
        steps = [model(tokens[:, i:i + 1], past_key_values=cache, use_cache=True).logits for i in range(12, 20)]
    stepped = torch.cat([prefix] + steps, dim=1)
    assert (stepped - full).abs().max().item() < 1e-5
    layer = cache.layers[0]
    assert layer.keys.shape == (2, 1, 20, model.config.kv_lora_rank)
    assert layer.values.shape == (2, 1, 20, model.config.qk_rope_head_dim)
