"""Compressed conversion: RoRoPE + FreqFold + balanced K/V joint PCA."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from vllm_transmla.convert.pipeline import convert
from vllm_transmla.errors import TransMLAError
from vllm_transmla.testing.tiny import TINY_MODELS


def _logits(path, tokens):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(0)
    return torch.randint(3, 384, (2, 48))


@pytest.mark.parametrize("fold", [1, "select"])
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_full_rank_reproduces_exact(name, fold, tiny_sources, exact_converted, tokens, tmp_path):
    """R = 2 * n_kv * head_dim - D with every key dim roped (D = n_kv * head_dim) and freqfold 1 or the
    selected-frequency layout: the rotation, weighting, balancing, PCA and query absorption are all exact,
    so logits equal the exact model's."""
    config = json.loads((tiny_sources[name] / "config.json").read_text())
    kv_width = config["num_key_value_heads"] * config["head_dim"]
    dst = convert(tiny_sources[name], tmp_path / "full", mode="compressed", kv_lora_rank=kv_width,
                  qk_rope_dim=kv_width, freqfold=fold, calib_seq_len=64, progress=False)
    exact, full = _logits(exact_converted[name], tokens), _logits(dst, tokens)
    assert (exact - full).abs().max().item() < 1e-3


def _make_low_rank(path, value_rank: int = 8):
    """Give a 2-KV-head source the structure compression should find: both KV heads share their keys
    (so one rope component per frequency carries all key information) and values have rank 8."""
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(1)
    for shard in sorted(path.glob("*.safetensors")):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if name.endswith("k_proj.weight"):
                half = t.shape[0] // 2
                t[half:] = t[:half]
            elif name.endswith("v_proj.weight"):
                a = torch.randn(t.shape[0], value_rank, generator=gen) * 0.3
                b = torch.randn(value_rank, t.shape[1], generator=gen) * 0.3
                tensors[name] = a @ b
        save_file(tensors, str(shard), metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["llama-rope3", "mixtral"])
def test_lossless_when_the_source_has_the_structure(name, tmp_path, tokens):
    """Latent 8 + 32 (31% of the 128-value cache): RoRoPE finds that the second KV head's keys repeat the
    first's and keeps all key information in 32 rope dims; the joint PCA finds the rank-8 values. The
    compressed model then equals the source; a compressed model of the unstructured source does not."""
    from vllm_transmla.testing.tiny import build_tiny_model

    structured = build_tiny_model(name, tmp_path / "src")
    _make_low_rank(structured)
    dst = convert(structured, tmp_path / "mla", kv_lora_rank=8, qk_rope_dim=32, freqfold=1, calib_seq_len=64,
                  progress=False)
    config = json.loads((dst / "config.json").read_text())
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"], config["qk_nope_head_dim"]) == (8, 32, 32)
    diff = (_logits(structured, tokens) - _logits(dst, tokens)).abs().max().item()
    assert diff < 1e-3, diff

    # The selected-frequency layout finds the same structure.
    select = convert(structured, tmp_path / "select", kv_lora_rank=8, qk_rope_dim=32, freqfold="select",
                     calib_seq_len=64, progress=False)
    assert json.loads((select / "config.json").read_text())["transmla"]["freqfold"] == "select"
    assert (_logits(structured, tokens) - _logits(select, tokens)).abs().max().item() < 1e-3

    plain = build_tiny_model(name, tmp_path / "plain")
    lossy = convert(plain, tmp_path / "lossy", kv_lora_rank=8, qk_rope_dim=32, freqfold=1, calib_seq_len=64,
                    progress=False)
    assert (_logits(plain, tokens) - _logits(lossy, tokens)).abs().max().item() > 100 * diff


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(kv_lora_rank=10_000), r"kv-lora-rank 10000 is out of range"),
    (dict(kv_lora_rank=32, qk_rope_dim=7), r"qk-rope-dim 7 must be a positive even"),
    (dict(kv_lora_rank=32, qk_rope_dim=48, freqfold=1), r"multiple of head_dim"),
    (dict(kv_lora_rank=32, qk_rope_dim=80), r"qk-rope-dim 80 is above num_kv_heads \* head_dim = 64"),
    (dict(kv_lora_rank=32, freqfold="often"), r"freqfold 'often' must be a whole number, 'select' or 'auto'"),
    (dict(kv_lora_rank=32, rank_allocation="greedy"), r"rank-allocation 'greedy'"),
    (dict(kv_lora_rank=32, qk_rope_dim=16, freqfold=3), r"freqfold 3"),
    (dict(kv_ratio=1.5), r"kv-ratio 1.5 must be in"),
    (dict(kv_lora_rank=32, calib_seq_len=100_000), r"calibration text has \d+ tokens"),
])
def test_bad_compression_settings(kwargs, pattern, tiny_sources, tmp_path):
    with pytest.raises(TransMLAError, match=pattern):
        convert(tiny_sources["llama-rope3"], tmp_path / "out", mode="compressed", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_calibration_runs_the_original_layers(name, tiny_sources):
    """Layer-by-layer calibration reproduces the original model's hidden states (transformers forward)."""
    from vllm_transmla.convert.calibration import LayerByLayer
    from vllm_transmla.convert.source import open_source

    torch.manual_seed(0)
    tokens = torch.randint(3, 384, (3, 40))
    runner = LayerByLayer(open_source(tiny_sources[name]), tokens, batch_size=2)
    model = AutoModelForCausalLM.from_pretrained(tiny_sources[name], dtype=torch.float32).eval()
    seen = {}
    attn = model.model.layers[0].self_attn
    # per-head q/k norms (Qwen3): the latent is built from the normalized keys, so those are the statistics
    key_module = attn.k_norm if hasattr(attn, "k_norm") else attn.k_proj
    key_module.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o))
    attn.v_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("v", o))
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states
    assert torch.allclose(runner.hidden, hidden[0], atol=1e-6)
    # The statistics are of the keys and values the attention really computes (after input_layernorm).
    stats = runner.stats(0)
    assert (stats.keys - seen["k"].reshape(stats.keys.shape)).abs().max().item() < 1e-5
    assert (stats.values - seen["v"].reshape(stats.values.shape)).abs().max().item() < 1e-5
    runner.advance(0)
    assert (runner.hidden - hidden[1]).abs().max().item() < 1e-4


def test_reference_model_is_committed_and_trained():
    """The embedded reference model: Llama GQA (n_kv = n_heads / 4, head_dim >= 32), under 25 MB, and
    trained (held-out perplexity far below the 2048 of a uniform guess)."""
    from vllm_transmla.demo import heldout_text, reference_model
    from vllm_transmla.evaluate import perplexity

    path = reference_model()
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] * 4 == config["num_attention_heads"] and config["head_dim"] >= 32
    assert sum(p.stat().st_size for p in path.iterdir()) < 25 * 2**20
    assert perplexity(path, heldout_text(), max_tokens=4096)["perplexity"] < 100


def test_allocate_ranks_is_the_exact_minimiser():
    """The knapsack returns the cheapest per-layer ranks with exactly the uniform total (brute force)."""
    import itertools

    from vllm_transmla.convert.compress import allocate_ranks, rank_grid

    gen = torch.Generator().manual_seed(3)
    grid = rank_grid(16, 64)
    errors = [{r: float(torch.rand(1, generator=gen)) / r for r in grid} for _ in range(4)]
    ranks = allocate_ranks(errors, total=64)
    assert sum(ranks) == 64
    feasible = [c for c in itertools.product(grid, repeat=4) if sum(c) == 64]
    best = min(sum(e[r] for e, r in zip(errors, c)) for c in feasible)
    assert abs(sum(e[r] for e, r in zip(errors, ranks)) - best) < 1e-12
    assert grid == sorted(set(grid)) and 16 in grid and all(r % 4 == 0 for r in grid)


def test_measured_ranks_and_freqfold_auto(tmp_path):
    """On the trained reference model at 25% of the cache: --freqfold auto picks the candidate with the
    least measured error, per-layer ranks keep the uniform total (same KV bytes) and lower the measured
    calibration error, and the checkpoint loads in transformers with per-layer latent widths."""
    from vllm_transmla.convert.pipeline import kv_bytes_per_token
    from vllm_transmla.demo import reference_model
    from vllm_transmla.evaluate import perplexity

    source = reference_model()
    uniform = convert(source, tmp_path / "uniform", kv_ratio=0.25, progress=False)
    tuned = convert(source, tmp_path / "tuned", kv_ratio=0.25, freqfold="auto", rank_allocation="measured",
                    progress=False)
    config = json.loads((tuned / "config.json").read_text())
    prov = config["transmla"]
    errors = prov["freqfold_auto_errors"]
    assert str(prov["freqfold"]) == min(errors, key=errors.get) and len(errors) > 1
    ranks = config["kv_lora_ranks"]
    assert len(ranks) == config["num_hidden_layers"] and len(set(ranks)) > 1
    assert sum(ranks) == prov["kv_lora_rank"] * len(ranks) and config["kv_lora_rank"] == max(ranks)
    assert prov["calibration_error"]["per_layer"] <= prov["calibration_error"]["uniform"]

    from transformers import AutoConfig

    assert kv_bytes_per_token(AutoConfig.from_pretrained(tuned)) == kv_bytes_per_token(
        AutoConfig.from_pretrained(uniform))
    model = AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32)
    widths = [layer.self_attn.kv_a_proj_with_mqa.out_features for layer in model.model.layers]
    assert widths == [r + config["qk_rope_head_dim"] for r in ranks]
    # Held-out perplexity is reported by benchmarks/quality; here only that the model is sane.
    assert perplexity(tuned, _heldout(), max_tokens=2048)["perplexity"] < 2 * perplexity(
        uniform, _heldout(), max_tokens=2048)["perplexity"]


def _heldout():
    from vllm_transmla.demo import heldout_text

    return heldout_text()


@pytest.mark.parametrize("name", ["llama-rope3", "qwen2", "qwen3-bias"])
def test_query_low_rank(name, tiny_sources, tokens, tmp_path):
    """--q-lora-rank factors the query projection: at full rank it is the same model; at a lower rank it
    loads with q_a_proj / q_b_proj of that width, and its error shrinks as the rank grows."""
    config = json.loads((tiny_sources[name] / "config.json").read_text())
    kw = dict(kv_lora_rank=40, qk_rope_dim=24, calib_seq_len=64, progress=False)
    plain = convert(tiny_sources[name], tmp_path / "plain", **kw)
    full = convert(tiny_sources[name], tmp_path / "full", q_lora_rank=config["hidden_size"], **kw)
    low = convert(tiny_sources[name], tmp_path / "low", q_lora_rank=24, **kw)
    reference = _logits(plain, tokens)
    assert (reference - _logits(full, tokens)).abs().max().item() < 1e-3
    index = json.loads((low / "model.safetensors.index.json").read_text())["weight_map"]
    attn_names = {n.split("self_attn.")[1] for n in index if n.startswith("model.layers.0.self_attn.")}
    assert {"q_a_proj.weight", "q_b_proj.weight"} <= attn_names and not any(n.startswith("q_proj") for n in attn_names)
    model, info = AutoModelForCausalLM.from_pretrained(low, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    attn = model.model.layers[0].self_attn
    assert attn.q_a_proj.out_features == 24 and not hasattr(attn, "q_proj")
    assert (attn.q_b_proj.bias is not None) == (name != "llama-rope3")
    # the error shrinks as the query rank grows
    mid = convert(tiny_sources[name], tmp_path / "mid", q_lora_rank=48, **kw)
    low_err = (reference - _logits(low, tokens)).abs().mean().item()
    mid_err = (reference - _logits(mid, tokens)).abs().mean().item()
    assert low_err > mid_err > 1e-4


def test_query_low_rank_out_of_range(tiny_sources, tmp_path):
    with pytest.raises(TransMLAError, match=r"q-lora-rank 100000 is out of range"):
        convert(tiny_sources["llama-rope3"], tmp_path / "out", q_lora_rank=100_000, progress=False)
    assert not (tmp_path / "out").exists()
