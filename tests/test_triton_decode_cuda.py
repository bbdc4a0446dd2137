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
from paged_latent import paged_cache, reference_decode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (query heads, kv_lora_rank, rope dims): DeepSeek's 512 + 64, the reference model's 16 + 16, ranks that
# are not powers of two (masked tiles), a 32-head Llama, and one head per tensor-parallel rank (vLLM then
# takes its plain MHA kernel, not the grouped one)
WIDTHS = [(16, 512, 64), (8, 16, 16), (16, 448, 64), (32, 96, 32), (4, 48, 16), (1, 64, 16)]
# per dtype: worst |error| allowed, as a multiple of that dtype's epsilon (fp32 dots run as TF32 on
# tensor cores, whose 10-bit mantissa is fp16's)
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-11}


def paged_case(batch: int, heads: int, width: int, block_size: int, dtype: torch.dtype, seed: int):
    """Sequences of uneven lengths (one shorter than a block, one ending exactly on a block boundary) in a
    shuffled paged cache, their values rounded to `dtype`. -> q [B, H, W], latents (fp32 CPU, per row),
    and the CUDA q, cache, table, lens."""
    gen = torch.Generator().manual_seed(seed)
    lens = [1, block_size, 3 * block_size + 5, 700, 2049][:batch]
    latents = [torch.randn(n, width, generator=gen).to(dtype).float() for n in lens]
    q = torch.randn(batch, heads, width, generator=gen).to(dtype).float()
    num_blocks = sum(math.ceil(n / block_size) for n in lens) + 3
    cache, table = paged_cache(latents, num_blocks, seed=seed, block_size=block_size)
    lens = torch.tensor(lens, dtype=torch.int32)
    return q, latents, (q.to(dtype).cuda(), cache.to(dtype).cuda(), table.cuda(), lens.cuda())


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("heads,rank,rope", WIDTHS)
def test_triton_latent_decode_on_gpu_matches_fp32_reference(heads, rank, rope, dtype, block_size):
    from vllm_transmla.serving.triton_decode import triton_latent_decode

    q, latents, gpu_args = paged_case(5, heads, rank + rope, block_size, dtype, seed=heads * rank + rope)
    scale = (rank + rope) ** -0.5 * 2.0  # peaked enough that a wrong token or block would show
    got = triton_latent_decode(*gpu_args, scale, rank).cpu()
    assert got.shape == (5, heads, rank) and got.dtype == dtype
    want = reference_decode(q, latents, scale, rank)
    error = (got.float() - want).abs().max().item()
    # the output is an average of unit-variance values: errors of a few epsilon are rounding, a wrong
    # block, length or width is off by O(0.1-1)
    assert error < 16 * EPS[dtype], f"max |error| {error:.2e} for {heads} heads, {rank} + {rope}, {dtype}"
    # the one-token row sees only its first cached token: the output is that token's latent exactly
    first = latents[0][0, :rank]
    assert (got[0].float() - first).abs().max().item() < 4 * EPS[dtype] * first.abs().max().item()
