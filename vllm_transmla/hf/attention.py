"""MLA attention for transformers: naive (expand the latent to per-head K/V) and absorbed (queries
moved into the latent space, as MLA decodes). Both read the same latent cache; see configuration.py
for the layout."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRMSNorm, eager_attention_forward

from .configuration import block_rope_parameters, mla_layout


def rope_config(config):
    """A copy of `config` whose rotary embedding has the width of one rope block (so the source's
    rope_parameters - theta, llama3/yarn/linear scaling - give the source's frequencies)."""
    cfg = copy.deepcopy(config)
    cfg.head_dim = mla_layout(config).rope_block_dim
    cfg.rope_parameters = block_rope_parameters(config)
    return cfg


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_block_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_blocks: int,
                     interleave: bool = False) -> torch.Tensor:
    """Rotate x [B, T, N, D] in `num_blocks` blocks of D / num_blocks dims; cos/sin [B, T, D / num_blocks]."""
    b, t, n, d = x.shape
    x = x.reshape(b, t, n * num_blocks, d // num_blocks)
    if interleave:  # DeepSeek order (pairs adjacent) -> neox order (pairs half a block apart)
        x = x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x = x * cos + _rotate_half(x) * sin
    return x.reshape(b, t, n, d)


def select_rope_pairs(t: torch.Tensor, pair_freqs: list[int]) -> torch.Tensor:
    """cos or sin of the source rotary [B, T, d] (neox: frequencies repeated twice) -> [B, T, D] for rope
    pairs with the given source frequency indices [D / 2]."""
    half = t[..., pair_freqs]
    return torch.cat([half, half], dim=-1)


class HeadwiseLinear(nn.Module):
    """One linear map per head: x [..., H, d_in] -> [..., H, d_out]; weight [H * d_out, d_in] (head-major)."""

    def __init__(self, num_heads: int, in_features: int, out_features: int):
        super().__init__()
        self.num_heads, self.out_features = num_heads, out_features
        self.weight = nn.Parameter(torch.empty(num_heads * out_features, in_features))
        nn.init.normal_(self.weight, std=in_features ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.view(self.num_heads, self.out_features, -1)
        return torch.einsum("...hi,hoi->...ho", x, w)


class MLAAttention(nn.Module):
    """Multi-head latent attention with a [c_kv ; k_pe] cache.

    Set `absorb=True` to compute in the latent space (no per-head K/V); the result is the same.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.layout = layout = mla_layout(config, layer_idx)
        self.num_heads = config.num_attention_heads
        self.kv_lora_rank = layout.kv_lora_rank
        self.qk_nope_head_dim = layout.qk_nope_head_dim
        self.qk_rope_head_dim = layout.qk_rope_head_dim
        self.v_head_dim = layout.v_head_dim
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.scaling = layout.softmax_scale
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.absorb = False

        hidden = config.hidden_size
        # With per-head norms q_proj is the source's (head_dim per head), then q_norm and q_head_proj.
        q_width = self.num_heads * (layout.head_dim if layout.key_norm_heads else self.qk_head_dim)
        if layout.q_lora_rank:  # low-rank queries: q_b_proj(q_a_proj(x)), no norm between (exact factorisation)
            self.q_a_proj = nn.Linear(hidden, layout.q_lora_rank, bias=False)
            self.q_b_proj = nn.Linear(layout.q_lora_rank, q_width, bias=layout.q_bias)
        else:
            self.q_proj = nn.Linear(hidden, q_width, bias=layout.q_bias)
        self.groups = layout.latent_groups
        if self.num_heads % self.groups:
            raise ValueError(f"mla_latent_groups={self.groups} does not divide num_attention_heads={self.num_heads}: "
                             f"the config is inconsistent; reconvert the checkpoint")
        latent = self.groups * (self.kv_lora_rank + self.qk_rope_head_dim)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, latent, bias=layout.kv_a_bias)
        if layout.key_norm_heads:  # Qwen3: the latent reads the normalized keys (see configuration.py)
            d = layout.head_dim
            self.q_norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
            self.q_head_proj = HeadwiseLinear(self.num_heads, d, self.qk_head_dim)
            self.k_proj = nn.Linear(hidden, layout.key_norm_heads * d, bias=layout.kv_a_bias)
            self.k_norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
            self.kv_a_key_proj = nn.Linear(layout.key_norm_heads * d, latent, bias=False)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, hidden, bias=layout.o_bias)
        if layout.latent_layernorm:  # DeepSeek's norm of c_kv before it is cached (checkpoints that ask for it)
            self.kv_a_layernorm = LlamaRMSNorm(self.kv_lora_rank, eps=config.rms_norm_eps)
        # A plain list, not a buffer: transformers builds models on the meta device.
        self.pair_freqs = list(layout.rope_pair_freqs) if layout.rope_pair_freqs is not None else None

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None,
                **kwargs):
        b, t, _ = hidden_states.shape
        q_nope, q_pe, c_kv, k_pe = self.project(hidden_states, position_embeddings, past_key_values)
        if self.layout.tpla_shards > 1:
            attend = self._tpla
        else:
            attend = self._absorbed if self.absorb else self._naive
        out = attend(q_nope, q_pe, c_kv, k_pe, attention_mask, **kwargs)  # [B, T, H, v]
        return self.o_proj(out.reshape(b, t, self.num_heads * self.v_head_dim)), None

    def project(self, hidden_states, position_embeddings, past_key_values=None):
        """hidden [B, T, hidden] -> q_nope [B, H, T, nope], roped q_pe [B, H, T, rope], and the cache:
        c_kv [B, G, S, R], roped k_pe [B, G, S, rope] (S = T plus what `past_key_values` held; G latent groups)."""
        b, t, _ = hidden_states.shape
        q = self.q_b_proj(self.q_a_proj(hidden_states)) if self.layout.q_lora_rank else self.q_proj(hidden_states)
        latent = self.kv_a_proj_with_mqa(hidden_states)
        if self.layout.key_norm_heads:
            q = self.q_head_proj(self.q_norm(q.view(b, t, self.num_heads, -1)))
            keys = self.k_norm(self.k_proj(hidden_states).view(b, t, self.layout.key_norm_heads, -1))
            latent = latent + self.kv_a_key_proj(keys.flatten(-2))
        q = q.view(b, t, self.num_heads, self.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent = latent.view(b, t, self.groups, -1)  # [B, T, G, R + rope]
        c_kv, k_pe = latent.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        if self.layout.latent_layernorm:
            c_kv = self.kv_a_layernorm(c_kv)
        cos, sin = position_embeddings
        if self.layout.rope_pair_freqs is not None:
            cos, sin = select_rope_pairs(cos, self.pair_freqs), select_rope_pairs(sin, self.pair_freqs)
        blocks, interleave = self.layout.rope_blocks, self.layout.rope_interleave
        q_pe = apply_block_rope(q_pe, cos, sin, blocks, interleave)
        k_pe = apply_block_rope(k_pe.contiguous(), cos, sin, blocks, interleave)

        # Cache layout [B, G, S, *]: "keys" hold c_kv, "values" hold the roped k_pe (one "KV head" per group).
        c_kv, k_pe = c_kv.transpose(1, 2), k_pe.transpose(1, 2)
        if past_key_values is not None:
            c_kv, k_pe = past_key_values.update(c_kv, k_pe, self.layer_idx)
        return q_nope.transpose(1, 2), q_pe.transpose(1, 2), c_kv, k_pe

    def _attention(self, query, key, value, mask, kv_groups, **kwargs):
        """The configured transformers attention function (sdpa, eager, ...) -> [B, T, H, Dv]."""
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        module = SimpleNamespace(num_key_value_groups=kv_groups, is_causal=True, training=self.training,
                                 layer_idx=self.layer_idx, config=self.config)
        out, _ = interface(module, query, key, value, mask, scaling=self.scaling,
                           dropout=self.attention_dropout if self.training else 0.0, **kwargs)
        return out

    def _naive(self, q_nope, q_pe, c_kv, k_pe, mask, **kwargs):
        """Expand the latent: per-head keys [k_nope ; k_pe] and values, then ordinary attention."""
        b, groups, s, _ = c_kv.shape
        per_group = self.num_heads // groups
        w = self.kv_b_proj.weight.view(groups, per_group, -1, self.kv_lora_rank)  # each head reads its group
        kv = torch.einsum("bgsr,ghor->bghso", c_kv, w).reshape(b, self.num_heads, s, -1)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_pe = k_pe.repeat_interleave(per_group, dim=1) if groups > 1 else k_pe.expand(b, self.num_heads, s, -1)
        k = torch.cat([k_nope, k_pe], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        return self._attention(q, k, v, mask, kv_groups=1, **kwargs)

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask, **kwargs):
        """Absorb W_UK into the queries and W_UV into the output: one shared latent "head" per group (MQA)."""
        return self.values_from_latent(self.latent_attention(q_nope, q_pe, c_kv, k_pe, mask, **kwargs))

    def _tpla(self, q_nope, q_pe, c_kv, k_pe, mask, **kwargs):
        """TPLA (convert/tpla.py): each of n contiguous slices of the latent is attended on its own, as one
        tensor-parallel rank does with the slice it caches, and the slices' outputs add up. A slice's score is
        its part of the latent score plus the whole rope score (the rope key is in every slice). One slice is
        exactly MLA."""
        shards = self.layout.tpla_shards
        return sum(self.tpla_slice(q_nope, q_pe, c_kv, k_pe, s, shards, mask, **kwargs) for s in range(shards))

    def tpla_slice(self, q_nope, q_pe, c_kv, k_pe, index: int, shards: int, mask=None, **kwargs) -> torch.Tensor:
        """Slice `index` of `shards`: q_nope [B, H, T, nope], q_pe [B, H, T, rope], c_kv [B, 1, S, R],
        k_pe [B, 1, S, rope] -> its part of the values [B, T, H, v]."""
        w_uk, w_uv = self._up_projections()
        width = self.kv_lora_rank // shards
        part = slice(index * width, (index + 1) * width)
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk[..., part])
        c_part = c_kv[..., part]
        q = torch.cat([q_latent, q_pe], dim=-1)
        k = torch.cat([c_part, k_pe], dim=-1)
        out = self._attention(q, k, c_part, mask, kv_groups=self.num_heads, **kwargs)  # [B, T, H, R / n]
        return torch.einsum("bthr,hdr->bthd", out, w_uv[..., part])

    def values_from_latent(self, out_latent: torch.Tensor) -> torch.Tensor:
        """Each head's attention-weighted latent [B, T, H, R] through its W_UV -> [B, T, H, v] (o_proj's input)."""
        return torch.einsum("bthr,hdr->bthd", out_latent, self._up_projections()[1])

    def latent_attention(self, q_nope, q_pe, c_kv, k_pe, mask=None, **kwargs) -> torch.Tensor:
        """Each head's attention-weighted mean of the cached latents, before W_UV: [B, T, H, R]."""
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, self._up_projections()[0])
        q = torch.cat([q_latent, q_pe], dim=-1)  # [B, H, T, R + rope]
        k = torch.cat([c_kv, k_pe], dim=-1)  # [B, G, S, R + rope]
        return self._attention(q, k, c_kv, mask, kv_groups=self.num_heads // c_kv.shape[1], **kwargs)

    def _up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, R] and W_UV [H, v, R], views of kv_b_proj.weight."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, -1)
        return w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
