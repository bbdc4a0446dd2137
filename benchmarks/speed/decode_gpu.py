"""Attention decode step on a CUDA GPU, torch only (no vLLM needed): absorbed MLA over a 512 + 64 latent
against per-head attention over the original cache, each next to its roofline, and the speedup next to
the KV-bytes bound (the paper's measure: its vLLM decode reached ~75% of that bound).

This is the kernel-level half of the issue's GPU run, for machines that have torch but no vLLM build
(the project's device machines have no vLLM and cannot fetch one). With vLLM installed, run
`speed/throughput.py` and `speed/serve.py` unchanged for the engine-level numbers.

* original: `F.scaled_dot_product_attention` (flash) for one query token over [B, n_kv, S, d] K and V;
* MLA, absorbed: scores = q [B, H, R + D] . latent [B, S, R + D], softmax in fp32, out = p . latent[..., :R]
  (two batched GEMMs, the latent read twice) - the plain-torch form of the absorbed decode;
* MLA, Triton: one flash-decoding kernel (`_triton_decode`) that reads each latent tile once for
  both the scores and the values, with split-K over the context.

`--cuda-graphs` times graph replays (as vLLM runs its GPU decode), `--autotune` lets each (batch,
context) pick the kernel's launch settings.

    python benchmarks/speed/decode_gpu.py --cuda-graphs --autotune --out decode_gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F


def timed(fn, repeat: int = 20, warmup: int = 5) -> float:
    """Median seconds of fn() on the GPU (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def replayed(fn):
    """fn captured in a CUDA graph, as vLLM captures its decode steps: a replay is one launch, so the
    per-kernel launch cost (~100 us floor at short contexts) drops out on both sides. Returns a function
    that replays the graph and gives its (static) output."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compile Triton and settle the allocator outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    return replay


def device_peaks() -> dict:
    """bf16 matmul FLOP/s and HBM read bandwidth, measured now."""
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    flops = 2 * n**3 / timed(lambda: a @ b, repeat=10)
    big = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    read = big.numel() * 2 / timed(lambda: big.sum(dtype=torch.float32))
    return {"bf16_matmul_flops": flops, "read_bytes_per_s": read, "device": torch.cuda.get_device_name()}


def latent_decode_torch(q: torch.Tensor, latent: torch.Tensor, scale: float, rank: int) -> torch.Tensor:
    """q [B, H, R + D], latent [B, S, R + D] -> [B, H, R]."""
    scores = torch.bmm(q, latent.transpose(1, 2)).float() * scale
    return torch.bmm(scores.softmax(-1).to(latent.dtype), latent[..., :rank])


def _triton_configs(heads: int) -> list:
    """The launch settings `--autotune` tries: query heads per program (each program reads its latent
    tiles once for all of them), tokens per tile, warps and pipeline stages."""
    import triton

    return [triton.Config({"HB": hb, "TILE": tile}, num_warps=warps, num_stages=stages)
            for hb in (16, 32) if hb <= heads and heads % hb == 0
            for tile in (32, 64, 128) for warps in (4, 8) for stages in (2, 3)]


def _triton_decode(heads: int, autotune: bool, max_split: int = 2048):
    """A flash-decoding kernel over the latent; with autotune, each (batch, context) picks its fastest
    launch settings once (recorded by `best_config`)."""
    import triton
    import triton.language as tl

    def split_kernel(q_ptr, kv_ptr, out_ptr, lse_ptr, B, S, SPLIT, scale, H: tl.constexpr, R: tl.constexpr,
                     D: tl.constexpr, TILE: tl.constexpr, HB: tl.constexpr):
        # one program: one sequence, HB query heads, one SPLIT-token range; the latent tile is loaded
        # once and used for the scores (over R + D) and the values (over R)
        b, hb, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        heads = hb * HB + tl.arange(0, HB)
        r = tl.arange(0, R)
        d = tl.arange(0, D)
        q_base = q_ptr + (b * H + heads[:, None]) * (R + D)
        q_r = tl.load(q_base + r[None, :])
        q_d = tl.load(q_base + R + d[None, :])
        m = tl.full([HB], -float("inf"), tl.float32)
        denom = tl.zeros([HB], tl.float32)
        acc = tl.zeros([HB, R], tl.float32)
        for t0 in range(sp * SPLIT, sp * SPLIT + SPLIT, TILE):
            t = t0 + tl.arange(0, TILE)
            ok = t < S
            row = kv_ptr + (b * S + t[:, None]) * (R + D)
            c_r = tl.load(row + r[None, :], mask=ok[:, None], other=0.0)
            c_d = tl.load(row + R + d[None, :], mask=ok[:, None], other=0.0)
            s = (tl.dot(q_r, tl.trans(c_r)) + tl.dot(q_d, tl.trans(c_d))) * scale
            s = tl.where(ok[None, :], s, -float("inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            denom = denom * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(c_r.dtype), c_r)
            m = m_new
        n_split = tl.num_programs(2)
        o = out_ptr + ((b * H + heads[:, None]) * n_split + sp) * R + r[None, :]
        tl.store(o, acc / denom[:, None])
        tl.store(lse_ptr + (b * H + heads) * n_split + sp, m + tl.log(denom))

    kernel = triton.jit(split_kernel)
    if autotune:
        # B and S are the key: the grid, and so the best settings, change with batch and context
        kernel = triton.autotune(_triton_configs(heads), key=["B", "S"])(kernel)
    fixed = {"HB": min(heads, 16), "TILE": 64, "num_warps": 8, "num_stages": 2}  # the settings before --autotune

    def run(q: torch.Tensor, latent: torch.Tensor, scale: float, rank: int) -> torch.Tensor:
        batch, heads, width = q.shape
        seq = latent.shape[1]
        # enough programs to fill the GPU twice over (small batches, short contexts), at most max_split
        # tokens each so long contexts keep few partials to merge
        split = max_split
        while split > 128 and batch * math.ceil(seq / split) < 2 * sms:
            split //= 2
        n_split = math.ceil(seq / split)
        part = torch.empty(batch, heads, n_split, rank, device=q.device, dtype=torch.float32)
        lse = torch.empty(batch, heads, n_split, device=q.device, dtype=torch.float32)
        grid = lambda meta: (batch, heads // meta["HB"], n_split)  # noqa: E731
        settings = {} if autotune else fixed
        kernel[grid](q, latent, part, lse, batch, seq, split, scale, H=heads, R=rank, D=width - rank, **settings)
        weight = torch.softmax(lse, -1)  # merge the splits by their log-sum-exp
        return (part * weight[..., None]).sum(2).to(q.dtype)

    def settings() -> dict:
        if not autotune:
            return fixed
        best = kernel.best_config
        return {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}

    run.settings = settings
    sms = torch.cuda.get_device_properties(0).multi_processor_count  # read once: the call costs ~50 us
    return run


def measure(batch: int, context: int, args, peaks: dict, triton_decode) -> dict:
    """One (batch, context): each case's seconds, FLOPs, bytes, roofline and efficiency; MLA speedups."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=gen)
    width = args.rank + args.rope
    q = torch.randn(batch, args.heads, width, **kw)
    latent = torch.randn(batch, context, width, **kw) * 0.5
    scale = (128 + args.rope) ** -0.5
    wrap = replayed if args.cuda_graphs else (lambda fn: fn)
    triton_mla = wrap(lambda: triton_decode(q, latent, scale, args.rank))
    reference = latent_decode_torch(q.float(), latent.float(), scale, args.rank)
    error = (triton_mla().float() - reference).abs().max().item()
    assert error < 2e-2, f"Triton latent decode differs from the fp32 reference by {error}"
    del reference
    mla_bytes = batch * context * width * 2
    mla_flops = 2 * batch * args.heads * context * (width + args.rank)
    qh = torch.randn(batch, args.heads, 1, args.head_dim, **kw)
    k = torch.randn(batch, args.kv_heads, context, args.head_dim, **kw)
    v = torch.randn_like(k)
    gqa = args.heads != args.kv_heads
    cases = {
        "original (SDPA flash)": (wrap(lambda: F.scaled_dot_product_attention(qh, k, v, enable_gqa=gqa)),
                                  4 * batch * args.heads * context * args.head_dim,
                                  2 * batch * context * args.kv_heads * args.head_dim * 2),
        "MLA absorbed (torch bmm)": (wrap(lambda: latent_decode_torch(q, latent, scale, args.rank)), mla_flops,
                                     mla_bytes),
        "MLA absorbed (Triton)": (triton_mla, mla_flops, mla_bytes),
    }
    row = {"batch": batch, "context": context, "triton_max_abs_error": error,
           "triton_settings": triton_decode.settings()}
    for name, (fn, flops, nbytes) in cases.items():
        seconds = timed(fn)
        roofline = max(flops / peaks["bf16_matmul_flops"], nbytes / peaks["read_bytes_per_s"])
        row[name] = {"seconds": seconds, "flops": flops, "bytes": nbytes, "roofline_seconds": roofline,
                     "efficiency": roofline / seconds}
    bytes_ratio = 2 * args.kv_heads * args.head_dim / width
    for name in ("MLA absorbed (torch bmm)", "MLA absorbed (Triton)"):
        row[name]["speedup"] = row["original (SDPA flash)"]["seconds"] / row[name]["seconds"]
        row[name]["share_of_bytes_bound"] = row[name]["speedup"] / bytes_ratio
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rank", type=int, default=512)
    parser.add_argument("--rope", type=int, default=64)
    parser.add_argument("--autotune", action="store_true",
                        help="let each (batch, context) pick the Triton kernel's heads per program, tile, "
                             "warps and stages (default: 16 heads, 64-token tiles, 8 warps, 2 stages)")
    parser.add_argument("--max-split", type=int, default=2048,
                        help="most context tokens one Triton program covers (fewer partials to merge)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="time CUDA-graph replays of every case (as vLLM's decode runs), not eager launches")
    parser.add_argument("--out", default=str(Path(__file__).with_name("decode_gpu.json")))
    args = parser.parse_args()
    assert torch.cuda.is_available(), "decode_gpu.py needs a CUDA GPU"
    peaks = device_peaks()
    print(json.dumps(peaks), flush=True)
    triton_decode = _triton_decode(args.heads, args.autotune, args.max_split)
    bytes_ratio = 2 * args.kv_heads * args.head_dim / (args.rank + args.rope)
    runs = []
    for batch in args.batches:
        for context in args.contexts:
            runs.append(measure(batch, context, args, peaks, triton_decode))
            print(json.dumps(runs[-1]), flush=True)
    result = {"peaks": peaks, "shape": vars(args), "kv_bytes_ratio": bytes_ratio, "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.out).with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    """Speedup of each MLA decode over the original's, against context, with the bytes bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in sorted({r["batch"] for r in result["runs"]}):
        runs = [r for r in result["runs"] if r["batch"] == batch]
        for name, style in (("MLA absorbed (Triton)", "o-"), ("MLA absorbed (torch bmm)", "s--")):
            ax.plot([r["context"] for r in runs], [r[name]["speedup"] for r in runs], style,
                    label=f"{name}, batch {batch}")
    ax.axhline(result["kv_bytes_ratio"], color="gray", ls=":", label="KV-bytes bound")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode step speedup over the original")
    shape = result["shape"]
    ax.set_title(f"{result['peaks']['device']}: {shape['heads']} heads x {shape['head_dim']}, "
                 f"{shape['kv_heads']} KV heads", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
