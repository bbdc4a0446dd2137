"""TPLA (convert/tpla.py, `mla_tpla_shards`): one latent sliced across tensor-parallel ranks, each slice attended
with its own softmax and the slices' outputs summed; `--tpla-ready` rotates the latent first."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from vllm_transmla.convert.pipeline import convert
from vllm_transmla.convert.tpla import hadamard, latent_rotation
from vllm_transmla.errors import TransMLAError
from vllm_transmla.hf.modeling import set_absorbed
from vllm_transmla.testing.tiny import build_tiny_model

FAMILIES = ["llama-rope3", "qwen2", "mixtral", "qwen3-bias"]  # biases on q / kv_a, MoE, per-head norms


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("tpla-src")
    return {name: build_tiny_model(name, root / name) for name in FAMILIES}


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(0)
    return torch.randint(3, 384, (2, 40))


def _model(path, **config):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **config).eval()


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("size", [1, 2, 16, 64])
def test_hadamard_is_orthogonal_and_flat(size):
    h = hadamard(size)
    assert torch.allclose(h @ h.T, torch.eye(size, dtype=h.dtype), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, size ** -0.5))


def test_rotation_for_other_ranks_is_orthogonal_and_deterministic():
    q = latent_rotation(24)
    assert torch.allclose(q @ q.T, torch.eye(24, dtype=q.dtype), atol=1e-12)
    assert torch.equal(q, latent_rotation(24))
    assert not torch.allclose(q.abs(), torch.full_like(q, 24 ** -0.5))  # not a Hadamard: none exists at 24 here


@pytest.mark.parametrize("name", FAMILIES)
def test_tpla_ready_keeps_the_function(name, sources, tokens, tmp_path):
    """The rotation changes what each latent dim holds, not what the model computes (fp32, naive and absorbed),
    and the latent really is rotated (kv_b_proj differs)."""
    from safetensors.torch import load_file

    common = dict(kv_lora_rank=32, qk_rope_dim=16, calib_seq_len=64, progress=False)
    plain = convert(sources[name], tmp_path / "plain", **common)
    ready = convert(sources[name], tmp_path / "ready", tpla_ready="hadamard", **common)
    assert json.loads((ready / "config.json").read_text())["transmla"]["tpla_transform"] == "hadamard"
    reference = _logits(_model(plain), tokens)
    model = _model(ready)
    for absorb in (False, True):
        set_absorbed(model, absorb)
        assert (_logits(model, tokens) - reference).abs().max().item() < 1e-4, absorb
    w_plain = load_file(next(plain.glob("*.safetensors")))["model.layers.0.self_attn.kv_b_proj.weight"]
    w_ready = load_file(next(ready.glob("*.safetensors")))["model.layers.0.self_attn.kv_b_proj.weight"]
    assert (w_plain - w_ready).abs().max() > 1e-2


def test_one_slice_is_mla_and_two_are_not(sources, tokens, tmp_path):
    """TPLA's slice-wise attention with one slice (TP = 1) is MLA exactly (against the naive path, which expands
    the latent instead); with two slices it is an approximation whose logits move, and both slices matter."""
    path = convert(sources["llama-rope3"], tmp_path / "c", kv_lora_rank=32, qk_rope_dim=16, calib_seq_len=64,
                   progress=False)
    mla = _model(path)
    attention = mla.model.layers[0].self_attn
    hidden = torch.randn(2, 12, mla.config.hidden_size)
    position_embeddings = mla.model.rotary_emb(hidden, torch.arange(12)[None].expand(2, -1))
    q_nope, q_pe, c_kv, k_pe = attention.project(hidden, position_embeddings)
    mask = torch.full((12, 12), float("-inf")).triu(1)[None, None].expand(2, 1, -1, -1)
    naive = attention._naive(q_nope, q_pe, c_kv, k_pe, mask)
    one = attention.tpla_slice(q_nope, q_pe, c_kv, k_pe, 0, 1, mask)
    assert (one - naive).abs().max().item() < 1e-5
    halves = [attention.tpla_slice(q_nope, q_pe, c_kv, k_pe, i, 2, mask) for i in range(2)]
    assert min(h.abs().max().item() for h in halves) > 1e-3
    assert (halves[0] + halves[1] - naive).abs().max().item() > 1e-3

    reference = _logits(mla, tokens)
    tpla = _model(path, mla_tpla_shards=2)
    assert all(layer.self_attn.layout.tpla_shards == 2 for layer in tpla.model.layers)
    assert (_logits(tpla, tokens) - reference).abs().max().item() > 1e-2
    same = _model(path, mla_tpla_shards=1)
    assert (_logits(same, tokens) - reference).abs().max().item() == 0


def test_bad_tpla_settings_are_refused(sources, tmp_path):
    path = convert(sources["llama-rope3"], tmp_path / "c", kv_lora_rank=30, qk_rope_dim=16, calib_seq_len=64,
                   progress=False)
    with pytest.raises(ValueError, match="mla_tpla_shards=4 does not divide kv_lora_rank=30"):
        _model(path, mla_tpla_shards=4)
    with pytest.raises(TransMLAError, match="--tpla-ready 'fourier' is not a known transform"):
        convert(sources["llama-rope3"], tmp_path / "x", kv_lora_rank=32, tpla_ready="fourier", progress=False)
    with pytest.raises(TransMLAError, match="grouped latents"):
        convert(sources["llama-rope3"], tmp_path / "y", latent_groups=2, tpla_ready="hadamard", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
