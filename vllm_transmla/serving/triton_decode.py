"""The CUDA decode path: vLLM's Triton MLA decode kernel over our paged latent cache, at any latent
width (vLLM's other CUDA MLA kernels are built for DeepSeek's 512 + 64).

Imports nothing from vLLM until called, so the kernel can be checked on a GPU machine that has torch
and Triton and only vLLM's kernel file (tests/test_triton_decode_cuda.py)."""

from __future__ import annotations

import torch


def triton_latent_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float, kv_lora_rank: int,
                         num_kv_splits: int = 4) -> torch.Tensor:
    """Absorbed MLA decode, one query token per row.

    q [B, H, R + D] (latent part first), kv_cache [blocks, block_size, R + D], block_table [B, max_blocks]
    int32, seq_lens [B] int32 -> [B, H, R]: softmax(scale * q . latent) . latent[..., :R] over each
    row's first seq_lens[b] cached tokens."""
    from vllm.v1.attention.ops.triton_decode_attention import decode_attention_fwd

    batch, heads = q.shape[:2]
    out = q.new_zeros(batch, heads, kv_lora_rank)
    lse = q.new_zeros(batch, heads)
    partial = torch.empty(batch, heads, num_kv_splits, kv_lora_rank + 1, dtype=torch.float32, device=q.device)
    cache = kv_cache.unsqueeze(2)  # [blocks, block_size, 1, R + D]: one shared "KV head", as DeepSeek's
    decode_attention_fwd(q.contiguous(), cache, cache[..., :kv_lora_rank], out, lse, block_table, seq_lens,
                         partial, num_kv_splits, scale, kv_cache.shape[1], is_mla=True)
    return out
