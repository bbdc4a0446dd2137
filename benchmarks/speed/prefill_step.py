"""Attention prefill per layer: our latent backend's prefill against vLLM's CPU attention prefill for
the original per-head cache, each next to its roofline measured in the same run.

Timed, from the layer's normed hidden states [T, hidden] to the attention output before o_proj:
* ours: q_proj, kv_a_proj, the kv_b_proj up-projection of the new tokens' latents and the causal
  attention of our prefill backend (MLAAttention's expanded path);
* original: q_proj, k_proj, v_proj and vLLM's CPU attention (`cpu_attention_with_kv_cache`).
Projections run through vLLM's CPU GEMM (oneDNN, as vLLM's linear layers do). Not timed on either side:
rotary embedding and the cache write (O(T) each). The two sides of a row are called in turn (median of
5 each) together with decode_step.py's peak probes, and the row's roofline uses the peaks measured in
those rounds: this machine is shared and its speed moves within minutes.

Shapes (defaults, the MHA pair of throughput.py): hidden 1024, 16 query heads of 64; the converted layer
has a 512 + 64 latent, qk_nope = v = 64 and rope 64 (q/k heads of 128); the original 16 KV heads x 64.

Roofline = max(FLOPs / measured matmul peak, bytes / measured read bandwidth), with causal attention
FLOPs = 2 B H T^2 (d_qk + d_v) / 2 plus 2 B T (in x out) per projection.

    python benchmarks/speed/prefill_step.py                        # fp32, T = 512-4096, batch 1 and 4
    python benchmarks/speed/prefill_step.py --dtype bfloat16 --tokens 1024 --out /tmp/p.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from decode_step import peaks_after, roofline_row, save_results, start_run, vllm_paged_attention


class Projection:
    """A bias-free linear layer the way vLLM runs it on CPU (oneDNN where it takes the dtype, else torch's
    linear, as vLLM's `dispatch_cpu_unquantized_gemm` does); weight [out, in]."""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype, gen: torch.Generator):
        from vllm import _custom_ops as ops

        self.weight = (torch.randn(out_features, in_features, generator=gen) * in_features ** -0.5).to(dtype)
        self.handler = None
        if ops._supports_onednn:
            try:
                self.handler = ops.create_onednn_mm(self.weight.t(), 32)
            except RuntimeError:  # e.g. bf16 without AVX512: vLLM falls back to torch's linear too
                pass

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from vllm import _custom_ops as ops

        if self.handler is None:
            return torch.nn.functional.linear(x, self.weight)
        return ops.onednn_mm(self.handler, x, None)

    def flops(self, rows: int) -> int:
        return 2 * rows * self.weight.numel()


def ours_case(batch: int, tokens: int, hidden_size: int, heads: int, rank: int, rope: int, nope: int, v_dim: int,
              dtype: torch.dtype) -> dict:
    from vllm_transmla.serving.backend import LatentPrefillBackend

    gen = torch.Generator().manual_seed(0)
    total = batch * tokens
    hidden = torch.randn(total, hidden_size, generator=gen).to(dtype)
    q_proj = Projection(heads * (nope + rope), hidden_size, dtype, gen)
    kv_a = Projection(rank + rope, hidden_size, dtype, gen)
    kv_b = Projection(heads * (nope + v_dim), rank, dtype, gen)
    prefill = LatentPrefillBackend(num_heads=heads, scale=(nope + rope) ** -0.5, kv_lora_rank=rank,
                                   qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v_dim, vllm_config=None)
    prefill.prepare_metadata(SimpleNamespace(query_start_loc=torch.arange(batch + 1) * tokens))
    out = torch.empty(total, heads, v_dim, dtype=dtype)

    def fn():  # the projections, then what MLAAttention.forward_mha does before and in the prefill backend
        q = q_proj(hidden).view(total, heads, nope + rope)
        latent, k_pe = kv_a(hidden).split([rank, rope], dim=-1)
        kv_nope = kv_b(latent.contiguous()).view(total, heads, nope + v_dim)
        k_nope, v = kv_nope.split([nope, v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None].expand(-1, heads, -1)], dim=-1)
        prefill.run_prefill_new_tokens(q, k, v, return_softmax_lse=False, out=out)

    flops = (batch * heads * tokens**2 * (nope + rope + v_dim)
             + sum(p.flops(total) for p in (q_proj, kv_a, kv_b)))
    weights = sum(p.weight.numel() for p in (q_proj, kv_a, kv_b))
    size = dtype.itemsize
    return {"fn": fn, "flops": flops,
            "bytes": size * (hidden.numel() + weights + total * (rank + rope) + out.numel())}


def original_case(batch: int, tokens: int, hidden_size: int, heads: int, kv_heads: int, head_dim: int,
                  dtype: torch.dtype, block: int = 128) -> dict:
    gen = torch.Generator().manual_seed(0)
    total = batch * tokens
    hidden = torch.randn(total, hidden_size, generator=gen).to(dtype)
    projections = [Projection(heads * head_dim, hidden_size, dtype, gen),
                   Projection(kv_heads * head_dim, hidden_size, dtype, gen),
                   Projection(kv_heads * head_dim, hidden_size, dtype, gen)]
    attend, isa = vllm_paged_attention(batch, tokens, tokens, heads, kv_heads, head_dim, dtype, gen, block)

    def fn():
        q, _, _ = (p(hidden) for p in projections)  # k and v would go to the cache, which is not timed
        attend(q.view(total, heads, head_dim))
    size = dtype.itemsize
    flops = batch * heads * tokens**2 * 2 * head_dim + sum(p.flops(total) for p in projections)
    weights = sum(p.weight.numel() for p in projections)
    return {"fn": fn, "flops": flops,
            "bytes": size * (hidden.numel() + weights + 2 * total * kv_heads * head_dim + total * heads * head_dim),
            "isa": isa}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16, help="KV heads of the original layer")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rank", type=int, default=512)
    parser.add_argument("--rope", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    parser.add_argument("--rounds", type=int, default=5, help="calls of each side per row, in turn")
    parser.add_argument("--out", default=str(Path(__file__).with_name("prefill_step.json")))
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    probes, before = start_run()
    runs = []
    for batch in args.batches:
        for tokens in args.tokens:
            named = {"ours (latent backend prefill)": ours_case(batch, tokens, args.hidden, args.heads, args.rank,
                                                                args.rope, args.head_dim, args.head_dim, dtype),
                     "original (vLLM CPU attention)": original_case(batch, tokens, args.hidden, args.heads,
                                                                    args.kv_heads, args.head_dim, dtype)}
            pair = roofline_row(named, probes, before, args.rounds, batch=batch, tokens=tokens)
            for record in pair:
                print(json.dumps(record), flush=True)
            pair[0]["original_over_ours"] = pair[1]["seconds"] / pair[0]["seconds"]
            runs += pair
    peaks = peaks_after(before, probes, "two sides")
    save_results(args, peaks, runs, x="tokens", xlabel="prompt tokens per request",
                 ylabel="ms per prefill, one layer's attention", title="batch {batch}, {dtype}")


if __name__ == "__main__":
    main()
