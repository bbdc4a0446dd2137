"""Config classes of converted checkpoints: the source family's config plus the MLA shape.

One layout serves exact and compressed checkpoints. Per layer and token:

    q        = q_proj(x)                    [H, qk_nope_head_dim + qk_rope_head_dim]
    latent   = kv_a_proj_with_mqa(x)        [kv_lora_rank + qk_rope_head_dim] = [c_kv ; k_pe]
    k_nope,v = kv_b_proj(c_kv)              [H, qk_nope_head_dim], [H, v_head_dim]   (no bias)
    score_h  = (q_nope_h . k_nope_h + rope(q_pe_h) . rope(k_pe)) * softmax_scale

Only `latent` is cached. RoPE acts on the qk_rope_head_dim dims split into `qk_rope_num_blocks`
equal blocks, each rotated like one head of that width (neox layout, or interleaved when
`rope_interleave`), with the source model's rope_parameters. Exact conversion uses one block per KV
head (every key dim keeps its rotation); compressed conversion uses one block of 64 dims.
"""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, MixtralConfig, Qwen2Config


@dataclass
class MLAFields:
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    qk_rope_num_blocks: int = 1
    q_lora_rank: int | None = None
    # The source model's logit scale (head_dim ** -0.5); None means DeepSeek's (nope + rope) ** -0.5.
    softmax_scale: float | None = None
    rope_interleave: bool = False
    mla_q_bias: bool = False
    mla_kv_a_bias: bool = False
    mla_o_bias: bool = False
    # Provenance: source family/architecture, conversion mode and settings.
    transmla: dict | None = None


def mla_softmax_scale(config) -> float:
    if config.softmax_scale is not None:
        return float(config.softmax_scale)
    return float(config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5


def rope_block_dim(config) -> int:
    """Width of one rope block: each block is rotated like a head of this many dims."""
    return config.qk_rope_head_dim // config.qk_rope_num_blocks


def mla_kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """Bytes of KV cache one token costs across all layers."""
    return (config.kv_lora_rank + config.qk_rope_head_dim) * dtype_bytes * config.num_hidden_layers


@strict
class LlamaMLAConfig(LlamaConfig, MLAFields):
    """Converted Llama and Mistral checkpoints."""

    model_type = "llama_mla"


@strict
class Qwen2MLAConfig(Qwen2Config, MLAFields):
    """Converted Qwen2 / Qwen2.5 checkpoints (q and kv_a carry biases)."""

    model_type = "qwen2_mla"


@strict
class MixtralMLAConfig(MixtralConfig, MLAFields):
    """Converted Mixtral checkpoints (only attention changes)."""

    model_type = "mixtral_mla"


MLA_CONFIG_CLASSES = {c.model_type: c for c in (LlamaMLAConfig, Qwen2MLAConfig, MixtralMLAConfig)}
