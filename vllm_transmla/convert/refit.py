"""Closed-form refits on the calibration text: each head's value up-projection, then o_proj over all heads.

The joint PCA chooses the latent for keys and values together; given that latent, the value rows of
kv_b_proj (W_UV,h [d, R] per head) can be solved for exactly. With z_h = sum_n p_h(m, n) c_n, the
converted layer's attention-weighted latent for head h at position m (the MLA model's own attention
weights p, which already carry the key error), and o_h the source attention's per-head output on the same
input (before o_proj), least squares with a ridge towards the PCA's own reconstruction W0 gives
    W_UV,h = (sum o_h z_h^T + lam W0_h) (sum z_h z_h^T + lam I)^-1,
which also makes up, where it can, for what the compressed keys changed in the attention weights, and
keeps W0 in directions the calibration text hardly visits (at full rank W = W0: still exact).
Measured on SmolLM2-135M at 25% of the cache: held-out perplexity 125 -> 115 (KJV) and 214 -> 164
(Devil's Dictionary), calibrated on other text. Fitting to the original model's own hidden states
(instead of the converted model's) was worse: 211 and 235.

Each head's refit is the best that head can do alone; the layer's output o_proj(v) mixes the heads, and
one head's remaining error can be offset by others. With v [H d] the converted heads' outputs (after the
value refit) and o the source's, o_proj O [hidden, H d] is refit jointly over all heads to the source's
attention output O o, again with a ridge towards O:
    O' = (O sum o v^T + lam O) (sum v v^T + lam I)^-1
(at full rank v = o and O' = O). Measured on SmolLM2-135M at 50% of the cache, license-text calibration:
45.62 -> 41.99 (KJV) and 74.68 -> 72.53 (Devil's Dictionary).
"""

from __future__ import annotations

import torch

RIDGE = 1e-4  # relative to the mean diagonal of sum z z^T
OUTPUT_RIDGE = 1e-3  # relative to the mean diagonal of sum v v^T


def refit_value_projection(kv_b: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor], num_heads: int,
                           head_dim: int, ridge: float = RIDGE) -> torch.Tensor:
    """kv_b_proj [H * (nope + d), R] with every head's value rows solved from `moments` = (sum z z^T
    [H, R, R], sum o z^T [H, d, R]), float64; the key rows are kept."""
    zz, oz = moments
    rank = kv_b.shape[1]
    out = kv_b.double().view(num_heads, -1, rank).clone()
    eye = torch.eye(rank, dtype=torch.float64)
    for h in range(num_heads):
        lam = ridge * zz[h].diagonal().mean().clamp_min(1e-30)
        prior = out[h, -head_dim:]
        out[h, -head_dim:] = torch.linalg.solve(zz[h] + lam * eye, (oz[h] + lam * prior).T).T
    return out.reshape(kv_b.shape).to(kv_b.dtype).contiguous()


def refit_output_projection(o_proj: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor],
                            ridge: float = OUTPUT_RIDGE) -> torch.Tensor:
    """o_proj [hidden, H d] solved from `moments` = (sum v v^T, sum o v^T) [H d, H d], float64."""
    vv, ov = moments
    o = o_proj.double()
    lam = ridge * vv.diagonal().mean().clamp_min(1e-30)
    eye = torch.eye(vv.shape[0], dtype=torch.float64)
    return torch.linalg.solve(vv + lam * eye, (o @ ov + lam * o).T).T.to(o_proj.dtype).contiguous()


def output_moments(v: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum v v^T and sum o v^T [H d, H d] of the per-head outputs v, o [B, T, H, d]: a chunk's sums in float32
    (half the time of float64 here; a chunk is a few hundred tokens), returned as float64 to accumulate."""
    v, o = v.flatten(2).flatten(0, 1).float(), o.flatten(2).flatten(0, 1).float()
    return (v.T @ v).double(), (o.T @ v).double()


def refit_moments(z: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum z z^T [H, R, R] and sum o z^T [H, d, R] (float64) of z [B, T, H, R] and o [B, T, H, d]."""
    z, o = z.double(), o.double()
    return torch.einsum("bthr,bths->hrs", z, z), torch.einsum("bthd,bthr->hdr", o, z)
