"""Attention shapes of a source (GQA) model and of the MLA model it converts to."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GQAShape:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    # Each query and key head is RMS-normalized before RoPE (Qwen3): the latent is built from the
    # normalized keys, and the queries are mapped after their norm (see head_norm.py).
    head_norms: bool = False

    @classmethod
    def from_config(cls, config, head_norms: bool = False) -> "GQAShape":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.hidden_size, config.num_attention_heads,
                   config.num_key_value_heads or config.num_attention_heads, head_dim, head_norms)

    @property
    def group_size(self) -> int:
        """Query heads per KV head; query head h reads KV head h // group_size (transformers' repeat_kv)."""
        return self.num_heads // self.num_kv_heads

    @property
    def kv_width(self) -> int:
        """Width of the concatenated K (or V) of all KV heads."""
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class MLAShape:
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    qk_rope_num_blocks: int
    kv_lora_ranks: tuple[int, ...] | None = None  # per layer; kv_lora_rank is then their maximum
    q_lora_rank: int | None = None  # low-rank queries (q_a_proj, q_b_proj)
    latent_groups: int = 1  # latents per token and layer, each kv_lora_rank + qk_rope_head_dim (groups.py)

    def config_fields(self) -> dict:
        fields = dict(kv_lora_rank=self.kv_lora_rank, qk_rope_head_dim=self.qk_rope_head_dim,
                      qk_nope_head_dim=self.qk_nope_head_dim, v_head_dim=self.v_head_dim,
                      qk_rope_num_blocks=self.qk_rope_num_blocks)
        if self.kv_lora_ranks is not None:
            fields["kv_lora_ranks"] = list(self.kv_lora_ranks)
        if self.q_lora_rank is not None:
            fields["q_lora_rank"] = self.q_lora_rank
        if self.latent_groups > 1:
            fields["mla_latent_groups"] = self.latent_groups
        return fields
