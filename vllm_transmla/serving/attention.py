"""The MLA attention module our vLLM models use (one for every family).

It does what DeepSeek's `MultiHeadLatentAttentionWrapper` cannot: q / kv_a biases (Qwen2), no
kv_a_layernorm, rope (neox or interleaved) on the rope dims in `qk_rope_num_blocks` blocks with the
source's rope parameters (llama3 scaling included), and the source's logit scale. Attention itself is
vLLM's `MLAAttention` over the paged latent cache, with our backend for any latent width.

TP: query heads are split across ranks (q_proj, kv_b_proj column-parallel, o_proj row-parallel); the
latent projection and cache are replicated, as vLLM does for DeepSeek. With G latent groups
(`mla_latent_groups`, convert/groups.py) TP must divide G: each rank holds G / TP groups, their query heads
and only their latents (kv_a_proj_with_mqa is split by rows, group-major), one vLLM MLAAttention - one paged
cache of R + D per token - per group.

TPLA (`mla_tpla_shards` = TP, an opt-in set with vLLM's `hf_overrides`; convert/tpla.py): one latent, sliced.
Every rank holds every query head (q_proj, o_proj and the latent projection replicated), computes the whole
latent, caches only its slice of R / TP dims and the rope key, attends over that with its own softmax, and the
ranks' outputs are summed (an all-reduce) before o_proj. An approximation of MLA (exact at TP = 1), the same
one hf/attention.py's `MLAAttention._tpla` computes on one device. Prefill is sliced the same way (the
TPLA paper keeps prefill full MLA, which needs every rank's slices of the cached context).

Per-head q/k norms (Qwen3, `mla_key_norm_heads`): q_proj is the source's (head_dim per head), then q_norm and
each head's q_head_proj (split with the heads); the latent adds kv_a_key_proj of k_norm(k_proj(x)), replicated
like kv_a_proj_with_mqa (see hf/configuration.py).
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.attention.mla_attention import MLAAttention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.models.utils import extract_layer_index
from vllm.model_executor.utils import set_weight_attrs

from ..hf.configuration import block_rope_parameters, mla_layout
from .backend import LatentMLABackend, LatentPrefillBackend


class LatentAttention(nn.Module):
    """hidden [T, hidden] -> [T, hidden] through a [c_kv ; k_pe] latent cache."""

    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "", **_unused):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        layout = mla_layout(config, extract_layer_index(prefix))
        self.tpla = layout.tpla_shards > 1
        if self.tpla and layout.tpla_shards != tp:
            raise ValueError(f"mla_tpla_shards={layout.tpla_shards} must equal tensor_parallel_size={tp}: each rank "
                             f"caches one slice of the latent; set both to the same number")
        if config.num_attention_heads % tp and not self.tpla:
            raise ValueError(f"num_attention_heads={config.num_attention_heads} is not divisible by "
                             f"tensor_parallel_size={tp}: choose a tensor_parallel_size that divides it")
        self.num_heads = config.num_attention_heads // (1 if self.tpla else tp)
        self.kv_lora_rank = layout.kv_lora_rank
        # what one rank caches of c_kv: all of it, or (TPLA) its slice
        self.cached_rank = layout.kv_lora_rank // tp if self.tpla else layout.kv_lora_rank
        self.qk_nope_head_dim = layout.qk_nope_head_dim
        self.qk_rope_head_dim = layout.qk_rope_head_dim
        self.v_head_dim = layout.v_head_dim
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        hidden = config.hidden_size
        self.q_lora_rank = layout.q_lora_rank
        self.key_norm_heads = layout.key_norm_heads
        self._init_queries(config, layout, quant_config, prefix)
        self.groups = layout.latent_groups
        if self.groups > 1 and self.groups % tp:
            raise ValueError(f"mla_latent_groups={self.groups} is not divisible by tensor_parallel_size={tp}: choose "
                             f"a tensor_parallel_size that divides it")
        self.local_groups = self.groups // tp if self.groups > 1 else 1
        latent = self.groups * (self.kv_lora_rank + self.qk_rope_head_dim)
        # One latent is replicated on every rank; grouped latents are split with their heads.
        latent_linear = ColumnParallelLinear if self.groups > 1 else ReplicatedLinear
        self.kv_a_proj_with_mqa = latent_linear(hidden, latent, bias=layout.kv_a_bias, quant_config=quant_config,
                                                prefix=f"{prefix}.kv_a_proj_with_mqa")
        if self.key_norm_heads:
            self._init_head_norms(config, layout, quant_config, prefix, latent_linear)
        self._init_up_and_output(config, layout, quant_config, prefix, tp)
        # Optional RMSNorm of c_kv before caching (public converter's qk_latent_layernorm / DeepSeek).
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=config.rms_norm_eps) if layout.latent_layernorm else None
        self.rotary_emb = get_rope(layout.rope_block_dim, max_position=config.max_position_embeddings,
                                   is_neox_style=not layout.rope_interleave,
                                   rope_parameters=block_rope_parameters(config))
        # Selected-frequency layout: the source's rotary (head_dim wide) gives every frequency; each rope
        # pair picks its own. Its [max_pos, D] (cos | sin) columns are picked once here: indexing them by a
        # Python list on every step cost ~0.3 ms a layer. Not persistent: it is not a checkpoint weight.
        pair_cos_sin = (select_pair_cos_sin(self.rotary_emb.cos_sin_cache, list(layout.rope_pair_freqs))
                        if layout.rope_pair_freqs is not None else None)
        self.register_buffer("pair_cos_sin", pair_cos_sin, persistent=False)
        self._init_latent_caches(layout, cache_config, quant_config, prefix)

    def _init_queries(self, config, layout, quant_config, prefix: str) -> None:
        """q_proj, or low-rank q_a_proj + q_b_proj (no norm between; see hf/attention.py): split by heads
        across ranks, or (TPLA) every head on every rank."""
        hidden, heads = config.hidden_size, config.num_attention_heads
        q_width = heads * (layout.head_dim if self.key_norm_heads else self.qk_head_dim)
        head_linear = ReplicatedLinear if self.tpla else ColumnParallelLinear
        if self.q_lora_rank:
            self.q_a_proj = ReplicatedLinear(hidden, self.q_lora_rank, bias=False, quant_config=quant_config,
                                             prefix=f"{prefix}.q_a_proj")
            self.q_b_proj = head_linear(self.q_lora_rank, q_width, bias=layout.q_bias,
                                        quant_config=quant_config, prefix=f"{prefix}.q_b_proj")
        else:
            self.q_proj = head_linear(hidden, q_width, bias=layout.q_bias, quant_config=quant_config,
                                      prefix=f"{prefix}.q_proj")

    def _init_up_and_output(self, config, layout, quant_config, prefix: str, tp: int) -> None:
        """kv_b_proj and o_proj: split by heads (o_proj row-parallel), or (TPLA) this rank's slice of kv_b_proj's
        latent columns and a replicated o_proj after the all-reduce of the slices' outputs."""
        hidden, heads = config.hidden_size, config.num_attention_heads
        kv_b_rows = heads * (self.qk_nope_head_dim + self.v_head_dim)
        if self.tpla:
            self.kv_b_proj = LatentSliceLinear(self.kv_lora_rank, kv_b_rows, tp)
            self.o_proj = ReplicatedLinear(heads * self.v_head_dim, hidden, bias=layout.o_bias,
                                           quant_config=quant_config, prefix=f"{prefix}.o_proj")
        else:
            self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank, kv_b_rows, bias=False,
                                                  quant_config=quant_config, prefix=f"{prefix}.kv_b_proj")
            self.o_proj = RowParallelLinear(heads * self.v_head_dim, hidden, bias=layout.o_bias,
                                            quant_config=quant_config, prefix=f"{prefix}.o_proj")

    def _init_latent_caches(self, layout, cache_config, quant_config, prefix: str) -> None:
        """vLLM's MLAAttention over the paged latent cache: one, or one per local latent group."""
        heads = self.num_heads // self.local_groups

        def latent_attention(kv_b_proj, name):
            return MLAAttention(
                num_heads=heads, scale=layout.softmax_scale, qk_nope_head_dim=self.qk_nope_head_dim,
                qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim, q_lora_rank=None,
                kv_lora_rank=self.cached_rank, kv_b_proj=kv_b_proj, cache_config=cache_config,
                quant_config=quant_config, prefix=f"{prefix}.{name}", attn_backend=LatentMLABackend,
                prefill_backend_cls=LatentPrefillBackend,
            )

        if self.local_groups == 1:
            self.mla_attn = latent_attention(self.kv_b_proj, "attn")
            return
        # one paged latent cache per group; each reads its own heads' rows of kv_b_proj
        views = [GroupRows(self.kv_b_proj, i, self.local_groups) for i in range(self.local_groups)]
        self.mla_attn_groups = nn.ModuleList(latent_attention(v, f"attn_group{i}") for i, v in enumerate(views))
        # vLLM's MLAAttention marks the kv_b_proj it is given so that the CPU platform keeps its weight
        # (instead of packing it for oneDNN and dropping it): here it was given the views.
        for flag, value in vars(views[0]).items():
            if flag.startswith("_cpu"):
                setattr(self.kv_b_proj, flag, value)

    def _init_head_norms(self, config, layout, quant_config, prefix: str, latent_linear) -> None:
        d, keys = layout.head_dim, layout.key_norm_heads * layout.head_dim
        self.q_norm = RMSNorm(d, eps=config.rms_norm_eps)
        self.q_head_proj = HeadwiseLinear(config.num_attention_heads, d, self.qk_head_dim, split=not self.tpla)
        self.k_proj = ReplicatedLinear(config.hidden_size, keys, bias=layout.kv_a_bias, quant_config=quant_config,
                                       prefix=f"{prefix}.k_proj")
        self.k_norm = RMSNorm(d, eps=config.rms_norm_eps)
        self.kv_a_key_proj = latent_linear(keys, self.groups * (self.kv_lora_rank + self.qk_rope_head_dim), bias=False,
                                           quant_config=quant_config, prefix=f"{prefix}.kv_a_key_proj")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.shape[0]
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_proj(hidden_states)[0])[0]
        else:
            q = self.q_proj(hidden_states)[0]
        latent = self.kv_a_proj_with_mqa(hidden_states)[0]
        if self.key_norm_heads:
            q = self.q_head_proj(self.q_norm(q.view(tokens * self.num_heads, -1)).view(tokens, self.num_heads, -1))
            keys = self.k_norm(self.k_proj(hidden_states)[0].view(tokens * self.key_norm_heads, -1))
            latent = latent + self.kv_a_key_proj(keys.view(tokens, -1))[0]
        q = q.view(tokens, self.num_heads, self.qk_head_dim)
        if self.tpla:  # this rank's slice of every head's output; their sum is MLA's output, approximately
            return self.o_proj(tensor_model_parallel_all_reduce(self._attend(self.mla_attn, positions, q, latent)))[0]
        if self.local_groups == 1:
            return self.o_proj(self._attend(self.mla_attn, positions, q, latent))[0]
        q, latent = q.view(tokens, self.local_groups, -1, self.qk_head_dim), latent.view(tokens, self.local_groups, -1)
        out = [self._attend(attn, positions, q[:, i], latent[:, i]) for i, attn in enumerate(self.mla_attn_groups)]
        return self.o_proj(torch.cat(out, dim=-1))[0]

    def _attend(self, attn, positions, q, latent) -> torch.Tensor:
        """q [T, h, nope + rope] and one latent [T, R + rope] through `attn` (a vLLM MLAAttention) -> [T, h * v]."""
        tokens, heads = q.shape[:2]
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = latent.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        if self.kv_a_layernorm is not None:
            c_kv = self.kv_a_layernorm(c_kv)
        if self.tpla:
            rank = get_tensor_model_parallel_rank()
            c_kv = c_kv[:, rank * self.cached_rank:(rank + 1) * self.cached_rank]
        if self.pair_cos_sin is not None:
            q_pe, k_pe = rotate_selected_pairs(self.pair_cos_sin, positions, q_pe, k_pe)
        else:
            q_pe, k_pe = rotate_rope_dims(self.rotary_emb, positions, q_pe, k_pe)
        q = torch.cat([q_nope, q_pe], dim=-1)
        return attn(q, c_kv.contiguous(), k_pe.reshape(tokens, 1, self.qk_rope_head_dim),
                    output_shape=(tokens, heads * self.v_head_dim))


class GroupRows(nn.Module):
    """Group `index`'s rows of this rank's kv_b_proj, for that group's vLLM MLAAttention: it reads `.weight`
    once the weights are loaded (W_UK / W_UV) and calls the module on the latent in prefill. No parameters of
    its own: the loaded kv_b_proj holds them."""

    quant_method = None  # unquantized: vLLM takes `.weight` as it is

    def __init__(self, kv_b_proj: nn.Module, index: int, groups: int):
        super().__init__()
        self._source = [kv_b_proj]  # a list, so the module is not registered twice
        self.index, self.groups = index, groups

    @property
    def weight(self) -> torch.Tensor:
        weight = self._source[0].weight
        rows = weight.shape[0] // self.groups
        return weight[self.index * rows:(self.index + 1) * rows]

    def forward(self, x: torch.Tensor):
        return torch.nn.functional.linear(x, self.weight), None


class LatentSliceLinear(nn.Module):
    """TPLA's kv_b_proj on one rank: the checkpoint's [H (nope + v), R] narrowed to this rank's R / tp columns,
    c_kv slice [T, R / tp] -> [T, H (nope + v)]. vLLM's MLAAttention reads `.weight` (W_UK / W_UV of the slice)
    and calls the module in prefill."""

    quant_method = None  # unquantized: vLLM takes `.weight` as it is

    def __init__(self, rank: int, rows: int, tp: int):
        super().__init__()
        self.columns = rank // tp
        self.weight = nn.Parameter(torch.empty(rows, self.columns), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": self._load})

    def _load(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        param.data.copy_(loaded.narrow(1, get_tensor_model_parallel_rank() * self.columns, self.columns))

    def forward(self, x: torch.Tensor):
        return torch.nn.functional.linear(x, self.weight), None


class HeadwiseLinear(nn.Module):
    """One linear map per query head, x [T, H / tp, d_in] -> [T, H / tp, d_out]; the checkpoint's weight
    [H * d_out, d_in] (head-major) is split by heads across TP ranks, as q_proj is (all of it on every rank
    unless `split`)."""

    def __init__(self, num_heads: int, in_features: int, out_features: int, split: bool = True):
        super().__init__()
        tp = get_tensor_model_parallel_world_size() if split else 1
        self.split, self.local_heads, self.out_features = split, num_heads // tp, out_features
        self.weight = nn.Parameter(torch.empty(self.local_heads * out_features, in_features), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": self._load})

    def _load(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        rows = self.local_heads * self.out_features
        param.data.copy_(loaded.narrow(0, get_tensor_model_parallel_rank() * rows if self.split else 0, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("thi,hoi->tho", x, self.weight.view(self.local_heads, self.out_features, -1))


def rotate_rope_dims(rotary_emb, positions: torch.Tensor, q_pe: torch.Tensor, k_pe: torch.Tensor):
    """RoPE on q_pe [T, H, D] and k_pe [T, D] (possibly non-contiguous slices), in blocks of the rotary
    embedding's head size. Goes through `forward_native` on contiguous 2-D tensors: vLLM 0.32's CPU
    rotary custom op is wrong for 3-D [T, H, D] and for non-contiguous inputs - what MLA slices are."""
    tokens, heads, width = q_pe.shape
    q_rot, k_rot = rotary_emb.forward_native(positions, q_pe.reshape(tokens, heads * width).contiguous(),
                                             k_pe.contiguous())
    return q_rot.view(tokens, heads, width), k_rot


def select_pair_cos_sin(cos_sin_cache: torch.Tensor, pair_freqs: list[int]) -> torch.Tensor:
    """The source rotary's cache [max_pos, head_dim] (cos | sin over head_dim / 2 frequencies) ->
    [max_pos, D] (cos | sin over the D / 2 rope pairs), pair p at source frequency pair_freqs[p]."""
    cos, sin = cos_sin_cache.chunk(2, dim=-1)
    return torch.cat([cos[:, pair_freqs], sin[:, pair_freqs]], dim=-1).contiguous()


def rotate_selected_pairs(pair_cos_sin: torch.Tensor, positions: torch.Tensor, q_pe: torch.Tensor,
                          k_pe: torch.Tensor):
    """Neox RoPE on q_pe [T, H, D] and k_pe [T, D] where rope pair p (dims p, p + D/2) turns at its own
    source frequency; pair_cos_sin [max_pos, D] is `select_pair_cos_sin`'s (cos | sin) per position."""
    cos_sin = pair_cos_sin.index_select(0, positions.flatten()).to(q_pe.dtype)
    cos, sin = cos_sin.chunk(2, dim=-1)  # [T, D / 2]

    def rotate(x, c, s):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    return rotate(q_pe, cos[:, None], sin[:, None]), rotate(k_pe, cos, sin)
