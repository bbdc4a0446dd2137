"""Exact GQA -> MLA conversion computes the same function as the source (transformers forward)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import vllm_transmla  # noqa: F401  (registers the MLA classes)
from vllm_transmla.convert.pipeline import kv_bytes_per_token
from vllm_transmla.testing.tiny import TINY_MODELS

SEQ_LEN = 48  # longer than llama-rope3's original_max_position_embeddings (16)


def _logits(path, tokens, **config_overrides):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **config_overrides).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(0)
    return torch.randint(3, 384, (3, SEQ_LEN))


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_converted_logits_equal_source(name, tiny_sources, exact_converted, tokens):
    reference = _logits(tiny_sources[name], tokens)
    converted = _logits(exact_converted[name], tokens)
    assert reference.abs().max() > 1.0  # the models are not degenerate
    assert (converted - reference).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_converted_checkpoint_layout(name, tiny_sources, exact_converted):
    dst = exact_converted[name]
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] in ("llama_mla", "qwen2_mla", "mixtral_mla", "qwen3_mla", "qwen3_moe_mla")
    assert config["model_type"] != "deepseek_v3"
    # No copied remote code: auto_map only names the two shims that import the installed package
    assert set(config["auto_map"].values()) == {f"configuration_transmla.{type_name}" for type_name in [
        config["auto_map"]["AutoConfig"].split(".")[1]]} | {f"modeling_transmla.{config['architectures'][0]}"}
    for shim in ("configuration_transmla.py", "modeling_transmla.py"):
        code = [line for line in (dst / shim).read_text().splitlines() if line and not line.startswith(('"', "for"))]
        assert len(code) == 1 and code[0].startswith("from vllm_transmla.hf."), code
    for key in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "qk_rope_num_blocks"):
        assert isinstance(config[key], int)
    assert config["transmla"]["mode"] == "exact"
    assert config["transmla"]["source_architectures"] == json.loads(
        (tiny_sources[name] / "config.json").read_text())["architectures"]
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) <= {p.name for p in dst.glob("*.safetensors")}
    assert (dst / "tokenizer.json").is_file() and (dst / "generation_config.json").is_file()
    # Exact mode keeps the cache size: the latent is the concatenated K and V.
    src_cfg, dst_cfg = AutoConfig.from_pretrained(tiny_sources[name]), AutoConfig.from_pretrained(dst)
    assert kv_bytes_per_token(dst_cfg) == kv_bytes_per_token(src_cfg)
    assert not any("v_proj" in n for n in index["weight_map"])
    # keys are projected only where the per-head norm needs them before the latent (Qwen3)
    assert any("k_proj" in n for n in index["weight_map"]) == name.startswith("qwen3")


def test_tied_embeddings_stay_tied(exact_converted):
    index = json.loads((exact_converted["llama-tied"] / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    model = AutoModelForCausalLM.from_pretrained(exact_converted["llama-tied"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_rope_scaling_matters(exact_converted, tiny_sources, tokens):
    """Negative control: the llama3 rope scaling is what makes the logits agree past 16 tokens."""
    wrong = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    reference = _logits(tiny_sources["llama-rope3"], tokens)
    converted = _logits(exact_converted["llama-rope3"], tokens, **wrong)
    assert (converted - reference).abs().max().item() > 1e-2


def test_greedy_generation_matches(tiny_sources, exact_converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exact_converted["llama-rope3"])
    ids = tok("And God said, Let there be", return_tensors="pt").input_ids
    outs = []
    for path in (tiny_sources["llama-rope3"], exact_converted["llama-rope3"]):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        outs.append(model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)[0].tolist())
    assert outs[0] == outs[1]


def test_source_dtype_kept(tmp_path):
    from vllm_transmla.convert.pipeline import convert
    from vllm_transmla.testing.tiny import build_tiny_model

    src = build_tiny_model("llama-tied", tmp_path / "src", dtype=torch.bfloat16)
    dst = convert(src, tmp_path / "dst", progress=False)
    from safetensors import safe_open

    shard = next(dst.glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_shard_writer_streams_valid_safetensors(tmp_path):
    """The streaming shard writer produces shards safetensors reads back bit for bit, in every dtype,
    split at the size limit, with an index that names every tensor's shard."""
    import json

    from safetensors.torch import load_file

    from vllm_transmla.checkpoint.safetensors_dir import INDEX_NAME, read_safetensors_header
    from vllm_transmla.checkpoint.writer import ShardWriter

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.f32": torch.randn(64, 33, generator=gen),
        "b.bf16": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
        "c.f16": torch.randn(3, generator=gen).half(),
        "d.i64": torch.arange(10),
        "e.bool": torch.tensor([True, False, True]),
        "f.empty": torch.zeros(0, 4),
        "g.noncontig": torch.randn(8, 6, generator=gen).T,
    }
    writer = ShardWriter(tmp_path, max_shard_bytes=4096)
    for name, t in tensors.items():
        writer.add(name, t)
    names = writer.finish()
    assert len(names) > 1 and not list(tmp_path.glob("*.spill")) and not list(tmp_path.glob("*.tmp"))
    index = json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"]
    loaded = {}
    for shard in names:
        read_safetensors_header(tmp_path / shard)  # our own integrity check passes too
        loaded.update(load_file(tmp_path / shard))
    assert set(loaded) == set(tensors) == set(index)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
