"""Qwen3's per-head q/k RMSNorm: the latent is built from the normalized keys (convert/head_norm.py).

Exactness for every family (exact and full-rank compressed, naive and absorbed) is in test_exact_conversion,
test_compressed_conversion and test_attention_paths, which run over every tiny model, Qwen3 ones included.
Here: why the order of norm and rotation matters, and every compressed option on the Qwen3 families.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from vllm_transmla.convert.pipeline import convert
from vllm_transmla.hf.modeling import set_absorbed
from vllm_transmla.validate import validate_converted_checkpoint


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(0)
    return torch.randint(3, 384, (2, 40))


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _rope_commuting_rotation(num_kv_heads: int, head_dim: int, seed: int = 0) -> torch.Tensor:
    """A random orthogonal T [n*d, n*d] that mixes the KV heads' components of each rotary frequency, the
    same way for both halves of the pair: it commutes with RoPE, as RoRoPE's rotation does."""
    gen = torch.Generator().manual_seed(seed)
    width, half = num_kv_heads * head_dim, head_dim // 2
    t = torch.zeros(width, width, dtype=torch.float64)
    for i in range(half):
        q, _ = torch.linalg.qr(torch.randn(num_kv_heads, num_kv_heads, generator=gen, dtype=torch.float64))
        for offset in (i, i + half):  # x and y halves of rotary pair i
            rows = [j * head_dim + offset for j in range(num_kv_heads)]
            t[torch.tensor(rows)[:, None], torch.tensor(rows)[None, :]] = q
    return t


def _rotate_before_norm(model, rotation: torch.Tensor) -> None:
    """What the public converter does: fold the key rotation into k_proj, so k_norm acts on rotated "heads":
    latent = kv_a_key_proj T^T k_norm(T W_k x) instead of kv_a_key_proj k_norm(W_k x). Without the norm the
    two are the same (T is orthogonal)."""
    t = rotation.float()
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.k_proj.weight.data = t @ attn.k_proj.weight.data
        if attn.k_proj.bias is not None:
            attn.k_proj.bias.data = t @ attn.k_proj.bias.data
        attn.kv_a_key_proj.weight.data = attn.kv_a_key_proj.weight.data @ t.T


def _without_key_norm(model) -> None:
    for layer in model.model.layers:
        layer.self_attn.k_norm.forward = lambda x: x


def test_rotating_after_the_norm_breaks_the_model(tiny_sources, exact_converted, tokens):
    """Negative control. Our order (norm, then the latent's rotation) keeps the source's logits; the public
    converter's (rotation folded into k_proj, the norm after it) changes them measurably; and with the norm
    taken out of both, the two orders agree again: the norm's place is the whole difference."""
    name = "qwen3"
    config = json.loads((tiny_sources[name] / "config.json").read_text())
    rotation = _rope_commuting_rotation(config["num_key_value_heads"], config["head_dim"])
    assert torch.allclose(rotation @ rotation.T, torch.eye(len(rotation), dtype=torch.float64), atol=1e-12)
    source = _logits(_load(tiny_sources[name]), tokens)
    ours, swapped = _load(exact_converted[name]), _load(exact_converted[name])
    _rotate_before_norm(swapped, rotation)
    assert (_logits(ours, tokens) - source).abs().max().item() < 1e-4
    broken = (_logits(swapped, tokens) - source).abs().max().item()
    assert broken > 0.05, broken
    _without_key_norm(ours)
    _without_key_norm(swapped)
    assert (_logits(ours, tokens) - _logits(swapped, tokens)).abs().max().item() < 1e-4


OPTIONS = {
    "freqfold 2": dict(freqfold=2),
    "select": dict(freqfold="select"),
    "auto": dict(freqfold="auto"),
    "per-layer ranks": dict(rank_allocation="measured"),
    "low-rank queries": dict(q_lora_rank=48),
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", ["qwen3", "qwen3-moe"])
def test_every_compressed_option_converts(name, option, tiny_sources, tokens, tmp_path):
    """Every layout and option of the other families at 50% of the cache: a valid checkpoint that loads with no
    missing or unexpected tensors, with naive and absorbed attention equal, closer to the source than the
    same option at 25% (the latent carries what it keeps)."""
    source = _logits(_load(tiny_sources[name]), tokens)
    errors = {}
    for ratio in (0.5, 0.25):
        dst = convert(tiny_sources[name], tmp_path / f"mla-{ratio}", kv_ratio=ratio, qk_rope_dim=16, calib_seq_len=64,
                      progress=False, **OPTIONS[option])
        validate_converted_checkpoint(dst)
        model, info = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        naive = _logits(model.eval(), tokens)
        set_absorbed(model)
        assert (naive - _logits(model, tokens)).abs().max().item() < 1e-4
        errors[ratio] = (naive - source).pow(2).mean().item()
    config = json.loads((dst / "config.json").read_text())
    assert config["mla_key_norm_heads"] == json.loads((tiny_sources[name] / "config.json").read_text())[
        "num_key_value_heads"]
    assert errors[0.5] < errors[0.25], errors
