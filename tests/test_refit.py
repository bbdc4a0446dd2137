"""The closed-form refits of convert/refit.py: each head's value up-projection, then o_proj over all heads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from vllm_transmla.convert.pipeline import convert
from vllm_transmla.convert.refit import output_moments, refit_moments, refit_output_projection
from vllm_transmla.errors import TransMLAError
from vllm_transmla.evaluate import perplexity
from vllm_transmla.testing.tiny import build_tiny_model

REFERENCE = "vllm_transmla/data/reference_model"
HELD_OUT = "vllm_transmla/data/kjv_heldout.txt"


def test_output_refit_is_the_least_squares_solution():
    """O' minimises ||o O^T - v O'^T|| (the source attention output against the refit one) up to the small
    ridge, and leaves O as it is when the converted head outputs are the source's (full rank)."""
    torch.manual_seed(0)
    heads, d, hidden, tokens = 4, 8, 16, 2000
    o = torch.randn(2, tokens // 2, heads, d)
    v = o + 0.3 * torch.randn_like(o)  # converted heads: the source's plus an error
    o_proj = torch.randn(hidden, heads * d)
    refit = refit_output_projection(o_proj, output_moments(v, o), ridge=0.0)
    target = o.reshape(tokens, -1) @ o_proj.T
    lstsq = torch.linalg.lstsq(v.reshape(tokens, -1).double(), target.double()).solution.T
    assert torch.allclose(refit.double(), lstsq, atol=1e-4)
    error = lambda w: (v.reshape(tokens, -1) @ w.T - target).pow(2).sum()  # noqa: E731
    assert error(refit) < 0.9 * error(o_proj)
    same = refit_output_projection(o_proj, output_moments(o, o))
    assert torch.allclose(same, o_proj, atol=1e-5)


def test_value_refit_moments_are_the_per_head_sums():
    """sum z z^T and sum o z^T per head, against a float64 loop over tokens."""
    torch.manual_seed(0)
    z, o = torch.randn(2, 300, 3, 5), torch.randn(2, 300, 3, 4)
    zz, oz = refit_moments(z, o)
    assert zz.dtype == oz.dtype == torch.float64 and zz.shape == (3, 5, 5) and oz.shape == (3, 4, 5)
    z64, o64 = z.double().flatten(0, 1), o.double().flatten(0, 1)  # [N, H, .]
    for h in range(3):
        torch.testing.assert_close(zz[h], z64[:, h].T @ z64[:, h])
        torch.testing.assert_close(oz[h], o64[:, h].T @ z64[:, h])


def test_compressed_conversion_refits_o_proj_and_it_helps(tmp_path):
    """A compressed conversion writes its own o_proj (the exact one keeps the source's), and on the reference
    model at 25% of the cache the refit o_proj gives a lower held-out perplexity than the source's in the
    same checkpoint (51.4 against 57.5 when measured)."""
    dst = convert(REFERENCE, tmp_path / "c", kv_ratio=0.25, progress=False)
    exact = convert(REFERENCE, tmp_path / "e", progress=False)
    source = AutoModelForCausalLM.from_pretrained(REFERENCE, dtype=torch.float32).state_dict()
    name = "model.layers.0.self_attn.o_proj.weight"
    assert not torch.allclose(load_file(next(dst.glob("*.safetensors")))[name], source[name])
    assert torch.equal(load_file(next(exact.glob("*.safetensors")))[name], source[name])
    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    refit = perplexity(dst, HELD_OUT, model=model, max_tokens=4096)["perplexity"]
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.o_proj.weight.data = source[f"model.layers.{i}.self_attn.o_proj.weight"].clone()
    kept = perplexity(dst, HELD_OUT, model=model, max_tokens=4096)["perplexity"]
    assert refit < 0.95 * kept, (refit, kept)


def test_full_rank_conversion_keeps_o_proj(tmp_path):
    """At full rank the converted heads reproduce the source's outputs and the refit leaves o_proj alone."""
    src = build_tiny_model("llama-rope3", tmp_path / "src")
    cfg = AutoModelForCausalLM.from_pretrained(src).config
    width = cfg.num_key_value_heads * cfg.head_dim
    dst = convert(src, tmp_path / "full", kv_lora_rank=width, qk_rope_dim=width, freqfold=1, calib_seq_len=64,
                  progress=False)
    name = "model.layers.1.self_attn.o_proj.weight"
    written = load_file(next(dst.glob("*.safetensors")))[name]
    original = load_file(next(src.glob("*.safetensors")))[name]
    assert (written.float() - original.float()).abs().max() < 1e-4


def test_no_output_refit_keeps_the_source_o_proj(tmp_path):
    """`output_refit=False` (`--no-output-refit`) writes every layer's source o_proj and says so in the
    provenance; layer 0 is otherwise the refit conversion's (what it computes comes before the o_proj refit);
    exact mode refuses the flag, which would do nothing there."""
    kept = convert(REFERENCE, tmp_path / "kept", kv_ratio=0.25, output_refit=False, progress=False)
    refit = convert(REFERENCE, tmp_path / "refit", kv_ratio=0.25, progress=False)
    source = AutoModelForCausalLM.from_pretrained(REFERENCE, dtype=torch.float32).state_dict()
    kept_w, refit_w = (load_file(next(d.glob("*.safetensors"))) for d in (kept, refit))
    layers = {n.split(".")[2] for n in kept_w if ".self_attn." in n}
    for i in layers:
        name = f"model.layers.{i}.self_attn.o_proj.weight"
        assert torch.equal(kept_w[name].float(), source[name]), name
        assert not torch.allclose(refit_w[name].float(), source[name]), name
    for name in kept_w:
        if name.startswith("model.layers.0.") and "o_proj" not in name:
            assert torch.equal(kept_w[name], refit_w[name]), name
    assert json.loads((kept / "config.json").read_text())["transmla"]["output_refit"] is False
    assert "output_refit" not in json.loads((refit / "config.json").read_text())["transmla"]
    with pytest.raises(TransMLAError, match="--no-output-refit"):
        convert(REFERENCE, tmp_path / "exact", output_refit=False, progress=False)
