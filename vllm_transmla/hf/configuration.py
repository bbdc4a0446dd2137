"""Config classes of converted checkpoints: the source family's config plus the MLA shape.

One layout serves exact and compressed checkpoints. Per layer and token:

    q        = q_proj(x)                    [H, qk_nope_head_dim + qk_rope_head_dim]
    latent   = kv_a_proj_with_mqa(x)        [kv_lora_rank + qk_rope_head_dim] = [c_kv ; k_pe]
    k_nope,v = kv_b_proj(c_kv)              [H, qk_nope_head_dim], [H, v_head_dim]   (no bias)
    score_h  = (q_nope_h . k_nope_h + rope(q_pe_h) . rope(k_pe)) * softmax_scale

With per-head q/k norms (Qwen3, `mla_key_norm_heads` = the source's KV heads n), the queries and the
latent come from the source's normalized heads (convert/head_norm.py):

    q        = q_head_proj_h(q_norm(q_proj(x))_h)               per head, q_proj [H * head_dim, hidden]
    latent   = kv_a_proj_with_mqa(x) + kv_a_key_proj(k_norm(k_proj(x)))   k_proj [n * head_dim, hidden]

With G latent groups (`mla_latent_groups`), `latent` is G of those, one per group of H / G query heads, and
query head h reads group h // (H / G) (convert/groups.py).

Only `latent` is cached. RoPE acts on the qk_rope_head_dim dims split into `qk_rope_num_blocks`
equal blocks, each rotated like one head of that width (neox layout, or interleaved when
`rope_interleave`), with the source model's rope_parameters. Exact conversion uses one block per KV
head (every key dim keeps its rotation); compressed conversion uses one block of 64 dims.
"""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, MixtralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig


@dataclass
class MLAFields:
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    qk_rope_num_blocks: int = 1
    # Per-layer latent ranks (rank allocation); kv_lora_rank is then their maximum.
    kv_lora_ranks: list[int] | None = None
    # Selected-frequency rope layout: per layer, the source rotary frequency index of each rope pair
    # (rope dims p and p + qk_rope_head_dim / 2); qk_rope_num_blocks is then 1.
    qk_rope_pair_freqs: list[list[int]] | None = None
    q_lora_rank: int | None = None
    # The source model's logit scale (head_dim ** -0.5); None means DeepSeek's (nope + rope) ** -0.5.
    softmax_scale: float | None = None
    rope_interleave: bool = False
    mla_q_bias: bool = False
    mla_kv_a_bias: bool = False
    mla_o_bias: bool = False
    # Per-head q/k RMSNorm (Qwen3): the source's KV heads whose normalized keys feed the latent through
    # kv_a_key_proj (k_proj carries a bias when mla_kv_a_bias does); None: no such path.
    mla_key_norm_heads: int | None = None
    # Grouped latents (convert/groups.py): G latents per token and layer, kv_lora_rank + qk_rope_head_dim each;
    # query head h reads latent h // (num_attention_heads / G). kv_a_proj_with_mqa's rows are group-major.
    mla_latent_groups: int = 1
    # TPLA decode (convert/tpla.py): attention runs over this many slices of the latent, each with its own
    # softmax, and their outputs add up; in vLLM it must equal tensor_parallel_size (a rank caches one slice).
    # 1: ordinary MLA. Set at load time (vLLM `hf_overrides`), on checkpoints converted with --tpla-ready.
    mla_tpla_shards: int = 1
    # Provenance: source family/architecture, conversion mode and settings.
    transmla: dict | None = None


@dataclass(frozen=True)
class MLALayout:
    """The attention shape of an MLA checkpoint, read from either config dialect we serve: ours
    (`llama_mla`, ...) or the public TransMLA converter's (`model_type: deepseek_v3` with
    `LlamaMLAForCausalLM`, `attention_bias`, `qk_latent_layernorm`, interleaved rope)."""

    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    rope_blocks: int
    rope_interleave: bool
    softmax_scale: float
    q_bias: bool
    kv_a_bias: bool
    o_bias: bool
    latent_layernorm: bool
    q_lora_rank: int | None
    key_norm_heads: int | None = None  # per-head q/k norms: the source's KV heads (see mla_key_norm_heads)
    latent_groups: int = 1  # latents per token (see mla_latent_groups)
    tpla_shards: int = 1  # latent slices attended separately (see mla_tpla_shards)
    head_dim: int | None = None  # the source head_dim, with per-head norms (their width)
    rope_pair_freqs: tuple[int, ...] | None = None  # this layer's, in the selected-frequency layout
    source_rotary_dim: int | None = None  # the source head_dim, in the selected-frequency layout

    @property
    def rope_block_dim(self) -> int:
        """Width of one rope block: each block is rotated like a head of this many dims. In the
        selected-frequency layout, the source head_dim (its rotary gives every frequency)."""
        return self.source_rotary_dim or self.qk_rope_head_dim // self.rope_blocks


def layer_kv_lora_rank(config, layer_idx: int | None) -> int:
    """The latent rank of layer `layer_idx`: per-layer ranks when the checkpoint has them."""
    ranks = getattr(config, "kv_lora_ranks", None)
    if ranks and layer_idx is not None:
        if len(ranks) != config.num_hidden_layers:
            raise ValueError(f"kv_lora_ranks has {len(ranks)} entries for {config.num_hidden_layers} layers: "
                             f"the config is inconsistent; reconvert the checkpoint")
        return int(ranks[layer_idx])
    return config.kv_lora_rank


def mla_layout(config, layer_idx: int | None = None) -> MLALayout:
    """The MLA shape of layer `layer_idx` (layers differ only in kv_lora_rank, with per-layer ranks)."""
    ours = hasattr(config, "mla_q_bias")
    bias = bool(getattr(config, "attention_bias", False))
    nope, rope = config.qk_nope_head_dim, config.qk_rope_head_dim
    scale = getattr(config, "softmax_scale", None)
    key_norm_heads = getattr(config, "mla_key_norm_heads", None)
    return MLALayout(
        kv_lora_rank=layer_kv_lora_rank(config, layer_idx), qk_rope_head_dim=rope, qk_nope_head_dim=nope,
        v_head_dim=config.v_head_dim, rope_blocks=getattr(config, "qk_rope_num_blocks", 1),
        rope_interleave=bool(getattr(config, "rope_interleave", False)),
        softmax_scale=float(scale) if scale is not None else float(nope + rope) ** -0.5,
        q_bias=config.mla_q_bias if ours else bias, kv_a_bias=config.mla_kv_a_bias if ours else bias,
        o_bias=config.mla_o_bias if ours else False,
        latent_layernorm=bool(getattr(config, "qk_latent_layernorm", False)),
        q_lora_rank=_q_lora_rank(config, ours),
        key_norm_heads=key_norm_heads,
        latent_groups=latent_groups(config),
        tpla_shards=tpla_shards(config, layer_idx),
        head_dim=getattr(config, "head_dim", None) if key_norm_heads else None,
        **_pair_freqs(config, layer_idx),
    )


def _q_lora_rank(config, ours: bool) -> int | None:
    rank = getattr(config, "q_lora_rank", None)
    if rank and not ours:  # DeepSeek's low-rank queries put q_a_layernorm between the two projections
        raise NotImplementedError(f"q_lora_rank={rank} in the deepseek_v3 dialect (with q_a_layernorm) is not "
                                  f"supported: convert the source with vllm-transmla instead")
    return rank


def _pair_freqs(config, layer_idx: int | None) -> dict:
    freqs = getattr(config, "qk_rope_pair_freqs", None)
    if not freqs:
        return {}
    if len(freqs) != config.num_hidden_layers or any(len(f) * 2 != config.qk_rope_head_dim for f in freqs):
        raise ValueError("qk_rope_pair_freqs must list qk_rope_head_dim / 2 frequencies for every layer: the config "
                         "is inconsistent; reconvert the checkpoint")
    if any(not 0 <= f < config.head_dim // 2 for layer in freqs for f in layer):
        raise ValueError(f"qk_rope_pair_freqs must index the {config.head_dim // 2} source rotary frequencies: the "
                         f"config is inconsistent; reconvert the checkpoint")
    return {"source_rotary_dim": config.head_dim,
            "rope_pair_freqs": tuple(freqs[layer_idx]) if layer_idx is not None else None}


def block_rope_parameters(config) -> dict:
    """The source's rope parameters for one rope block (theta and scaling apply per block, so a block
    rotates with the source's frequencies); the block is fully rotary."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.pop("partial_rotary_factor", None)
    params.setdefault("rope_type", "default")
    return params


def mla_kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """Bytes of KV cache one token costs across all layers."""
    per_group = sum(layer_kv_lora_rank(config, i) + config.qk_rope_head_dim for i in range(config.num_hidden_layers))
    return latent_groups(config) * per_group * dtype_bytes


def latent_groups(config) -> int:
    """G, the latents per token and layer (mla_latent_groups; 1 for every other dialect)."""
    return int(getattr(config, "mla_latent_groups", 1) or 1)


def tpla_shards(config, layer_idx: int | None = None) -> int:
    """The latent slices TPLA attends separately (mla_tpla_shards; 1: ordinary MLA), checked against the shape."""
    shards = int(getattr(config, "mla_tpla_shards", 1) or 1)
    if shards == 1:
        return 1
    if shards < 1 or latent_groups(config) > 1:
        raise ValueError(f"mla_tpla_shards={shards} needs a single latent (mla_latent_groups=1) and a positive "
                         f"count: drop the override or use the grouped checkpoint as it is")
    rank = layer_kv_lora_rank(config, layer_idx)
    if rank % shards:
        raise ValueError(f"mla_tpla_shards={shards} does not divide kv_lora_rank={rank}: choose a shard count "
                         f"(tensor_parallel_size) that divides every layer's latent rank")
    return shards


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


@strict
class Qwen3MLAConfig(Qwen3Config, MLAFields):
    """Converted Qwen3 checkpoints (per-head q/k norms before the latent, mla_key_norm_heads)."""

    model_type = "qwen3_mla"


@strict
class Qwen3MoeMLAConfig(Qwen3MoeConfig, MLAFields):
    """Converted Qwen3-MoE checkpoints (Qwen3 attention as above; experts unchanged)."""

    model_type = "qwen3_moe_mla"


MLA_CONFIG_CLASSES = {c.model_type: c for c in (LlamaMLAConfig, Qwen2MLAConfig, MixtralMLAConfig, Qwen3MLAConfig,
                                                Qwen3MoeMLAConfig)}


# The public TransMLA converter writes model_type deepseek_v3 with these architectures; transformers alone
# would build its DeepseekV3ForCausalLM (an MoE layer with random experts, a fresh kv_a_layernorm).
PUBLIC_ARCHITECTURES = {"LlamaMLAForCausalLM": LlamaMLAConfig, "MixtralMLAForCausalLM": MixtralMLAConfig}


def is_public_dialect(config) -> bool:
    return getattr(config, "model_type", None) == "deepseek_v3" and any(
        a in PUBLIC_ARCHITECTURES for a in getattr(config, "architectures", None) or [])


def as_our_config(config):
    """`config` itself, or a public-converter (deepseek_v3) config restated as ours: same tensors, same
    math (interleaved rope, the (nope + rope) ** -0.5 scale folded into the queries, attention_bias for q
    and kv_a, kv_a_layernorm only with qk_latent_layernorm)."""
    if not is_public_dialect(config):
        return config
    arch = next(a for a in config.architectures if a in PUBLIC_ARCHITECTURES)
    config_cls = PUBLIC_ARCHITECTURES[arch]
    layout = mla_layout(config)
    # getattr, not to_dict: deepseek_v3 aliases some keys (num_local_experts is its n_routed_experts)
    known = (set(config_cls().to_dict()) | set(MLAFields.__dataclass_fields__)) - {
        "model_type", "architectures", "transformers_version", "auto_map"}
    ours = config_cls(**{k: getattr(config, k) for k in known if hasattr(config, k)})
    ours.update({"softmax_scale": layout.softmax_scale, "rope_interleave": layout.rope_interleave,
                 "mla_q_bias": layout.q_bias, "mla_kv_a_bias": layout.kv_a_bias, "mla_o_bias": False,
                 "qk_rope_num_blocks": 1, "qk_latent_layernorm": layout.latent_layernorm,
                 "transmla": {"mode": "public-converter", "source_model_type": "deepseek_v3"}})
    ours.architectures = [arch]
    return ours
