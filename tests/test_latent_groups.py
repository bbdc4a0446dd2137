"""Grouped latents (`--latent-groups G`, convert/groups.py): each group of query heads gets a latent built only
from the KV heads it reads, so under tensor parallelism TP = G each rank caches one group's latent."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from vllm_transmla.convert.pipeline import convert, kv_bytes_per_token
from vllm_transmla.errors import TransMLAError
from vllm_transmla.hf.modeling import set_absorbed
from vllm_transmla.testing.tiny import build_tiny_model
from vllm_transmla.validate import validate_converted_checkpoint

# family -> (tiny model, overrides): every exact-test family with at least 2 KV heads
SOURCES = {
    "llama": ("llama-rope3", {}),
    "llama-bias-4kv": ("llama-mha", {}),
    "qwen2-bias": ("qwen2", {"num_key_value_heads": 2}),
    "mixtral": ("mixtral", {}),
    "qwen3": ("qwen3", {}),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("groups-src")
    return {name: build_tiny_model(kind, root / name, **extra) for name, (kind, extra) in SOURCES.items()}


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(0)
    return torch.randint(3, 384, (2, 40))


def _logits(path, tokens, absorb=False):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    set_absorbed(model, absorb)
    with torch.no_grad():
        return model(tokens).logits


def _config(path) -> dict:
    return json.loads((path / "config.json").read_text())


def _group_counts(source) -> list[int]:
    kv = _config(source)["num_key_value_heads"]
    return [g for g in range(2, kv + 1) if kv % g == 0]


@pytest.mark.parametrize("name", list(SOURCES))
def test_grouped_full_rank_equals_source(name, sources, tokens, tmp_path):
    """Exact and full-rank compressed grouped conversions compute the source's function (fp32, naive and
    absorbed), and cache what the source caches."""
    source = sources[name]
    reference = _logits(source, tokens)
    cfg = _config(source)
    for groups in _group_counts(source):
        width = cfg["num_key_value_heads"] // groups * cfg["head_dim"]  # one group's K (or V) width
        exact = convert(source, tmp_path / f"exact-{groups}", latent_groups=groups, progress=False)
        full = convert(source, tmp_path / f"full-{groups}", latent_groups=groups, kv_lora_rank=width,
                       qk_rope_dim=width, freqfold=1, calib_seq_len=64, progress=False)
        for dst in (exact, full):
            validate_converted_checkpoint(dst)
            assert _config(dst)["mla_latent_groups"] == groups
            for absorb in (False, True):
                assert (_logits(dst, tokens, absorb) - reference).abs().max().item() < 1e-4, (dst.name, absorb)
            assert kv_bytes_per_token(_config_obj(dst)) == kv_bytes_per_token(_config_obj(source))


def _config_obj(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def test_grouped_layout_and_cache(sources, tmp_path):
    """At 25% of the cache with G = 2: kv_a_proj_with_mqa has G * (R + D) group-major rows, the cache per token
    is G latents, and generation from the latent cache (transformers' DynamicCache, one "KV head" per group)
    equals the full forward's greedy tokens."""
    source = sources["llama"]
    dst = convert(source, tmp_path / "g2", latent_groups=2, kv_ratio=0.25, calib_seq_len=64, progress=False)
    cfg = _config(dst)
    rank, rope = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    per_group = 2 * (_config(source)["num_key_value_heads"] // 2) * cfg["head_dim"]  # one group's source K + V
    assert rank + rope == per_group // 4
    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    assert model.model.layers[0].self_attn.kv_a_proj_with_mqa.out_features == 2 * (rank + rope)
    assert kv_bytes_per_token(_config_obj(dst), 4) == 2 * (rank + rope) * 4 * cfg["num_hidden_layers"]
    prompt = torch.randint(3, 384, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=16, do_sample=False)
        ids = prompt
        for _ in range(16):  # no cache: the whole sequence every step
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, ids)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(latent_groups=3), r"--latent-groups 3 must divide num_key_value_heads=2.*use one of 1, 2"),
    (dict(latent_groups=0), r"--latent-groups 0 must be a positive whole number"),
    (dict(latent_groups=2, kv_ratio=0.5, freqfold="select"), r"--freqfold select is not supported with --latent"),
    (dict(latent_groups=2, kv_ratio=0.5, rank_allocation="measured"), r"rank-allocation measured is not supported"),
    (dict(latent_groups=2, kv_ratio=0.5, q_lora_rank=16), r"--q-lora-rank is not supported with --latent-groups"),
])
def test_bad_group_settings(kwargs, pattern, sources, tmp_path):
    with pytest.raises(TransMLAError, match=pattern):
        convert(sources["llama"], tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_latent_groups(sources, tmp_path, capsys):
    from vllm_transmla.cli import main

    assert main(["convert", str(sources["llama"]), str(tmp_path / "g"), "--latent-groups", "2", "--quiet"]) == 0
    assert "2 latent groups" in capsys.readouterr().out
