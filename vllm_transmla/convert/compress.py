"""Compressed GQA -> MLA for one layer: RoRoPE (selected frequencies or FreqFold), balanced K/V, one
error-weighted joint PCA.

Notation: d = head_dim, n = num_kv_heads, H = query heads, D = qk_rope_head_dim, R = kv_lora_rank.
Key coordinates of the source: head j, dim i; rotary pair i < d/2 is (i, i + d/2) (neox layout).

RoRoPE: per source frequency, a PCA over its n components (one per KV head), with the two halves of
every rotary pair as samples, gives an orthogonal U; applying the same U to both halves commutes with
RoPE because the frequency is shared. Two layouts put the top components into the D rope dims:
* "select" (default): the D/2 components with the most key energy over all frequencies keep RoPE, each
  at its own exact frequency (the config lists them per layer, `qk_rope_pair_freqs`);
* FreqFold F (the paper's): frequencies are grouped F at a time for the PCA (exact only for F = 1), and
  the D rope dims are B = max(1, D / d) blocks of D / B dims rotated like a head of that width (rope
  pair p of a block has source frequency c * p, c = d * B / D).
Everything else of the key becomes NoPE.

Balanced K/V + joint PCA: the PCA minimises the error that matters downstream, |dK W_K| and |dV W_V|
(W_K^2: second moment of the queries that read each key, W_V^2: o_proj's Gram per head; identity
without statistics, see `error_weights`). K_nope W_K is divided by ratio = mean|K_nope W_K| /
mean|V W_V| so neither dominates, then one PCA of [K_nope W_K / ratio ; V W_V] over the calibration
tokens gives the latent basis P (R columns): the latent is c = P^T [W_K K_nope / ratio ; W_V V],
kv_b_proj reconstructs K_nope = ratio W_K^-1 P_k c (then each head's NoPE key) and V = W_V^-1 P_v c,
and each query head absorbs the rope part of its key up-projection (q_pe_h = M_h,rope^T q_h). Biases
ride along linearly. With R = 2 n d - D, D = n d and F = 1 (or select) this is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TransMLAError
from .geometry import GQAShape

CHUNK = 4096  # calibration tokens per float64 block


SELECT = "select"  # the FreqFold value of the selected-frequency layout


@dataclass(frozen=True)
class RopePlan:
    """Where RoRoPE puts things: B blocks of `block_dim`, frequency step c, FreqFold F; or, with
    `select`, one block whose pairs each keep their own source frequency (per layer)."""

    blocks: int
    block_dim: int
    step: int  # c: rope pair p of a block has source frequency c * p
    freqfold: int
    select: bool = False

    @property
    def kept_per_group(self) -> int:
        return self.blocks * self.freqfold // self.step


def plan_rope(gqa: GQAShape, rope_dim: int, freqfold: int | str) -> RopePlan:
    d, n = gqa.head_dim, gqa.num_kv_heads
    if rope_dim <= 0 or rope_dim % 2:
        raise TransMLAError(f"--qk-rope-dim {rope_dim} must be a positive even number")
    if freqfold == SELECT:
        if rope_dim > n * d:
            raise TransMLAError(f"--qk-rope-dim {rope_dim} is above num_kv_heads * head_dim = {n * d}, the key dims "
                               f"that rotate: choose at most {n * d}")
        return RopePlan(1, rope_dim, 0, 1, select=True)
    if rope_dim <= d:
        blocks = 1
    elif rope_dim % d == 0 and rope_dim // d <= n:
        blocks = rope_dim // d
    else:
        raise TransMLAError(f"--qk-rope-dim {rope_dim}: above head_dim={d} it must be a multiple of head_dim "
                            f"up to num_kv_heads * head_dim = {n * d}")
    block_dim = rope_dim // blocks
    if d % block_dim:
        raise TransMLAError(f"--qk-rope-dim {rope_dim} must divide head_dim={d} (or be a multiple of it)")
    step = d // block_dim
    if freqfold % step or (d // 2) % freqfold:
        raise TransMLAError(f"--freqfold {freqfold} must be a multiple of head_dim / qk_rope_dim = {step} and "
                            f"divide head_dim / 2 = {d // 2}")
    return RopePlan(blocks, block_dim, step, freqfold)


def select_rotation(key_cov: torch.Tensor, gqa: GQAShape, rope_dim: int) -> tuple[torch.Tensor, list[int]]:
    """RoRoPE without folding, then a global choice: per source frequency i, a PCA over its n
    components (both halves of each pair as samples; exact, the frequency is shared); the D/2
    components with the most key energy over all frequencies keep RoPE, each at its own frequency.

    Returns T [n*d, n*d] (rope rows first: x rows of the chosen pairs, then their y rows - the neox
    layout of a D-wide rope part - then NoPE rows) and the source frequency index of each rope pair."""
    d, width = gqa.head_dim, gqa.kv_width
    components = []  # (energy, frequency, x_row, y_row)
    for i in range(d // 2):
        xs, ys = _group_indices(gqa, i, 1)
        cov = key_cov[xs][:, xs] + key_cov[ys][:, ys]
        values, vectors = torch.linalg.eigh(cov)
        for r in range(len(xs)):
            x_row, y_row = torch.zeros(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64)
            x_row[xs], y_row[ys] = vectors[:, r], vectors[:, r]
            components.append((values[r].item(), i, x_row, y_row))
    order = sorted(range(len(components)), key=lambda c: -components[c][0])
    chosen = sorted(order[: rope_dim // 2], key=lambda c: (components[c][1], -components[c][0]))
    rest = [c for c in order if c not in set(chosen)]
    rows = [components[c][2] for c in chosen] + [components[c][3] for c in chosen]
    rows += [row for c in rest for row in components[c][2:]]
    return torch.stack(rows), [components[c][1] for c in chosen]


def _group_indices(gqa: GQAShape, group: int, freqfold: int) -> tuple[list[int], list[int]]:
    """Source key rows of the x and y halves of group `group`'s n * F components (head-major)."""
    d = gqa.head_dim
    xs = [j * d + group * freqfold + s for j in range(gqa.num_kv_heads) for s in range(freqfold)]
    return xs, [x + d // 2 for x in xs]


def rorope_rotation(key_cov: torch.Tensor, gqa: GQAShape, plan: RopePlan) -> torch.Tensor:
    """Orthogonal T [n*d, n*d] (float64): K' = T K has the D rope dims first (block layout), then NoPE.

    key_cov [n*d, n*d]: sum over calibration tokens of K K^T (float64, pre-rope keys incl. bias).
    """
    d, width = gqa.head_dim, gqa.kv_width
    groups = d // 2 // plan.freqfold
    pairs_per_group = plan.freqfold // plan.step  # rope pairs of one block that a group feeds
    half = plan.block_dim // 2
    rope_rows, nope_rows = {}, []
    for g in range(groups):
        xs, ys = _group_indices(gqa, g, plan.freqfold)
        cov = key_cov[xs][:, xs] + key_cov[ys][:, ys]  # both halves of each pair are samples
        cov = cov + 0.01 * cov.diagonal().mean() * torch.eye(len(xs), dtype=cov.dtype)
        values, vectors = torch.linalg.eigh(cov)
        vectors = vectors[:, values.argsort(descending=True)]
        for r in range(len(xs)):
            x_row, y_row = torch.zeros(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64)
            x_row[xs], y_row[ys] = vectors[:, r], vectors[:, r]
            if r < plan.kept_per_group:
                block, pair = divmod(r, pairs_per_group)
                pair += g * pairs_per_group
                rope_rows[block * plan.block_dim + pair] = x_row
                rope_rows[block * plan.block_dim + half + pair] = y_row
            else:
                nope_rows += [x_row, y_row]
    rows = [rope_rows[i] for i in range(plan.blocks * plan.block_dim)] + nope_rows
    return torch.stack(rows)


@dataclass
class LayerStats:
    """Calibration statistics of one layer (float64 sums over tokens)."""

    key_cov: torch.Tensor  # [n*d, n*d] sum K K^T
    keys: torch.Tensor  # [N, n*d] keys (pre-rope, with bias), float32
    values: torch.Tensor  # [N, n*d]
    query_cov: torch.Tensor | None = None  # [H, d, d] sum q_h q_h^T per query head; None: unweighted PCA
    input_cov: torch.Tensor | None = None  # [hidden, hidden] sum x x^T of the attention input (query low-rank)


@dataclass
class LayerBasis:
    """What calibration decides for one layer, before a rank is chosen: the RoRoPE rotation, the error
    weights of K_nope and V, the K/V balance and the joint PCA of the weighted [K_nope / ratio ; V]
    (eigenvalues descending, eigenvectors as columns)."""

    plan: RopePlan
    rotation: torch.Tensor  # [n*d, n*d] float64
    pair_freqs: list[int] | None  # select layout: source frequency of each rope pair
    key_weight: torch.Tensor  # W_K [n*d - D, n*d - D], symmetric positive definite
    value_weight: torch.Tensor  # W_V [n*d, n*d]
    ratio: torch.Tensor  # scalar: mean |K_nope W_K| / mean |V W_V|
    eigenvalues: torch.Tensor  # [2nd - D]
    eigenvectors: torch.Tensor  # [2nd - D, 2nd - D]


def _sqrt_psd(a: torch.Tensor, floor: float = 1e-3) -> torch.Tensor:
    """Symmetric square root of a PSD matrix, eigenvalues floored at `floor` x their mean (invertible)."""
    values, vectors = torch.linalg.eigh(a)
    values = values.clamp_min(floor * values.mean().clamp_min(1e-30))
    return (vectors * values.sqrt()) @ vectors.T


def error_weights(gqa: GQAShape, rot: torch.Tensor, rope_dim: int, query_cov: torch.Tensor | None,
                  o_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """W_K, W_V: the PCA minimises |(x - x_hat) W| with W^2 the second moment of what multiplies the
    error downstream. A key error dk moves head h's logits by q_h . dk, so W_K^2 = sum_h E[q~_h q~_h^T]
    (queries in the rotated NoPE coordinates, over the heads reading each KV head); a value error dv
    moves the output by W_o,h dv, so W_V^2 = blockdiag_j sum_{h in group j} W_o,h^T W_o,h. Without
    query statistics or o_proj the weight is the identity (plain PCA)."""
    d, width, f64 = gqa.head_dim, gqa.kv_width, torch.float64
    if query_cov is None or o_weight is None:
        return torch.eye(width - rope_dim, dtype=f64), torch.eye(width, dtype=f64)
    a_k = torch.zeros(width - rope_dim, width - rope_dim, dtype=f64)
    a_v = torch.zeros(width, width, dtype=f64)
    o = o_weight.to(f64)
    for h in range(gqa.num_heads):
        g = h // gqa.group_size
        m_nope = rot[rope_dim:, g * d:(g + 1) * d].T  # [d, nd - D]: head h's key from K'_nope
        a_k += m_nope.T @ query_cov[h] @ m_nope
        o_h = o[:, h * d:(h + 1) * d]
        a_v[g * d:(g + 1) * d, g * d:(g + 1) * d] += o_h.T @ o_h
    return _sqrt_psd(a_k), _sqrt_psd(a_v)


def analyse_layer(gqa: GQAShape, rope_dim: int, freqfold: int, stats: LayerStats,
                  o_weight: torch.Tensor | None = None) -> LayerBasis:
    plan = plan_rope(gqa, rope_dim, freqfold)
    f64 = torch.float64
    if plan.select:
        rot, pair_freqs = select_rotation(stats.key_cov, gqa, rope_dim)
    else:
        rot, pair_freqs = rorope_rotation(stats.key_cov, gqa, plan), None  # [n*d, n*d]
    width = gqa.kv_width
    w_k, w_v = error_weights(gqa, rot, rope_dim, stats.query_cov, o_weight)
    # Balanced K/V, then one joint PCA of [K_nope W_K / ratio ; V W_V] over the calibration tokens. Sums
    # run over token chunks so float64 temporaries stay small whatever the number of calibration tokens.
    chunks = list(zip(stats.keys.split(CHUNK), stats.values.split(CHUNK)))
    nope_rot = rot[rope_dim:].T @ w_k  # [n*d, n*d - D]
    k_norm = sum((kc.to(f64) @ nope_rot).norm(dim=-1).sum() for kc, _ in chunks)
    v_norm = sum((vc.to(f64) @ w_v).norm(dim=-1).sum() for _, vc in chunks)
    ratio = (k_norm / v_norm.clamp_min(1e-12)).clamp_min(1e-6)
    cov = torch.zeros(2 * width - rope_dim, 2 * width - rope_dim, dtype=f64)
    for kc, vc in chunks:
        joint = torch.cat([(kc.to(f64) @ nope_rot) / ratio, vc.to(f64) @ w_v], dim=-1)
        cov += joint.T @ joint
    values, vectors = torch.linalg.eigh(cov)
    order = values.argsort(descending=True)
    return LayerBasis(plan, rot, pair_freqs, w_k, w_v, ratio, values[order].clamp_min(0), vectors[:, order])


def build_layer(gqa: GQAShape, basis: LayerBasis, rank: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                q_bias=None, k_bias=None, v_bias=None, q_lora_rank: int | None = None,
                input_cov: torch.Tensor | None = None, nope_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """MLA tensors of one layer at latent rank `rank` (see the module docstring); shapes as in exact.py,
    with qk_nope_head_dim = v_head_dim = d and q_proj [H * (d + D), hidden].

    latent c = P^T [W_K K'_nope / ratio ; W_V V]; reconstruction K'_nope = ratio W_K^-1 P_k c,
    V = W_V^-1 P_v c. `nope_scale` multiplies the NoPE query rows: the source's rotary may scale its
    cos and sin (YaRN's attention factor s), which scales every source logit by s^2; the rope part
    keeps that at run time, the NoPE part, which is never rotated, must carry it in its weights."""
    rope_dim = basis.plan.blocks * basis.plan.block_dim
    check_rank(gqa, rank, rope_dim)
    d, width, heads = gqa.head_dim, gqa.kv_width, gqa.num_heads
    out_dtype = q.dtype
    f64 = torch.float64
    rot, ratio = basis.rotation, basis.ratio
    q, k, v = q.to(f64), k.to(f64), v.to(f64)
    zeros = torch.zeros(width, dtype=f64)
    kb = k_bias.to(f64) if k_bias is not None else zeros
    vb = v_bias.to(f64) if v_bias is not None else zeros
    k_rot, kb_rot = rot @ k, rot @ kb
    w_k, w_v = basis.key_weight, basis.value_weight
    pca = basis.eigenvectors[:, :rank]  # P [2nd - D, R]
    pca_k, pca_v = pca[: width - rope_dim], pca[width - rope_dim:]
    up_k = ratio * torch.linalg.solve(w_k, pca_k)  # [nd - D, R]: K'_nope from the latent
    up_v = torch.linalg.solve(w_v, pca_v)  # [nd, R]

    down_k, down_v = pca_k.T @ w_k / ratio, pca_v.T @ w_v  # [R, nd - D], [R, nd]
    kv_a = torch.cat([down_k @ k_rot[rope_dim:] + down_v @ v, k_rot[:rope_dim]])
    kv_a_bias = torch.cat([down_k @ kb_rot[rope_dim:] + down_v @ vb, kb_rot[:rope_dim]])

    q_rows, q_bias_rows, kv_b_rows = [], [], []
    for h in range(heads):
        g = h // gqa.group_size
        m_h = rot[:, g * d:(g + 1) * d].T  # [d, n*d]: k_head = m_h K'
        q_h = q[h * d:(h + 1) * d]
        q_rows += [q_h * nope_scale, m_h[:, :rope_dim].T @ q_h]
        if q_bias is not None:
            qb_h = q_bias.to(f64)[h * d:(h + 1) * d]
            q_bias_rows += [qb_h * nope_scale, m_h[:, :rope_dim].T @ qb_h]
        kv_b_rows += [m_h[:, rope_dim:] @ up_k, up_v[g * d:(g + 1) * d]]

    tensors = {
        "q_proj.weight": torch.cat(q_rows),
        "kv_a_proj_with_mqa.weight": kv_a,
        "kv_b_proj.weight": torch.cat(kv_b_rows),
    }
    if q_bias is not None:
        tensors["q_proj.bias"] = torch.cat(q_bias_rows)
    if k_bias is not None or v_bias is not None:
        tensors["kv_a_proj_with_mqa.bias"] = kv_a_bias
    if q_lora_rank:
        factors = query_low_rank(tensors.pop("q_proj.weight"), tensors.pop("q_proj.bias", None), q_lora_rank,
                                 input_cov)
        tensors.update(factors)
    return {name: t.to(out_dtype).contiguous() for name, t in tensors.items()}


def query_low_rank(weight: torch.Tensor, bias: torch.Tensor | None, rank: int,
                   input_cov: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """q = W x + b  ->  q_b_proj(q_a_proj(x)) = U (U^T W x) + b with U [H*(d+D), rank] the top principal
    directions of the queries W x over the calibration inputs (E[x x^T] = input_cov; identity without
    it), which minimises the mean squared query error at that rank. No norm between the two."""
    cov = input_cov if input_cov is not None else torch.eye(weight.shape[1], dtype=weight.dtype)
    values, vectors = torch.linalg.eigh(weight @ cov.to(weight.dtype) @ weight.T)
    basis = vectors[:, values.argsort(descending=True)[:rank]]  # [H*(d+D), rank]
    out = {"q_a_proj.weight": basis.T @ weight, "q_b_proj.weight": basis}
    if bias is not None:
        out["q_b_proj.bias"] = bias
    return out


def check_q_lora_rank(gqa: GQAShape, rank: int, rope_dim: int) -> None:
    # With per-head q/k norms the low rank factors the source q_proj (before the norm), H * d wide.
    width = gqa.num_heads * (gqa.head_dim + (0 if gqa.head_norms else rope_dim))
    limit = min(gqa.hidden_size, width)
    if not 0 < rank <= limit:
        what = "num_heads * head_dim" if gqa.head_norms else "num_heads * (head_dim + qk_rope_dim)"
        raise TransMLAError(f"--q-lora-rank {rank} is out of range: it must be in 1..{limit} (at most hidden_size "
                            f"and {what}) for this model")


def rank_grid(uniform: int, max_rank: int) -> list[int]:
    """Candidate per-layer ranks around the uniform one: 1/2 .. 2x in quarter steps, rounded to a
    kernel-friendly multiple (8 where the rank allows, smaller for tiny ranks)."""
    unit = 8 if uniform >= 32 else max(1, uniform // 4)
    grid = {max(unit, round(uniform * f / unit) * unit) for f in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)}
    return sorted({min(r, max_rank) for r in grid} | {uniform})


def allocate_ranks(errors: list[dict[int, float]], total: int) -> list[int]:
    """Per-layer ranks summing exactly to `total` that minimise the summed measured error.

    errors[l][r]: layer l's error at rank r (a few candidate ranks per layer). Exact knapsack by dynamic
    programming over the budget; the uniform choice is a candidate, so the result is never worse than
    uniform on the measured errors.
    """
    best = {0: (0.0, [])}  # ranks used -> (summed error, ranks so far)
    for options in errors:
        step = {}
        for used, (err, ranks) in best.items():
            for rank, e in options.items():
                if used + rank <= total and (used + rank not in step or err + e < step[used + rank][0]):
                    step[used + rank] = (err + e, ranks + [rank])
        best = step
    if total not in best:
        raise ValueError(f"no per-layer ranks from the candidates sum to {total}")
    return best[total][1]


def check_rank(gqa: GQAShape, rank: int, rope_dim: int) -> None:
    max_rank = 2 * gqa.kv_width - rope_dim
    if not 0 < rank <= max_rank:
        raise TransMLAError(f"--kv-lora-rank {rank} is out of range: it must be in 1..{max_rank} "
                            f"(2 * num_kv_heads * head_dim - qk_rope_dim) for this model")
