"""The vLLM plugin: entry point, cheap re-entrant registration, MLA switch, rotary-trap immunity."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch


def test_entry_point_declared():
    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("transmla") == "vllm_transmla:register"


def test_register_is_lazy_and_reentrant():
    """In a fresh process: registering twice works, model classes are registered as strings and not
    imported, and our model_types switch vLLM's MLA path on."""
    code = r"""
import sys, pickle
import vllm_transmla
vllm_transmla.register(); vllm_transmla.register()
from vllm import ModelRegistry
from vllm.transformers_utils.model_arch_config_convertor import MODEL_ARCH_CONFIG_CONVERTORS as C
ours = {"LlamaMLAForCausalLM", "Qwen2MLAForCausalLM", "MixtralMLAForCausalLM"}
assert ours <= set(ModelRegistry.get_supported_archs())
assert "vllm_transmla.serving.models" not in sys.modules, "model classes imported at plugin load"
assert {C[t].__name__ for t in ("llama_mla", "qwen2_mla", "mixtral_mla")} == {"TransMLAArchConfigConvertor"}
pickle.loads(pickle.dumps(C["llama_mla"]))
from vllm_transmla.hf.configuration import LlamaMLAConfig
cfg = LlamaMLAConfig(num_attention_heads=4, hidden_size=64, kv_lora_rank=48, qk_rope_head_dim=16)
conv = C["llama_mla"](cfg, cfg)
assert conv.is_deepseek_mla() and conv.get_head_size() == 64
# the CPU platform's config hook is wrapped once (chunked prefill, prefix caching and block size kept for ours only)
from types import SimpleNamespace
from vllm.platforms import current_platform
from vllm_transmla.serving.plugin import _serves_with_our_backend
hook = type(current_platform).check_and_update_config.__func__
assert hook._transmla_cpu_defaults
inner = dict(zip(hook.__code__.co_freevars, (c.cell_contents for c in hook.__closure__)))["original"]
assert not getattr(inner, "_transmla_cpu_defaults", False), "wrapped twice"
assert _serves_with_our_backend(SimpleNamespace(architectures=["LlamaMLAForCausalLM"]))
assert not _serves_with_our_backend(SimpleNamespace(architectures=["DeepseekV3ForCausalLM"]))
print("OK")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("blocks,interleave", [(1, False), (2, False), (1, True)])
def test_rope_on_noncontiguous_slices_matches_transformers(blocks, interleave):
    """Our vLLM layers rotate slices of q and of the latent (3-D, non-contiguous) exactly as the
    transformers classes do, with llama3 scaling, whatever vLLM's CPU rotary op would do."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from vllm_transmla.hf.attention import apply_block_rope, rope_config
    from vllm_transmla.hf.configuration import LlamaMLAConfig
    from vllm_transmla.serving.attention import rotate_rope_dims
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    config = LlamaMLAConfig(hidden_size=64, num_attention_heads=4, kv_lora_rank=24, qk_rope_head_dim=32,
                            qk_nope_head_dim=8, qk_rope_num_blocks=blocks, rope_interleave=interleave,
                            rope_parameters=rope, max_position_embeddings=256)
    tokens, heads, width = 40, 4, 32
    q = torch.randn(tokens, heads, 8 + width)
    latent = torch.randn(tokens, 24 + width)
    q_pe, k_pe = q[..., 8:], latent[:, 24:]  # non-contiguous views, as in the model
    positions = torch.arange(tokens) + 3
    with set_current_vllm_config(VllmConfig()):
        vllm_rope = get_rope(width // blocks, max_position=256, is_neox_style=not interleave, rope_parameters=rope,
                             dtype=torch.float32)
    got_q, got_k = rotate_rope_dims(vllm_rope, positions, q_pe, k_pe)

    cos, sin = LlamaRotaryEmbedding(rope_config(config))(q, positions[None])
    want_q = apply_block_rope(q_pe[None], cos, sin, blocks, interleave)[0]
    want_k = apply_block_rope(k_pe[None, :, None], cos, sin, blocks, interleave)[0, :, 0]
    if interleave:  # transformers permutes interleaved pairs to neox order; compare dot products instead
        assert torch.allclose(torch.einsum("thd,sd->ths", got_q, got_k),
                              torch.einsum("thd,sd->ths", want_q, want_k), atol=1e-4)
    else:
        assert torch.allclose(got_q, want_q, atol=1e-5) and torch.allclose(got_k, want_k, atol=1e-5)


def test_selected_pair_rope_matches_transformers():
    """In the selected-frequency layout every rope pair turns at its own source frequency (repeats allowed):
    our vLLM layer's precomputed (cos | sin) columns rotate q and k as the transformers class does, with
    llama3 scaling."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from vllm_transmla.hf.attention import apply_block_rope, select_rope_pairs
    from vllm_transmla.serving.attention import rotate_selected_pairs, select_pair_cos_sin
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    source_dim, width, tokens, heads = 64, 16, 40, 4
    pair_freqs = [0, 3, 3, 7, 12, 20, 31, 31]  # width / 2 of the source's 32 frequencies
    q = torch.randn(tokens, heads, 8 + width)
    latent = torch.randn(tokens, 24 + width)
    q_pe, k_pe = q[..., 8:], latent[:, 24:]  # non-contiguous views, as in the model
    positions = torch.arange(tokens) * 5 + 3  # past original_max_position_embeddings: scaling matters
    with set_current_vllm_config(VllmConfig()):
        source_rope = get_rope(source_dim, max_position=256, is_neox_style=True, rope_parameters=rope,
                               dtype=torch.float32)
    got_q, got_k = rotate_selected_pairs(select_pair_cos_sin(source_rope.cos_sin_cache, pair_freqs), positions,
                                         q_pe, k_pe)

    source = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=source_dim, rope_parameters=rope,
                         max_position_embeddings=256)
    cos, sin = LlamaRotaryEmbedding(source)(q, positions[None])
    cos, sin = select_rope_pairs(cos, pair_freqs), select_rope_pairs(sin, pair_freqs)
    want_q = apply_block_rope(q_pe[None], cos, sin, 1)[0]
    want_k = apply_block_rope(k_pe[None, :, None], cos, sin, 1)[0, :, 0]
    assert torch.allclose(got_q, want_q, atol=1e-5) and torch.allclose(got_k, want_k, atol=1e-5)
    assert not torch.allclose(got_q, q_pe, atol=1e-2)  # it did rotate


def test_supported_vllm_versions_and_every_internal_we_use_exists():
    """The plugin refuses an unsupported vLLM in one line; every vLLM name it uses is in the installed vLLM
    (`python -m vllm_transmla.serving.vllm_compat vllm-0.33.0-*.whl` checks a wheel the same way)."""
    from pathlib import Path

    import vllm

    from vllm_transmla.serving.vllm_compat import check_version, missing_names

    for ok in ("0.32.0+cpu", "0.32.1", "0.33.0"):
        check_version(ok)
    for bad in ("0.31.2", "0.34.0", "1.0.0"):
        with pytest.raises(RuntimeError, match=rf"supports vLLM 0.32 to 0.33, not {bad}: install"):
            check_version(bad)
    assert missing_names(Path(vllm.__file__).parents[1]) == []


ENGINE_CONFIG_CHECK = r"""
import logging, sys
from vllm.engine.arg_utils import EngineArgs
from vllm_transmla.errors import TransMLAError
model = sys.argv[1]
try:
    EngineArgs(model=model, tensor_parallel_size=4).create_engine_config()
    print("TP4 ACCEPTED")
except TransMLAError as err:
    print("TP4 REFUSED:", err)
try:
    EngineArgs(model=model, tensor_parallel_size=2, hf_overrides={"mla_tpla_shards": 4}).create_engine_config()
    print("TPLA ACCEPTED")
except TransMLAError as err:
    print("TPLA REFUSED:", err)
cfg = EngineArgs(model=model).create_engine_config()
print("DEFAULTS", cfg.scheduler_config.enable_chunked_prefill, cfg.cache_config.enable_prefix_caching,
      cfg.cache_config.block_size)
"""


@pytest.mark.slow
def test_engine_config_refuses_a_tp_size_that_does_not_divide_the_heads_and_says_what_it_restored(tmp_path):
    """vLLM's own config creation (what `vllm serve` and `LLM()` run before any weights load): a 6-head
    model at --tensor-parallel-size 4 is refused by our one-line error (not vLLM's pydantic report after
    start-up), so are TPLA slices that are not one per rank, and on CPU the plugin logs the chunked prefill,
    prefix caching and block size it put back."""
    from vllm_transmla.cli import main as cli_main
    from vllm_transmla.testing.tiny import build_tiny_model

    src = build_tiny_model("llama-rope3", tmp_path / "src", num_attention_heads=6, hidden_size=96)
    assert cli_main(["convert", str(src), str(tmp_path / "mla"), "--quiet"]) == 0
    proc = subprocess.run([sys.executable, "-c", ENGINE_CONFIG_CHECK, str(tmp_path / "mla")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("TP4 REFUSED: " + str(tmp_path / "mla") + " has 6 attention heads, which --tensor-parallel-size 4 "
            "does not divide: use one of 1, 2, 3, 6") in proc.stdout
    assert ("TPLA REFUSED: mla_tpla_shards=4 must equal --tensor-parallel-size 2: each rank caches one slice of "
            "the latent; set both to the same number") in proc.stdout
    assert "DEFAULTS True True 128" in proc.stdout
    assert ("vllm-transmla: our MLA backend serves LlamaMLAForCausalLM on CPU with chunked prefill on, prefix "
            "caching on and 128-token blocks") in proc.stdout + proc.stderr
