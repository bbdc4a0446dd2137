"""The latent attention math of the serving backend, in torch and our CPU kernels, with no vLLM import:
absorbed decode over a paged latent cache, multi-token decode rows, and prefill attention (causal, or over
a chunk of cached context, with the log-sum-exp vLLM merges parts by). Which implementation runs is an
explicit `AttentionPaths` argument (None: `DEFAULT_PATHS`, what the backend uses unless an instance is
given others), not switches flipped in module globals.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import cpu_kernel


@dataclass(frozen=True)
class AttentionPaths:
    """Which code runs: the fused C kernels where they can (`cpu_kernel`), else torch, with these sizes."""

    cpu_kernel: bool = True  # where cpu_kernel.available() (x86 AVX2, a compiler, not switched off)
    batched_decode_bytes: int = 32 * 2**20  # the padded batch decode's latent workspace, at most
    decode_chunk_tokens: int = 2048  # longer sequences decode chunk by chunk (flash-decoding)
    prefill_score_bytes: int = 32 * 2**20  # the score block of one query chunk, at most
    prefill_rows: int = 128  # query rows per chunk: fewer waste matmul speed, more the causal half's work


DEFAULT_PATHS = AttentionPaths()  # cpu_kernel.available() already honours VLLM_TRANSMLA_CPU_KERNEL=0
_WORKSPACES: dict = {}


def paged_latent_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float, kv_lora_rank: int,
                        paths: AttentionPaths | None = None) -> torch.Tensor:
    """Absorbed MLA decode, one query token per sequence.

    q [B, H, R + D] (latent query), kv_cache [num_blocks, block_size, R + D], block_table [B, max_blocks],
    seq_lens [B] -> out [B, H, R] = softmax(q . latent * scale) @ c_kv over each sequence's tokens.

    On x86 CPUs it runs our fused C kernel (`cpu_kernel.py`), else `torch_latent_decode`."""
    paths = paths or DEFAULT_PATHS
    if paths.cpu_kernel and kv_cache.device.type == "cpu" and kv_cache.is_contiguous() and cpu_kernel.available():
        return cpu_kernel.fused_latent_decode(q, kv_cache, block_table, seq_lens, scale, kv_lora_rank, workspace)
    return torch_latent_decode(q, kv_cache, block_table, seq_lens, scale, kv_lora_rank, paths)


def torch_latent_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float, kv_lora_rank: int,
                        paths: AttentionPaths | None = None) -> torch.Tensor:
    """`paged_latent_decode` in torch ops (any device).

    Small batches x contexts run as one padded batch; long ones a sequence at a time (no padding, and
    the gathered latent of one sequence stays small). Gathered latents land in reused workspaces:
    fresh multi-MB tensors cost more in page faults than the arithmetic (benchmarks/speed/decode_step.py).
    """
    paths = paths or DEFAULT_PATHS
    batch, heads, width = q.shape
    block_size = kv_cache.shape[1]
    compute = compute_dtype(q.dtype, q.device)
    q = q.to(compute)
    lens = seq_lens.tolist()
    max_len = max(lens)
    if batch * max_len * width * 4 <= paths.batched_decode_bytes:
        max_blocks = -(-max_len // block_size)
        latent = gather(kv_cache, block_table[:, :max_blocks].reshape(-1), compute)
        latent = latent.view(batch, max_blocks * block_size, width)[:, :max_len]  # [B, S, R + D]
        scores = torch.bmm(q, latent.transpose(1, 2)).float() * scale  # [B, H, S]
        pad = torch.arange(max_len, device=q.device)[None, :] >= seq_lens[:, None]
        scores.masked_fill_(pad[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(compute)
        return torch.bmm(probs, latent[..., :kv_lora_rank]).to(kv_cache.dtype)
    out = torch.empty(batch, heads, kv_lora_rank, dtype=kv_cache.dtype, device=q.device)
    chunk_blocks = max(1, paths.decode_chunk_tokens // block_size)
    for b, length in enumerate(lens):
        blocks = block_table[b, : -(-length // block_size)]
        if blocks.numel() <= chunk_blocks:
            latent = gather(kv_cache, blocks, compute)[:length]  # [S, R + D]
            scores = (q[b] @ latent.T).float() * scale  # [H, S]
            probs = torch.softmax(scores, dim=-1).to(compute)
            out[b] = probs @ latent[:, :kv_lora_rank]
        else:
            out[b] = _chunked_sequence(q[b], kv_cache, blocks, length, scale, kv_lora_rank, chunk_blocks, compute)
    return out


def _chunked_sequence(q: torch.Tensor, kv_cache: torch.Tensor, blocks: torch.Tensor, length: int, scale: float,
                      kv_lora_rank: int, chunk_blocks: int, compute: torch.dtype) -> torch.Tensor:
    """One long sequence, chunk by chunk with an online softmax (flash-decoding): q [H, R + D] -> [H, R].

    A chunk's gathered latent stays in the CPU caches between its two matmuls; the whole sequence's
    (19 MB in fp32 at 8K x 576) would not."""
    block_size = kv_cache.shape[1]
    heads = q.shape[0]
    acc = torch.zeros(heads, kv_lora_rank, dtype=torch.float32, device=q.device)
    running_max = torch.full((heads, 1), float("-inf"), device=q.device)
    running_sum = torch.zeros(heads, 1, device=q.device)
    for start in range(0, blocks.numel(), chunk_blocks):
        chunk = blocks[start:start + chunk_blocks]
        tokens = min(chunk.numel() * block_size, length - start * block_size)
        latent = gather(kv_cache, chunk, compute)[:tokens]  # [T, R + D]
        scores = (q @ latent.T).float() * scale  # [H, T]
        new_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True))
        rescale = torch.exp(running_max - new_max)
        probs = torch.exp(scores - new_max)
        running_sum = running_sum * rescale + probs.sum(dim=-1, keepdim=True)
        acc = acc * rescale + (probs.to(compute) @ latent[:, :kv_lora_rank]).float()
        running_max = new_max
    return (acc / running_sum).to(kv_cache.dtype)


def workspace(name: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A flat buffer reused across calls (grown when too small)."""
    key = (name, dtype, str(device))
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        buf = _WORKSPACES[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def gather(kv_cache: torch.Tensor, blocks: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """The cache blocks `blocks` [N] as [N * block_size, R + D] in `compute` dtype, in workspaces."""
    n, (block_size, width) = blocks.numel(), kv_cache.shape[1:]
    raw = workspace("raw", n * block_size * width, kv_cache.dtype, kv_cache.device).view(n, block_size, width)
    torch.index_select(kv_cache, 0, blocks.long(), out=raw)
    if compute == kv_cache.dtype:
        return raw.view(n * block_size, width)
    converted = workspace("converted", n * block_size * width, compute, kv_cache.device)
    return converted.view(n * block_size, width).copy_(raw.view(n * block_size, width))


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the decode matmuls run in: the cache's, except 16-bit caches on a CPU without native
    bf16/fp16 matmul (no AVX512-BF16 / AMX), where torch emulates them ~60x slower than fp32 (measured
    by benchmarks/speed/decode_step.py) - converting the gathered latent to fp32 costs far less."""
    if device.type != "cpu" or dtype == torch.float32:
        return dtype
    return dtype if _native_half_matmul() else torch.float32


@functools.cache
def _native_half_matmul() -> bool:
    # torch's CPU capability: "AVX512" (or an AMX/BF16 build) has native 16-bit dot products; "AVX2" not.
    return "AVX512" in torch.backends.cpu.get_cpu_capability()


def per_token_rows(query_start_loc: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                   num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-token decode as one-token decode: request r's n_r new tokens (already in the cache) become
    n_r rows that share its blocks, token i seeing the first seq_lens[r] - n_r + 1 + i cached tokens
    (causal). query_start_loc [R + 1], block_table [R, max_blocks], seq_lens [R] ->
    block_table [num_tokens, max_blocks], seq_lens [num_tokens]."""
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    request = torch.repeat_interleave(torch.arange(query_lens.shape[0], device=query_lens.device), query_lens,
                                      output_size=num_tokens)
    index_in_query = torch.arange(num_tokens, device=query_lens.device) - query_start_loc[request]
    lens = seq_lens[request] - query_lens[request] + 1 + index_in_query
    return block_table[request], lens.to(seq_lens.dtype)


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = True,
                      return_lse: bool = False, paths: AttentionPaths | None = None
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of one request, q [H, Tq, d_qk], k [H, Tk, d_qk], v [H, Tk, d_v] -> out [H, Tq, d_v]
    (and lse [H, Tq], the log-sum-exp of each row's scaled scores, when asked), on CPU.

    Causal: the queries are the last Tq of the Tk positions (query i sees keys 0 .. Tk - Tq + i), as for
    new tokens (Tk = Tq); not causal: every query sees every key, as for a chunk of cached context.
    On x86 CPUs with AVX2 it runs our fused C kernel (`cpu_kernel.fused_prefill_attention`: flash
    attention over 32-key tiles). The torch path it keeps elsewhere: query rows go in chunks; a causal
    chunk attends to the keys up to its last row only (the masked half is never computed but for the
    chunk's own diagonal block) with two batched matmuls around torch's fused softmax, in place in a
    reused score workspace, 3-4x faster than torch's CPU SDPA kernel here (benchmarks/speed/prefill_step.py).
    16-bit inputs are computed in fp32 where the CPU has no native 16-bit matmul."""
    paths = paths or DEFAULT_PATHS
    heads, queries, _ = q.shape
    keys = k.shape[1]
    offset = keys - queries if causal else 0  # key index of query 0's own position
    assert offset >= 0, "causal attention needs at least as many keys as queries"
    compute = compute_dtype(q.dtype, q.device)
    if keys == 0:  # a request with no context in this chunk: no weight in the merge
        out = torch.zeros(heads, queries, v.shape[-1], dtype=compute, device=q.device)
        return (out, torch.full((heads, queries), float("-inf"), device=q.device)) if return_lse else out
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    if paths.cpu_kernel and cpu_kernel.prefill_supported(q, v):  # fused C kernel: scores never leave L1
        out, lse = cpu_kernel.fused_prefill_attention(q, k, v, scale, causal, return_lse, workspace)
        return (out, lse) if return_lse else out
    q = q * scale
    key_t = k.transpose(1, 2)  # [H, d_qk, Tk]
    out = torch.empty(heads, queries, v.shape[-1], dtype=compute, device=q.device)
    lse = torch.empty(heads, queries, dtype=torch.float32, device=q.device) if return_lse else None
    # 128 rows: the chunk's diagonal block wastes little (6% of the work at T = 2K) and the matmuls
    # keep their speed (benchmarks/speed/prefill_step.py); fewer rows when the score block gets large
    rows = max(16, min(paths.prefill_rows, paths.prefill_score_bytes // (heads * keys * compute.itemsize)))
    for start in range(0, queries, rows):
        end = min(queries, start + rows)
        seen = offset + end if causal else keys  # keys the chunk's last row sees
        scores = workspace("scores", heads * (end - start) * seen, compute, q.device).view(heads, end - start, seen)
        torch.bmm(q[:, start:end], key_t[:, :, :seen], out=scores)
        if causal:
            future = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).triu_(1)
            scores[:, :, offset + start:seen].masked_fill_(future, float("-inf"))
        if lse is not None:  # before the softmax overwrites the scores
            lse[:, start:end] = torch.logsumexp(scores, dim=-1)
        # one pass per row (max, exp and sum, scale) where max/sub/exp/sum/div each swept the whole block;
        # every row keeps its diagonal entry, so none is all -inf
        torch.ops.aten._softmax.out(scores, -1, False, out=scores)
        torch.bmm(scores, v[:, :seen], out=out[:, start:end])
    return (out, lse) if return_lse else out


def ragged_attention(q, k, v, q_starts: list[int], kv_starts: list[int], scale: float, causal: bool,
                     return_lse: bool, out: torch.Tensor | None = None, paths: AttentionPaths | None = None):
    """Per-request attention over ragged (concatenated) tokens: request r's queries q[q_starts[r]:q_starts[r+1]]
    attend to its keys k[kv_starts[r]:kv_starts[r+1]]. q/k [Tq|Tk, H, d_qk], v [Tk, H, d_v] ->
    out [Tq, H, d_v] (and lse [H, Tq])."""
    result = out if out is not None else q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device) if return_lse else None
    use_sdpa = q.device.type != "cpu" and causal and not return_lse
    for r in range(len(q_starts) - 1):
        qs, ks = slice(q_starts[r], q_starts[r + 1]), slice(kv_starts[r], kv_starts[r + 1])
        if qs.start == qs.stop:
            continue
        # [T, H, d] -> [H, T, d]
        q_r, k_r, v_r = q[qs].transpose(0, 1), k[ks].transpose(0, 1), v[ks].transpose(0, 1)
        if use_sdpa:
            attn = sdpa_causal(q_r, k_r, v_r, scale)
        elif return_lse:
            attn, lse[:, qs] = chunked_attention(q_r, k_r, v_r, scale, causal=causal, return_lse=True, paths=paths)
        else:
            attn = chunked_attention(q_r, k_r, v_r, scale, causal=causal, paths=paths)
        result[qs] = attn.transpose(0, 1)
    return (result, lse) if return_lse else result
