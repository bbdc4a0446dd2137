"""Exact GQA -> MLA: the same function with the same cache.

Latent per token = [V of all KV heads ; K of all KV heads]; the keys are the rope part, rotated in
one block per KV head, so every key dim keeps its original rotation. Query head h places its
weights in the rope block of its KV head (zeros elsewhere); the value up-projection is an identity
block that picks V of that KV head. No key dim goes through kv_b_proj (qk_nope_head_dim = 0), and
the softmax scale stays the source's head_dim ** -0.5.
"""

from __future__ import annotations

import torch

from .geometry import GQAShape, MLAShape


def exact_mla_shape(gqa: GQAShape) -> MLAShape:
    return MLAShape(kv_lora_rank=gqa.kv_width, qk_rope_head_dim=gqa.kv_width, qk_nope_head_dim=0,
                    v_head_dim=gqa.head_dim, qk_rope_num_blocks=gqa.num_kv_heads)


def _scatter_query_heads(w: torch.Tensor, gqa: GQAShape) -> torch.Tensor:
    """q rows [H * d, ...] -> [H * n_kv * d, ...]: head h's rows go to the block of its KV head."""
    d, tail = gqa.head_dim, w.shape[1:]
    out = w.new_zeros(gqa.num_heads, gqa.num_kv_heads, d, *tail)
    per_head = w.view(gqa.num_heads, d, *tail)
    for h in range(gqa.num_heads):
        out[h, h // gqa.group_size] = per_head[h]
    return out.reshape(gqa.num_heads * gqa.kv_width, *tail)


def value_up_projection(gqa: GQAShape, dtype: torch.dtype) -> torch.Tensor:
    """kv_b_proj [H * d, n_kv * d]: identity blocks, KV head j's block repeated for its query heads."""
    eye = torch.eye(gqa.kv_width, dtype=dtype).view(gqa.num_kv_heads, gqa.head_dim, gqa.kv_width)
    return eye.repeat_interleave(gqa.group_size, dim=0).reshape(gqa.num_heads * gqa.head_dim, gqa.kv_width)


def exact_attention(gqa: GQAShape, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    q_bias: torch.Tensor | None = None, k_bias: torch.Tensor | None = None,
                    v_bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """MLA weights of one layer from its GQA weights.

    q [H*d, hidden], k and v [n_kv*d, hidden], biases [rows] -> q_proj [H*n_kv*d, hidden],
    kv_a_proj_with_mqa [2*n_kv*d, hidden], kv_b_proj [H*d, n_kv*d] (+ q / kv_a biases when given).
    """
    out = {
        "q_proj.weight": _scatter_query_heads(q, gqa),
        "kv_a_proj_with_mqa.weight": torch.cat([v, k], dim=0),
        "kv_b_proj.weight": value_up_projection(gqa, q.dtype),
    }
    if q_bias is not None:
        out["q_proj.bias"] = _scatter_query_heads(q_bias, gqa)
    if k_bias is not None or v_bias is not None:
        zeros = torch.zeros(gqa.kv_width, dtype=q.dtype)
        out["kv_a_proj_with_mqa.bias"] = torch.cat([
            v_bias if v_bias is not None else zeros, k_bias if k_bias is not None else zeros
        ])
    return out
