"""The plugin's CUDA decode path (`serving.triton_decode.triton_latent_decode`, vLLM's Triton MLA decode
kernel) compiled and run on a CUDA GPU, at the latent widths conversion produces, against an fp32
reference over the same paged cache. Skipped without a GPU (CI has none); on CPU the same path runs
under Triton's interpreter in test_latent_backend.py.

On a GPU machine without vLLM, `tests/vllm_kernel_shim.py WHEEL DIR` puts vLLM's kernel file, taken
unchanged from its CUDA wheel, in an importable stub package (see benchmarks/README.md)."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (query heads, kv_lora_rank, rope dims): DeepSeek's 512 + 64, the reference model's 16 + 16, ranks that
# are not powers of two (masked tiles), a 32-head Llama, and one head per tensor-parallel rank (vLLM then
# takes its plain MHA kernel, not the grouped one)
WIDTHS = [(16, 512, 64), (8, 16, 16), (16, 448, 64), (32, 96, 32), (4, 48, 16), (1, 64, 16)]
# per dtype: worst |error| allowed, as a multiple of that dtype's epsilon (fp32 dots run as TF32 on
# tensor cores, whose 10-bit mantissa is fp16's)
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-11}


def paged_case(batch: int, heads: int, width: int, block_size: int, dtype: torch.dtype, seed: int):
    """A shuffled paged cache with sequences of uneven lengths (one shorter than a block, one ending
    exactly on a block boundary). -> q [B, H, W], cache [blocks, block_size, W], table, lens."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor([1, block_size, 3 * block_size + 5, 700, 2049][:batch], dtype=torch.int32)
    per_row = math.ceil(int(lens.max()) / block_size)
    num_blocks = batch * per_row + 3
    cache = torch.randn(num_blocks, block_size, width, generator=gen)
    table = torch.randperm(num_blocks, generator=gen)[: batch * per_row].view(batch, per_row).int()
    q = torch.randn(batch, heads, width, generator=gen)
    return (q.to(dtype).cuda(), cache.to(dtype).cuda(), table.cuda(), lens.cuda())


def reference_decode(q, cache, table, lens, scale: float, rank: int) -> torch.Tensor:
    """fp32, one row at a time: gather the row's tokens from its blocks, then softmax(scale q.c) c[:, :R]."""
    out = []
    for b in range(q.shape[0]):
        rows = cache[table[b].long()].reshape(-1, cache.shape[-1])[: int(lens[b])].float()
        p = torch.softmax(q[b].float() @ rows.T * scale, dim=-1)
        out.append(p @ rows[:, :rank])
    return torch.stack(out)


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("heads,rank,rope", WIDTHS)
def test_triton_latent_decode_on_gpu_matches_fp32_reference(heads, rank, rope, dtype, block_size):
    from vllm_transmla.serving.triton_decode import triton_latent_decode

    q, cache, table, lens = paged_case(5, heads, rank + rope, block_size, dtype, seed=heads * rank + rope)
    scale = (rank + rope) ** -0.5 * 2.0  # peaked enough that a wrong token or block would show
    got = triton_latent_decode(q, cache, table, lens, scale, rank)
    torch.cuda.synchronize()
    assert got.shape == (5, heads, rank) and got.dtype == dtype
    want = reference_decode(q, cache, table, lens, scale, rank)
    error = (got.float() - want).abs().max().item()
    # the output is an average of unit-variance values: errors of a few epsilon are rounding, a wrong
    # block, length or width is off by O(0.1-1)
    assert error < 16 * EPS[dtype], f"max |error| {error:.2e} for {heads} heads, {rank} + {rope}, {dtype}"
    # the one-token row sees only its first cached token: the output is that token's latent exactly
    first = cache[table[0, 0].long(), 0, :rank].float()
    assert (got[0].float() - first).abs().max().item() < 4 * EPS[dtype] * first.abs().max().item()
