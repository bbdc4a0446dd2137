"""Torch-only helpers shared by the latent decode tests (CPU kernels and the CUDA path): a shuffled paged
latent cache and an fp32 SDPA reference. No vLLM import, so the CUDA test can run on a GPU machine that
has only vLLM's kernel file (tests/vllm_kernel_shim.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_cache(seq_latents: list[torch.Tensor], num_blocks: int, seed: int = 0, block_size: int = 16):
    """Write each sequence's latents [S, R + D] into randomly chosen (shuffled) blocks.
    -> cache [num_blocks, block_size, R + D] (random where nothing was written), table [B, max_blocks] int32."""
    gen = torch.Generator().manual_seed(seed)
    width = seq_latents[0].shape[-1]
    cache = torch.randn(num_blocks, block_size, width, generator=gen)  # garbage where nothing was written
    order = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max((s.shape[0] + block_size - 1) // block_size for s in seq_latents)
    table = torch.zeros(len(seq_latents), max_blocks, dtype=torch.int32)
    for i, latents in enumerate(seq_latents):
        for j in range((latents.shape[0] + block_size - 1) // block_size):
            block = order.pop()
            table[i, j] = block
            chunk = latents[j * block_size:(j + 1) * block_size]
            cache[block, :chunk.shape[0]] = chunk
    return cache, table


def reference_decode(q, latents, scale, rank):
    """fp32 SDPA of one query token per sequence over its latents (MQA: one shared latent head).
    q [B, H, R + D], latents: B tensors [S_b, R + D] -> [B, H, R]."""
    out = []
    for qi, lat in zip(q, latents):  # qi [H, R + D], lat [S, R + D]
        heads = qi.shape[0]
        k, v = lat.expand(heads, -1, -1), lat[:, :rank].expand(heads, -1, -1)  # [H, S, *]
        out.append(F.scaled_dot_product_attention(qi.unsqueeze(1), k, v, scale=scale)[:, 0])
    return torch.stack(out)
