"""Per-head q/k RMSNorm (Qwen3, Qwen3-MoE): the latent is built from the normalized keys.

The source computes, per KV head j and query head h (then RoPE on both):
    k_j = k_norm(W_k,j x + b_k,j)        q_h = q_norm(W_q,h x + b_q,h)
The norm rescales each source head by its own RMS, so it does not commute with the latent rotation,
which mixes heads; rotating after it as if it were not there breaks the model. It stays where it is,
before the down-projection, and the converted layer computes
    K      = k_norm(k_proj(x))                           [n*d]   the source's k_proj and k_norm
    latent = kv_a_proj_with_mqa(x) + kv_a_key_proj(K)    [R + D] values enter linearly through x
    q_h    = q_head_proj_h(q_norm(q_proj(x))_h)          [nope + rope] per query head
Only the latent is cached ([c_kv ; k_pe], as in every family); kv_b_proj and o_proj are unchanged.

exact.py and compress.py convert keys and queries that are linear in some input; here they get one:
z = [x ; K] (hidden + n*d wide) with keys = [0 | I] z and values = [W_v | 0] z, and the normalized
query heads with W_q = I. What they return splits back into the tensors above. Calibration takes its
statistics on the normalized keys and queries (calibration.py), so RoRoPE and the PCA see what is
cached. At full rank the conversion is exact.
"""

from __future__ import annotations

import torch

from .geometry import GQAShape
from .source import AttentionWeights


def linear_view(gqa: GQAShape, w: AttentionWeights) -> AttentionWeights:
    """The weights the converters see: q = I [H*d, H*d] on the normalized queries, k = [0 | I] and
    v = [W_v | 0] [n*d, hidden + n*d] on z = [x ; K]; only the value bias is left (the q and k biases act
    before their norms and stay in q_proj / k_proj)."""
    width, hidden = gqa.kv_width, gqa.hidden_size
    eye_q = torch.eye(gqa.num_heads * gqa.head_dim, dtype=w.q.dtype)
    k = torch.cat([w.k.new_zeros(width, hidden), torch.eye(width, dtype=w.k.dtype)], dim=1)
    v = torch.cat([w.v, w.v.new_zeros(width, width)], dim=1)
    return AttentionWeights(q=eye_q, k=k, v=v, o=w.o, v_bias=w.v_bias, o_bias=w.o_bias)


def head_norm_tensors(gqa: GQAShape, built: dict[str, torch.Tensor], w: AttentionWeights,
                      query_factors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The converters' output for `linear_view` weights -> the layer's tensors (see the module docstring).

    built: q_proj.weight [H*qk, H*d] (block diagonal: head h's block is its q_head_proj), kv_a_proj_with_mqa
    weight [R + D, hidden + n*d] (+ bias), kv_b_proj.weight. query_factors: q_a_proj / q_b_proj (+ bias) of
    the source q_proj, for low-rank queries; else the source q_proj is kept."""
    heads, d, hidden = gqa.num_heads, gqa.head_dim, gqa.hidden_size
    q_map = built["q_proj.weight"]
    qk = q_map.shape[0] // heads
    blocks = q_map.view(heads, qk, heads, d)
    kv_a = built["kv_a_proj_with_mqa.weight"]
    out = {
        "q_head_proj.weight": torch.stack([blocks[h, :, h] for h in range(heads)]).reshape(heads * qk, d),
        "kv_a_proj_with_mqa.weight": kv_a[:, :hidden],
        "kv_a_key_proj.weight": kv_a[:, hidden:],
        "kv_b_proj.weight": built["kv_b_proj.weight"],
        "k_proj.weight": w.k,
        "q_norm.weight": w.q_norm,
        "k_norm.weight": w.k_norm,
    }
    if "kv_a_proj_with_mqa.bias" in built:
        out["kv_a_proj_with_mqa.bias"] = built["kv_a_proj_with_mqa.bias"]
    if w.k_bias is not None:
        out["k_proj.bias"] = w.k_bias
    if query_factors:
        out.update(query_factors)
    else:
        out["q_proj.weight"] = w.q
        if w.q_bias is not None:
            out["q_proj.bias"] = w.q_bias
    dtype = built["kv_b_proj.weight"].dtype
    return {name: t.to(dtype).contiguous() for name, t in out.items()}


def normalize_heads(x: torch.Tensor, norm: torch.nn.Module, head_dim: int) -> torch.Tensor:
    """A per-head RMSNorm module applied to x [..., heads * head_dim] (same shape back)."""
    return norm(x.unflatten(-1, (-1, head_dim))).flatten(-2)
