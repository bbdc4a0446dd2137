"""Grouped latents (`--latent-groups G`, as in GLA): the query heads are split into G groups, and each group
gets a latent of its own, built only from the KV heads its queries read.

For a GQA source this is natural: query head h reads KV head h // (H / n) only, so with G dividing n, group
g holds query heads [g H/G, (g+1) H/G) and KV heads [g n/G, (g+1) n/G), and no query head of one group ever
reads another group's keys or values. Each group is converted as a model of its own (the exact
construction, or RoRoPE + PCA inside the group at the per-group rank R), and the tensors are stacked:

    kv_a_proj_with_mqa [G * (R + D), hidden]     group-major rows: [c_kv ; k_pe] of group 0, then group 1...
    q_proj, kv_b_proj                            head-major, as before (each head's up-projection reads R dims:
                                                 its own group's c_kv)
    kv_a_key_proj (per-head norms) [G * (R + D), n * d]   group g's rows read only its KV heads' keys

The cache per token and layer is G * (R + D); under tensor parallelism with TP = G each rank holds one
group's latent and its query heads, as GQA holds its KV heads (vLLM splits kv_a_proj_with_mqa by rows).
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import TransMLAError
from .compress import LayerStats
from .geometry import GQAShape
from .source import AttentionWeights

# Tensors whose rows run over heads or groups in order: a group's rows are a contiguous block.
STACKED = ("q_proj.weight", "q_proj.bias", "q_head_proj.weight", "kv_b_proj.weight", "kv_a_proj_with_mqa.weight",
           "kv_a_proj_with_mqa.bias", "k_proj.weight", "k_proj.bias")
SHARED = ("q_norm.weight", "k_norm.weight")  # one per layer, the same for every group


def group_shape(gqa: GQAShape, groups: int) -> GQAShape:
    """The attention shape of one group; raises TransMLAError when `groups` does not split the KV heads."""
    if groups < 1 or gqa.num_kv_heads % groups:
        divisors = ", ".join(str(g) for g in range(1, gqa.num_kv_heads + 1) if gqa.num_kv_heads % g == 0)
        raise TransMLAError(f"--latent-groups {groups} must divide num_key_value_heads={gqa.num_kv_heads} (a group "
                            f"owns whole KV heads): use one of {divisors}")
    return dataclasses.replace(gqa, num_heads=gqa.num_heads // groups, num_kv_heads=gqa.num_kv_heads // groups)


def _rows(t: torch.Tensor | None, index: int, count: int) -> torch.Tensor | None:
    if t is None:
        return None
    size = t.shape[0] // count
    return t[index * size:(index + 1) * size]


def group_weights(w: AttentionWeights, groups: int, g: int) -> AttentionWeights:
    """Group g's slice of one layer's source weights: its query heads' q rows and o columns, its KV heads'
    k and v rows; norms shared."""
    o = w.o.T
    return AttentionWeights(q=_rows(w.q, g, groups), k=_rows(w.k, g, groups), v=_rows(w.v, g, groups),
                            o=_rows(o, g, groups).T, q_bias=_rows(w.q_bias, g, groups),
                            k_bias=_rows(w.k_bias, g, groups), v_bias=_rows(w.v_bias, g, groups), o_bias=w.o_bias,
                            q_norm=w.q_norm, k_norm=w.k_norm)


def group_stats(stats: LayerStats, groups: int, g: int) -> LayerStats:
    """Group g's calibration statistics: its KV heads' keys and values, its query heads' query moments."""
    width = stats.keys.shape[1] // groups
    cols = slice(g * width, (g + 1) * width)
    return LayerStats(key_cov=stats.key_cov[cols, cols], keys=stats.keys[:, cols], values=stats.values[:, cols],
                      query_cov=_rows(stats.query_cov, g, groups) if stats.query_cov is not None else None,
                      input_cov=stats.input_cov)


def merge_groups(per_group: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One layer's tensors from each group's (see the module docstring for the layout)."""
    first = per_group[0]
    out = {}
    for name in first:
        parts = [t[name] for t in per_group]
        if name in STACKED:
            out[name] = torch.cat(parts)
        elif name in SHARED:
            out[name] = parts[0]
        elif name == "kv_a_key_proj.weight":
            out[name] = torch.block_diag(*parts)  # group g's latent reads only its own KV heads' keys
        else:
            raise ValueError(f"no rule to merge {name} across latent groups")
    return out
