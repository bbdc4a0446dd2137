"""Our latent attention backend alone, against an fp32 SDPA reference over a paged cache with shuffled
blocks, mixed prefill/decode batches and several head counts (in the manner of vLLM's
tests/v1/attention/test_mla_backends.py)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from paged_latent import paged_cache, reference_decode

from vllm_transmla.serving.backend import LatentPrefillBackend
from vllm_transmla.serving import latent_math
from vllm_transmla.serving.latent_math import chunked_attention, paged_latent_decode, per_token_rows

BLOCK = 16


def _use_paths(monkeypatch, **sizes) -> None:
    monkeypatch.setattr(latent_math, "DEFAULT_PATHS", dataclasses.replace(latent_math.DEFAULT_PATHS, **sizes))


def _choose_path(path: str, monkeypatch, block_size: int = BLOCK) -> None:
    from vllm_transmla.serving import cpu_kernel

    if path == "fused":
        if not cpu_kernel.available():
            pytest.skip("the fused CPU kernel needs x86-64 with AVX2 and a C compiler")
        return
    _use_paths(monkeypatch, cpu_kernel=False)
    if path in ("per-sequence", "chunked"):
        _use_paths(monkeypatch, batched_decode_bytes=0)
    if path == "chunked":  # chunks of 2 blocks: sequences of 1-5 chunks, a partial last one included
        _use_paths(monkeypatch, decode_chunk_tokens=2 * block_size)


DECODE_PATHS = ["fused", "batched", "per-sequence", "chunked"]


@pytest.mark.parametrize("path", DECODE_PATHS)
@pytest.mark.parametrize("block_size", [16, 96, 128])
@pytest.mark.parametrize("heads,rank,rope", [(1, 64, 16), (4, 64, 16), (16, 48, 16), (8, 512, 64), (6, 20, 12)])
def test_decode_matches_sdpa(heads, rank, rope, block_size, path, monkeypatch):
    """The decode paths (our fused C kernel; in torch: one padded batch, a sequence at a time, long
    sequences chunk by chunk with an online softmax) and calls in a row (workspaces are reused) match
    fp32 SDPA. Odd head counts and widths that are not multiples of 8 take the kernel's remainder code.
    Block sizes: 16 (vLLM's stock CPU MLA size; the kernel copies each tile's rows), 128 (vLLM's CPU
    default; an fp32 tile lies in one block and is read in place) and 96 (some tiles in place, some across
    two blocks and copied)."""
    _choose_path(path, monkeypatch, block_size)
    torch.manual_seed(heads)
    for seq_lens in ([1, 15, 16, 17, 90], [33, 2], [1100, 512, 513]):  # the kernel splits at 512 tokens
        latents = [torch.randn(n, rank + rope) for n in seq_lens]
        cache, table = paged_cache(latents, num_blocks=160 * BLOCK // block_size + 8, block_size=block_size)
        q = torch.randn(len(seq_lens), heads, rank + rope)
        scale = (rank + rope) ** -0.5
        got = paged_latent_decode(q, cache, table, torch.tensor(seq_lens), scale, rank)
        want = reference_decode(q, latents, scale, rank)
        assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("path", DECODE_PATHS)
def test_bf16_decode_matches_fp32(path, monkeypatch):
    """A bf16 cache (computed in fp32 on CPUs without native bf16 matmul) matches the fp32 result of the
    same bf16 values."""
    _choose_path(path, monkeypatch)
    torch.manual_seed(7)
    seq_lens = [5, 40, 77]
    latents = [torch.randn(n, 80).bfloat16().float() for n in seq_lens]
    cache, table = paged_cache(latents, num_blocks=30)
    q = torch.randn(3, 4, 80).bfloat16()
    got = paged_latent_decode(q, cache.bfloat16(), table, torch.tensor(seq_lens), 0.1, 64)
    assert got.dtype == torch.bfloat16
    want = reference_decode(q.float(), latents, 0.1, 64)
    assert (got.float() - want).abs().max().item() < 2e-2


def test_fused_kernel_is_batch_and_head_invariant(monkeypatch):
    """Our C kernel gives a sequence bit-identical results alone or in any batch, for any subset of heads
    (a tensor-parallel rank) and any block size, with fp32, bf16 and fp16 caches: the determinism vLLM
    users expect."""
    _choose_path("fused", monkeypatch)
    torch.manual_seed(11)
    seq_lens = [3, 600, 31, 1030, 77]
    latents = [torch.randn(n, 100) for n in seq_lens]
    cache32, table = paged_cache(latents, num_blocks=200)
    q = torch.randn(len(seq_lens), 12, 100)
    for cache in (cache32, cache32.bfloat16(), cache32.half()):
        batch = paged_latent_decode(q, cache, table, torch.tensor(seq_lens), 0.1, 84)
        assert batch.dtype == cache.dtype
        want = reference_decode(q.to(cache.dtype).float(), [x.to(cache.dtype).float() for x in latents], 0.1, 84)
        assert (batch.float() - want).abs().max().item() < (1e-5 if cache is cache32 else 2e-2)
        for i in range(len(seq_lens)):
            alone = paged_latent_decode(q[i:i + 1], cache, table[i:i + 1], torch.tensor(seq_lens[i:i + 1]), 0.1, 84)
            assert torch.equal(alone[0], batch[i])
        for heads in (slice(0, 5), slice(5, 12)):
            part = paged_latent_decode(q[:, heads].contiguous(), cache, table, torch.tensor(seq_lens), 0.1, 84)
            assert torch.equal(part, batch[:, heads])
    # fp32 rows read in place (128-token blocks) give the bits of rows copied into the tile first (16).
    wide_cache, wide_table = paged_cache(latents, num_blocks=20, block_size=128)
    copied = paged_latent_decode(q, cache32, table, torch.tensor(seq_lens), 0.1, 84)
    in_place = paged_latent_decode(q, wide_cache, wide_table, torch.tensor(seq_lens), 0.1, 84)
    assert torch.equal(in_place, copied)


def test_fused_kernel_can_be_switched_off(monkeypatch):
    """VLLM_TRANSMLA_CPU_KERNEL=0 keeps the torch path (for CPUs or setups where the kernel misbehaves)."""
    from vllm_transmla.serving import cpu_kernel

    monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "0")
    cpu_kernel._library.cache_clear()
    try:
        assert not cpu_kernel.available()
    finally:
        monkeypatch.delenv(cpu_kernel.ENV_SWITCH)
        cpu_kernel._library.cache_clear()


@pytest.mark.parametrize("path", DECODE_PATHS)
def test_multi_token_decode_is_causal_attention(path, monkeypatch):
    """Requests with several new tokens in the decode path (short extends, speculative tokens): token i of
    a request's n new tokens (all in the cache) attends to the cached tokens up to itself; equal to fp32
    causal SDPA over each request's latents. Query lengths 1-16 in one batch, as vLLM orders them."""
    _choose_path(path, monkeypatch)
    torch.manual_seed(5)
    heads, rank, rope, scale = 8, 64, 16, 0.15
    seq_lens, query_lens = [7, 40, 33, 70], [1, 3, 16, 5]
    latents = [torch.randn(n, rank + rope) for n in seq_lens]
    cache, table = paged_cache(latents, num_blocks=30)
    q = torch.randn(sum(query_lens), heads, rank + rope)
    starts = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    rows, lens = per_token_rows(starts, table, torch.tensor(seq_lens, dtype=torch.int32), q.shape[0])
    got = paged_latent_decode(q, cache, rows, lens, scale, rank)
    for r, (lat, n) in enumerate(zip(latents, query_lens)):
        k, v = lat.expand(heads, -1, -1), lat[:, :rank].expand(heads, -1, -1)
        mask = torch.ones(n, lat.shape[0], dtype=torch.bool).tril(lat.shape[0] - n)
        want = F.scaled_dot_product_attention(q[starts[r]:starts[r + 1]].transpose(0, 1), k, v, attn_mask=mask,
                                              scale=scale).transpose(0, 1)
        assert (got[starts[r]:starts[r + 1]] - want).abs().max().item() < 1e-5


def _prefill(q, k, v, lengths, scale):
    backend = LatentPrefillBackend(num_heads=q.shape[1], scale=scale, kv_lora_rank=0, qk_nope_head_dim=0,
                                   qk_rope_head_dim=0, v_head_dim=v.shape[-1], vllm_config=None)
    starts = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    backend.prepare_metadata(SimpleNamespace(query_start_loc=starts))
    return backend.run_prefill_new_tokens(q, k, v, return_softmax_lse=False)


@pytest.mark.parametrize("heads", [1, 4, 12])
def test_mixed_batch_matches_sdpa(heads):
    """A batch as MLAAttention splits it: decode requests read the paged latent cache (absorbed), prefill
    requests attend over expanded per-head K/V; both equal per-request fp32 causal attention."""
    torch.manual_seed(0)
    rank, rope, nope, vdim = 32, 16, 16, 16
    w_uk, w_uv = torch.randn(heads, nope, rank) * 0.2, torch.randn(heads, vdim, rank) * 0.2
    scale = (nope + rope) ** -0.5

    def reference(q_nope, q_pe, latents):  # per-head keys/values from the latent, causal attention
        c, k_pe = latents[:, :rank], latents[:, rank:]
        k = torch.cat([torch.einsum("sr,hdr->hsd", c, w_uk), k_pe.expand(heads, -1, -1)], -1)
        v = torch.einsum("sr,hdr->hsd", c, w_uv)
        q = torch.cat([q_nope, q_pe], -1).transpose(0, 1)  # [H, T, d]
        s, t = latents.shape[0], q.shape[1]
        mask = torch.ones(t, s, dtype=torch.bool).tril(s - t)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(0, 1)

    decode_lens, prefill_lens = [7, 33, 64], [5, 20]
    decode_lat = [torch.randn(n, rank + rope) for n in decode_lens]
    cache, table = paged_cache(decode_lat, num_blocks=30)
    dq_nope, dq_pe = torch.randn(3, heads, nope), torch.randn(3, heads, rope)
    q_latent = torch.cat([torch.einsum("bhd,hdr->bhr", dq_nope, w_uk), dq_pe], -1)
    decoded = torch.einsum("bhr,hdr->bhd", paged_latent_decode(q_latent, cache, table, torch.tensor(decode_lens),
                                                                scale, rank), w_uv)
    for i, lat in enumerate(decode_lat):
        want = reference(dq_nope[i:i + 1], dq_pe[i:i + 1], lat)[0]
        assert (decoded[i] - want).abs().max().item() < 1e-5

    prefill_lat = torch.randn(sum(prefill_lens), rank + rope)
    pq_nope, pq_pe = torch.randn(sum(prefill_lens), heads, nope), torch.randn(sum(prefill_lens), heads, rope)
    c, k_pe = prefill_lat[:, :rank], prefill_lat[:, rank:]
    k = torch.cat([torch.einsum("sr,hdr->shd", c, w_uk), k_pe[:, None].expand(-1, heads, -1)], -1)
    v = torch.einsum("sr,hdr->shd", c, w_uv)
    prefilled = _prefill(torch.cat([pq_nope, pq_pe], -1), k, v, prefill_lens, scale)
    begin = 0
    for n in prefill_lens:
        want = reference(pq_nope[begin:begin + n], pq_pe[begin:begin + n], prefill_lat[begin:begin + n])
        assert (prefilled[begin:begin + n] - want).abs().max().item() < 1e-5
        begin += n


def _choose_prefill_path(path: str, monkeypatch) -> None:
    """"fused": the C kernel (48-row query blocks, 32-key tiles); "torch": query chunks of 16 rows."""
    _choose_path(path, monkeypatch)
    if path == "torch":
        _use_paths(monkeypatch, prefill_score_bytes=0)


@pytest.mark.parametrize("path", ["fused", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_prefill_matches_sdpa(dtype, path, monkeypatch):
    """The CPU prefill equals fp32 causal SDPA per request (sequences of 1 to 130 tokens: 1-3 query blocks
    of the kernel and 1-9 chunks of the torch path, partial last ones, partial key tiles); bf16 inputs to
    bf16 rounding."""
    _choose_prefill_path(path, monkeypatch)
    torch.manual_seed(3)
    lengths, heads = [1, 16, 17, 100, 130], 4
    q, k = torch.randn(sum(lengths), heads, 24), torch.randn(sum(lengths), heads, 24)
    v = torch.randn(sum(lengths), heads, 8)
    got = _prefill(q.to(dtype), k.to(dtype), v.to(dtype), lengths, 0.3)
    assert got.dtype == dtype
    begin = 0
    for n in lengths:
        part = slice(begin, begin + n)
        want = F.scaled_dot_product_attention(*(x[part].to(dtype).float().transpose(0, 1) for x in (q, k, v)),
                                              is_causal=True, scale=0.3).transpose(0, 1)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        assert (got[part].float() - want).abs().max().item() < tolerance
        begin += n


TRITON_CHECK = r"""
import torch, triton, triton.language as tl
import vllm.triton_utils as tu
tu.triton, tu.tl, tu.HAS_TRITON = triton, tl, True  # vLLM disables Triton on CPU builds; interpret it
from vllm_transmla.serving.latent_math import paged_latent_decode
from vllm_transmla.serving.triton_decode import triton_latent_decode
torch.manual_seed(0)
worst = 0.0
for heads, rank, rope in [(4, 64, 16), (16, 48, 16), (2, 512, 64)]:
    cache = torch.randn(20, 16, rank + rope)
    table = torch.randperm(20)[:15].view(3, 5).int()
    lens = torch.tensor([5, 33, 70], dtype=torch.int32)
    q = torch.randn(3, heads, rank + rope)
    a = paged_latent_decode(q, cache, table, lens, 0.1, rank)
    b = triton_latent_decode(q, cache, table, lens, 0.1, rank)
    worst = max(worst, (a - b).abs().max().item())
print("MAXDIFF", worst)
"""


def test_triton_decode_path_interpreted():
    """The CUDA decode path (vLLM's Triton MLA kernel) at non-576 widths, run by Triton's interpreter."""
    proc = subprocess.run([sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = float(proc.stdout.split("MAXDIFF")[1])
    assert worst < 1e-4


@pytest.mark.parametrize("path", ["fused", "torch"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(3, 37, 90, 24, 8), (2, 100, 161, 128, 64)])
def test_attention_log_sum_exp_matches_reference(causal, path, shape, monkeypatch):
    """`chunked_attention`'s lse is log sum exp of each row's scaled, masked scores (what vLLM's merge of
    context and new-token partials needs), with fewer queries than keys, at a small and a converted
    model's head size (d_qk 128, d_v 64), on the fused kernel and the torch path."""
    _choose_prefill_path(path, monkeypatch)
    torch.manual_seed(5)
    heads, queries, keys, dqk, dv = shape
    q, k, v = torch.randn(heads, queries, dqk), torch.randn(heads, keys, dqk), torch.randn(heads, keys, dv)
    out, lse = chunked_attention(q, k, v, 0.3, causal=causal, return_lse=True)
    scores = q @ k.transpose(1, 2) * 0.3
    if causal:  # the queries are the last 37 positions
        scores.masked_fill_(torch.ones(queries, keys, dtype=torch.bool).triu(keys - queries + 1), float("-inf"))
    assert (lse - torch.logsumexp(scores, -1)).abs().max().item() < 1e-5
    assert (out - torch.softmax(scores, -1) @ v).abs().max().item() < 1e-5


@pytest.mark.parametrize("path", ["fused", "torch"])
def test_context_chunks_merged_with_new_tokens_equal_full_causal_attention(path, monkeypatch):
    """Chunked prefill / prefix caching as vLLM's MLA layer runs it: each request's new tokens attend to its
    cached context in two workspace chunks (`run_prefill_context_chunk`) and to themselves
    (`run_prefill_new_tokens`), and vLLM's `merge_attn_states` folds the partials by their lse. The result
    equals fp32 causal SDPA over context + new tokens; a request without context passes through."""
    from vllm.v1.attention.ops.merge_attn_states import merge_attn_states

    _choose_prefill_path(path, monkeypatch)
    torch.manual_seed(7)
    heads, dqk, dv = 4, 24, 16
    context, new = [0, 5, 40], [3, 17, 1]
    full = [(torch.randn(c + n, heads, dqk), torch.randn(c + n, heads, dqk), torch.randn(c + n, heads, dv))
            for c, n in zip(context, new)]
    q = torch.cat([qf[c:] for (qf, _, _), c in zip(full, context)])
    k_new = torch.cat([kf[c:] for (_, kf, _), c in zip(full, context)])
    v_new = torch.cat([vf[c:] for (_, _, vf), c in zip(full, context)])
    backend = LatentPrefillBackend(num_heads=heads, scale=0.25, kv_lora_rank=0, qk_nope_head_dim=0,
                                   qk_rope_head_dim=0, v_head_dim=dv, vllm_config=None)
    q_starts = torch.tensor([0] + list(torch.tensor(new).cumsum(0)))
    backend.prepare_metadata(SimpleNamespace(query_start_loc=q_starts))
    suffix, suffix_lse = backend.run_prefill_new_tokens(q, k_new, v_new, return_softmax_lse=True)

    prefix = prefix_lse = None
    for lo, hi in [(0, 20), (20, 64)]:  # context tokens [lo, hi) of every request in this chunk
        spans = [(min(lo, c), min(hi, c)) for c in context]
        k_ctx = torch.cat([kf[a:b] for (_, kf, _), (a, b) in zip(full, spans)])
        v_ctx = torch.cat([vf[a:b] for (_, _, vf), (a, b) in zip(full, spans)])
        kv_starts = torch.tensor([0] + list(torch.tensor([b - a for a, b in spans]).cumsum(0)))
        chunk = SimpleNamespace(query_start_loc=q_starts, cu_seq_lens=kv_starts)
        part, part_lse = backend.run_prefill_context_chunk(chunk, q, k_ctx, v_ctx)
        if prefix is None:
            prefix, prefix_lse = part, part_lse
        else:
            merged, merged_lse = torch.empty_like(part), torch.empty_like(part_lse)
            merge_attn_states(merged, prefix, prefix_lse, part, part_lse, output_lse=merged_lse)
            prefix, prefix_lse = merged, merged_lse
    got = torch.empty_like(suffix)
    merge_attn_states(got, prefix, prefix_lse, suffix, suffix_lse)

    begin = 0
    for (qf, kf, vf), c, n in zip(full, context, new):
        mask = torch.ones(n, c + n, dtype=torch.bool).tril(c)
        want = F.scaled_dot_product_attention(qf[c:].transpose(0, 1), kf.transpose(0, 1), vf.transpose(0, 1),
                                              attn_mask=mask, scale=0.25).transpose(0, 1)
        assert (got[begin:begin + n] - want).abs().max().item() < 1e-5
        begin += n


def test_ctypes_signatures_match_the_c_prototypes():
    """The kernels' ctypes declarations are checked against the C sources at load: each exported function,
    its return type and every argument (pointers as void*)."""
    import ctypes

    from vllm_transmla.serving import cpu_kernel

    prototypes = cpu_kernel.c_prototypes()
    assert set(prototypes) == set(cpu_kernel.SIGNATURES)
    for name, signature in cpu_kernel.SIGNATURES.items():
        assert prototypes[name] == signature, name
    broken = dict(cpu_kernel.SIGNATURES, latent_decode=(ctypes.c_int, cpu_kernel.SIGNATURES["latent_decode"][1][:-1]))
    original = cpu_kernel.SIGNATURES
    try:
        cpu_kernel.SIGNATURES = broken
        with pytest.raises(RuntimeError, match="ctypes signature of latent_decode does not match"):
            cpu_kernel._declare(object())
    finally:
        cpu_kernel.SIGNATURES = original
