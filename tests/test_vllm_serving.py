"""vLLM serves converted checkpoints: same tokens as transformers, a latent KV cache, TP, preemption.

Every engine runs in a subprocess of its own (tests/vllm_worker.py); results are cached per module so
each engine starts once.
"""

from __future__ import annotations

import math

import pytest

from reference import check_logprobs_close, hf_greedy, run_vllm
from vllm_transmla.testing.tiny import TINY_MODELS

pytestmark = pytest.mark.slow
MAX_TOKENS = 32
KV_BUDGET = 4_000_000  # bytes


def _job(prompts, **extra):
    return dict(prompts=[list(p) for p in prompts], max_tokens=MAX_TOKENS, kv_cache_memory_bytes=KV_BUDGET, **extra)


def _vllm(path, prompts, **extra):
    key = (str(path), tuple(map(tuple, prompts)), tuple(sorted(extra.items())))
    if key not in _RESULTS:
        _RESULTS[key] = run_vllm({"model": str(path), **_job(prompts, **extra)})
    return _RESULTS[key]


_RESULTS: dict = {}


def _assert_same_greedy(reference, result, label):
    for i, (ref, out) in enumerate(zip(reference, result["outputs"])):
        assert out["token_ids"] == ref["token_ids"], f"{label}: prompt {i} differs"
        for step, (a, b) in enumerate(zip(ref["logprobs"], out["logprobs"])):
            token = str(ref["token_ids"][step])
            assert abs(a[token] - b[token]) < 2e-3, f"{label}: prompt {i} step {step} logprob {a[token]} vs {b[token]}"


def _latent_width(config) -> int:
    return config["kv_lora_rank"] + config["qk_rope_head_dim"]


def _assert_latent_cache(path, result, dtype_bytes=4):
    import json

    config = json.loads((path / "config.json").read_text())
    assert result["use_mla"] and result["num_kv_heads"] == 1
    assert result["head_size"] == _latent_width(config)
    ranks = config.get("kv_lora_ranks") or [config["kv_lora_rank"]] * config["num_hidden_layers"]
    per_token = sum(r + config["qk_rope_head_dim"] for r in ranks) * dtype_bytes  # each layer its own width
    tokens = result["num_gpu_blocks"] * result["block_size"]
    assert KV_BUDGET // per_token - result["block_size"] < tokens <= KV_BUDGET // per_token


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_converted_family_matches_original_fp32(name, tiny_sources, exact_converted, prompts):
    reference = hf_greedy(tiny_sources[name], prompts, MAX_TOKENS)
    result = _vllm(exact_converted[name], prompts)
    _assert_same_greedy(reference, result, name)
    _assert_latent_cache(exact_converted[name], result)


@pytest.mark.parametrize("name", ["mla-512+64", "mla-64+16", "qwen2-mla-48+16"])
def test_latent_widths_match_transformers_fp32(name, random_mla, prompts):
    reference = hf_greedy(random_mla[name], prompts, MAX_TOKENS)
    result = _vllm(random_mla[name], prompts)
    _assert_same_greedy(reference, result, name)
    _assert_latent_cache(random_mla[name], result)


def test_kv_capacity_grows_by_bytes_ratio(tiny_sources, random_mla, prompts):
    """Same KV budget: the original MHA-shaped model (2 x 4 heads x 32 = 256 values per token and layer)
    against a 64 + 16 latent (80): vLLM fits 256 / 80 = 3.2x the tokens."""
    original = _vllm(tiny_sources["llama-mha"], prompts)
    latent = _vllm(random_mla["mla-64+16"], prompts)
    assert not original["use_mla"] and latent["use_mla"]
    # Capacity in tokens, from vLLM's own KV-cache configuration (the two use different block sizes).
    tokens = {name: r["num_gpu_blocks"] * r["block_size"] for name, r in (("original", original), ("latent", latent))}
    for name, per_token in (("original", 256 * 4 * 2), ("latent", 80 * 4 * 2)):  # fp32, 2 layers
        block = (original if name == "original" else latent)["block_size"]
        assert KV_BUDGET // per_token - block < tokens[name] <= KV_BUDGET // per_token, (name, tokens)
    assert math.isclose(tokens["latent"] / tokens["original"], 256 / 80, rel_tol=0.05), tokens


@pytest.mark.parametrize("name", list(TINY_MODELS) + ["mla-512+64", "mla-64+16"])
def test_bf16_logprobs_close(name, tiny_sources, exact_converted, random_mla, prompts):
    """bf16 serving against the fp32 transformers reference (of the original model where there is one)."""
    source, served = ((tiny_sources[name], exact_converted[name]) if name in TINY_MODELS
                      else (random_mla[name], random_mla[name]))
    reference = hf_greedy(source, prompts, MAX_TOKENS)
    result = _vllm(served, prompts, dtype="bfloat16")
    check_logprobs_close(reference, result["outputs"], name)
    _assert_latent_cache(served, result, dtype_bytes=2)


def test_tensor_parallel_2_equals_1(exact_converted, prompts):
    single = _vllm(exact_converted["llama-mha"], prompts)
    double = run_vllm({"model": str(exact_converted["llama-mha"]), **_job(prompts, tp=2)},
                      env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    assert [o["token_ids"] for o in double["outputs"]] == [o["token_ids"] for o in single["outputs"]]


def test_preemption_keeps_outputs(tiny_sources, exact_converted, prompts):
    """A KV budget of a few blocks forces vLLM to preempt and recompute; greedy outputs do not change."""
    many = [p for p in prompts for _ in range(2)]
    max_tokens = 96
    reference = hf_greedy(tiny_sources["llama-rope3"], many[::2], max_tokens)
    latent_bytes_per_block = 128 * 4 * 2 * 16  # latent 128 x fp32 x 2 layers x 16 tokens
    result = run_vllm({"model": str(exact_converted["llama-rope3"]), "prompts": many, "max_tokens": max_tokens,
                       "kv_cache_memory_bytes": 14 * latent_bytes_per_block, "max_model_len": 128,
                       "block_size": 16})
    assert result["num_gpu_blocks"] * result["block_size"] < sum(len(p) + max_tokens for p in many)
    assert result["num_preemptions"] > 0
    for i, out in enumerate(result["outputs"]):
        assert out["token_ids"] == reference[i // 2]["token_ids"], f"prompt {i}"


def test_public_converter_layout_serves(tmp_path, prompts):
    """A checkpoint as the public TransMLA converter writes it (deepseek_v3 model_type, interleaved rope,
    Qwen2-style biases, 64 rope dims) serves with the outputs of its source GQA model."""
    from public_layout import to_public_layout
    from vllm_transmla.convert.pipeline import convert
    from vllm_transmla.testing.tiny import build_tiny_model

    source = build_tiny_model("qwen2", tmp_path / "src", hidden_size=128, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=64)
    ours = convert(source, tmp_path / "ours", progress=False)  # one KV head: one 64-dim rope block
    public = to_public_layout(ours, tmp_path / "public")
    reference = hf_greedy(source, prompts, MAX_TOKENS)
    result = run_vllm({"model": str(public), **_job(prompts)})
    _assert_same_greedy(reference, result, "public layout")
    assert result["use_mla"] and result["head_size"] == 64 + 64


@pytest.mark.parametrize("rank,rope,fold,q_rank", [(96, 32, 1, None), (16, 16, 2, None), (40, 24, "select", 48)])
def test_compressed_checkpoint_serves(rank, rope, fold, q_rank, tiny_sources, prompts, tmp_path):
    """Compressed checkpoints (the largest legal latent of the tiny Llama, 96 + 32, a small one, 16 + 16
    with FreqFold 2, and 40 + 24 in the selected-frequency layout, where every rope pair turns at its own
    source frequency, with rank-48 queries) serve in vLLM with the greedy tokens of the transformers
    compressed model."""
    from vllm_transmla.convert.pipeline import convert

    dst = convert(tiny_sources["llama-rope3"], tmp_path / "mla", kv_lora_rank=rank, qk_rope_dim=rope, freqfold=fold,
                  q_lora_rank=q_rank, calib_seq_len=64, progress=False)
    reference = hf_greedy(dst, prompts, MAX_TOKENS)
    result = run_vllm({"model": str(dst), **_job(prompts)})
    _assert_same_greedy(reference, result, f"compressed {rank}+{rope}")
    _assert_latent_cache(dst, result)


def test_per_layer_ranks_serve(prompts, tmp_path):
    """A checkpoint with per-layer latent ranks (measured allocation, FreqFold auto, on the trained reference
    model at 25% of the cache) serves with the transformers model's greedy tokens; vLLM sizes every
    layer's paged cache at its own width, so the tokens that fit follow the summed widths."""
    import json

    from vllm_transmla.convert.pipeline import convert
    from vllm_transmla.demo import reference_model

    dst = convert(reference_model(), tmp_path / "mla", kv_ratio=0.25, freqfold="auto", rank_allocation="measured",
                  progress=False)
    assert len(set(json.loads((dst / "config.json").read_text())["kv_lora_ranks"])) > 1
    reference = hf_greedy(dst, prompts, MAX_TOKENS)
    result = run_vllm({"model": str(dst), **_job(prompts)})
    _assert_same_greedy(reference, result, "per-layer ranks")
    _assert_latent_cache(dst, result)


@pytest.fixture(scope="module")
def qwen3_compressed(tiny_sources, tmp_path_factory):
    """Qwen3 and Qwen3-MoE (per-head q/k norms; 4 experts top-2, a dense first layer) at 25% of the cache."""
    from vllm_transmla.convert.pipeline import convert

    root = tmp_path_factory.mktemp("qwen3-25")
    return {name: convert(tiny_sources[name], root / name, kv_ratio=0.25, calib_seq_len=64, progress=False)
            for name in ("qwen3", "qwen3-moe")}


@pytest.mark.parametrize("name", ["qwen3", "qwen3-moe"])
def test_qwen3_compressed_serves(name, qwen3_compressed, prompts):
    """A 25% Qwen3 / Qwen3-MoE checkpoint in vLLM: transformers' greedy tokens on the same checkpoint in fp32,
    bf16 logprobs close to them, TP=2 the tokens of TP=1, and vLLM's KV cache the latent at both dtypes."""
    dst = qwen3_compressed[name]
    reference = hf_greedy(dst, prompts, MAX_TOKENS)
    fp32 = _vllm(dst, prompts)
    _assert_same_greedy(reference, fp32, f"{name} 25%")
    _assert_latent_cache(dst, fp32)
    bf16 = _vllm(dst, prompts, dtype="bfloat16")
    check_logprobs_close(reference, bf16["outputs"], f"{name} 25% bf16")
    _assert_latent_cache(dst, bf16, dtype_bytes=2)
    tp2 = run_vllm({"model": str(dst), **_job(prompts, tp=2)}, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    assert [o["token_ids"] for o in tp2["outputs"]] == [o["token_ids"] for o in fp32["outputs"]]


@pytest.fixture(scope="module")
def grouped_pair(tiny_sources, tmp_path_factory):
    """The tiny Llama (2 KV heads x 32: 128 values per token and layer) at half its cache two ways: two latent
    groups of 16 + 16, and one latent of 48 + 16 (the same total)."""
    from vllm_transmla.convert.pipeline import convert

    root, src = tmp_path_factory.mktemp("grouped"), tiny_sources["llama-rope3"]
    common = dict(qk_rope_dim=16, freqfold=2, calib_seq_len=64, progress=False)
    return (convert(src, root / "grouped", latent_groups=2, kv_lora_rank=16, **common),
            convert(src, root / "single", kv_lora_rank=48, **common))


def _tokens_that_fit(result) -> int:
    return result["num_gpu_blocks"] * result["block_size"]


def test_grouped_latents_serve_and_split_across_tp_ranks(grouped_pair, prompts):
    """A grouped checkpoint serves with transformers' greedy tokens at TP=1 (two paged latent caches per layer)
    and TP=2 (one per rank). At TP=2 vLLM's KV cache on each rank is one group's latent, R + D = 32 values per
    token and layer, so a rank fits twice the tokens of the single-latent checkpoint of the same total size,
    whose 64-value latent every rank replicates; at TP=1 the grouped one caches both groups (64 values)."""
    grouped, single = grouped_pair
    reference = hf_greedy(grouped, prompts, MAX_TOKENS)
    tp2_env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    runs = (("grouped", grouped, 1), ("grouped", grouped, 2), ("single", single, 2))
    results = {(name, tp): run_vllm({"model": str(path), **_job(prompts, tp=tp)}, env=tp2_env if tp == 2 else None)
               for name, path, tp in runs}
    for tp in (1, 2):
        _assert_same_greedy(reference, results["grouped", tp], f"grouped TP={tp}")
    assert results["grouped", 1]["head_size"] == results["grouped", 2]["head_size"] == 16 + 16
    assert results["single", 2]["head_size"] == 48 + 16
    layers, fp32 = 2, 4
    for (name, tp), result in results.items():
        per_rank = (16 + 16) * (2 // tp) if name == "grouped" else 48 + 16  # a rank's groups, or the whole latent
        per_token = per_rank * fp32 * layers  # bytes of KV cache one token costs on one rank
        assert KV_BUDGET // per_token - result["block_size"] < _tokens_that_fit(result) <= KV_BUDGET // per_token, (
            name, tp, _tokens_that_fit(result))
    assert _tokens_that_fit(results["grouped", 2]) == 2 * _tokens_that_fit(results["single", 2])


def test_tpla_slices_the_latent_across_tp_ranks(grouped_pair, prompts):
    """TPLA (`hf_overrides={"mla_tpla_shards": 2}` at TP=2) on the single-latent 48 + 16 checkpoint: vLLM's greedy
    tokens and logprobs are transformers' TPLA (the same slice-wise attention on one device, fp32), not MLA's,
    and each rank's paged cache holds its 24-dim slice plus the rope key: 40 values per token and layer, so a
    rank fits 64 / 40 = 1.6x the tokens of the replicated latent (the grouped test's TP=2 run of it)."""
    _, single = grouped_pair
    reference = hf_greedy(single, prompts, MAX_TOKENS, mla_tpla_shards=2)
    mla = hf_greedy(single, prompts, MAX_TOKENS)
    assert any(a["token_ids"] != b["token_ids"] for a, b in zip(reference, mla))  # TPLA is not MLA here
    result = run_vllm({"model": str(single), **_job(prompts, tp=2, hf_overrides={"mla_tpla_shards": 2})},
                      env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    _assert_same_greedy(reference, result, "TPLA TP=2")
    per_token = (48 // 2 + 16) * 4 * 2  # bytes one token costs on one rank: fp32, 2 layers
    # vLLM sizes its blocks from the layers' own cache specs (the config's head size stays the checkpoint's)
    assert KV_BUDGET // per_token - result["block_size"] < _tokens_that_fit(result) <= KV_BUDGET // per_token
