"""TPLA-ready checkpoints: an orthogonal rotation of each layer's latent, so that its slices carry equal shares.

TPLA (arXiv 2508.15881) serves one latent with tensor parallelism by slicing it: rank t of n caches the
latent's dims [t R / n, (t + 1) R / n) (and the rope key), attends with its own softmax over that slice and the
ranks' outputs are summed (hf/attention.py `MLAAttention._tpla`, serving/attention.py). The paper rotates the
latent first (Hadamard or PCA) so that no slice holds more than its share: c' = Q c (kv_a_proj_with_mqa's
latent rows multiplied by Q, kv_b_proj's columns by Q^T) leaves the model's function unchanged (the
up-projection reads Q^T Q c = c) and spreads every direction over all dims. Q is the normalized
Walsh-Hadamard matrix when R is a power of two, else a seeded random orthogonal matrix.

Measured (benchmarks/groups/run.py --real): on our latents the rotation hurts. They already are a PCA basis,
variance-sorted, so sliced as converted rank 0 holds the dominant directions and its softmax is close to the
whole latent's, while the other slices add small corrections; rotated, every slice's softmax is equally far
off. SmolLM2 at 25% of the cache and 2 slices: 156.6 as converted, 191.5 rotated (KJV; MLA 119.8). The option
stays for latents that are not variance-sorted and for comparison.
"""

from __future__ import annotations

import torch

TRANSFORMS = ("hadamard",)


def hadamard(size: int) -> torch.Tensor:
    """The normalized Sylvester-Hadamard matrix [size, size] (size a power of two): orthogonal, all entries
    +-1 / sqrt(size)."""
    assert size > 0 and size & (size - 1) == 0, "Sylvester's construction needs a power of two"
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h / size ** 0.5


def latent_rotation(rank: int, kind: str = "hadamard", seed: int = 0) -> torch.Tensor:
    """The orthogonal Q [rank, rank] (float64) a TPLA-ready latent is rotated by."""
    if kind != "hadamard":
        raise ValueError(f"unknown TPLA transform {kind!r}: choose one of {', '.join(TRANSFORMS)}")
    if rank & (rank - 1) == 0:
        return hadamard(rank)
    generator = torch.Generator().manual_seed(seed + rank)
    q, r = torch.linalg.qr(torch.randn(rank, rank, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]  # Haar-distributed, and deterministic


def rotate_latent(tensors: dict[str, torch.Tensor], kind: str = "hadamard") -> dict[str, torch.Tensor]:
    """One layer's attention tensors (names relative to self_attn, as the converter writes them) with the
    latent c_kv rotated by Q: kv_a_proj_with_mqa's (and kv_a_key_proj's) first R rows and bias by Q,
    kv_b_proj [H (nope + v), R] by Q^T. The rope rows are untouched. Computed in float64, stored in the
    tensors' dtype."""
    kv_b = tensors["kv_b_proj.weight"]
    rank = kv_b.shape[1]
    q = latent_rotation(rank, kind)
    out = dict(tensors)
    out["kv_b_proj.weight"] = (kv_b.double() @ q.T).to(kv_b.dtype)
    for name in ("kv_a_proj_with_mqa.weight", "kv_a_proj_with_mqa.bias", "kv_a_key_proj.weight"):
        if name in tensors:
            t = tensors[name]
            rotated = t.clone()
            rotated[:rank] = (q @ t[:rank].double()).to(t.dtype)
            out[name] = rotated
    return out
