"""Attention decode step per layer: our latent backend (its fused C kernel and its torch fallback), vLLM's
stock CPU MLA kernel (576 only) and vLLM's CPU attention for the original (per-head) cache, each next to
its roofline measured in the same run.

Shapes (defaults): 16 query heads; MLA latent 512 + 64 (the stock kernel's only size); the original an
MHA layer of 16 KV heads x 64 (2048 cached values per token) or, with --kv-heads 4, a 4:1 GQA layer.
Caches are bf16 with shuffled block tables (as a busy engine leaves them).

Roofline of a step = max(FLOPs / measured matmul peak (the faster of bf16 and fp32), cache bytes / measured
read bandwidth):
* absorbed MLA: FLOPs = 2 B H S (R + D) + 2 B H S R, bytes = B S (R + D) * 2 (the latent read once);
* per-head attention: FLOPs = 4 B H S d, bytes = 2 B S n_kv d * 2.

    python benchmarks/speed/decode_step.py                      # contexts 1K-8K, batch 8 and 16
    python benchmarks/speed/decode_step.py --contexts 2048 --batches 8 --out /tmp/d.json

The kernels of one table row (batch, context) are called in turn, round after round, together with two
probes of the machine (an fp32 2048^3 matmul and a 256 MiB read): each row's roofline uses the peaks its
own rounds measured (fastest probe call), and its kernels' times are medians. This machine is shared and
its speed moves within minutes; timed in turn, a slow spell falls on every kernel of a row and on its
peaks alike.

Writes JSON (every measurement, the peaks, efficiency = roofline / measured) and a plot.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def time_in_turn(fns: list, repeat: int = 5, warmup: int = 1) -> list[list[float]]:
    """Seconds of every call of each fn, called in turn (a b c a b c ...) after `warmup` calls each, so
    that a slow spell of a shared machine falls on all of them rather than on one."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def fastest(fn, repeat: int = 5, warmup: int = 2) -> float:
    """Least seconds of fn() (for peaks: what the machine can do, not what a noisy moment gave)."""
    return min(time_in_turn([fn], repeat, warmup)[0])


def peak_probes() -> dict:
    """{peak name: (fn, work)}: an fp32 2048^3 matmul (work in FLOPs) and a sum over 256 MiB of fp32, far
    above the caches (work in bytes). Peak = work / fastest call."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    big = torch.randn(256 * 2**20 // 4)
    return {"fp32_matmul_flops": (lambda: a @ b, 2 * n**3),
            "read_bytes_per_s": (lambda: big.sum(), big.numel() * 4)}


def machine_peaks(probes: dict) -> dict:
    """bf16 / fp32 matmul FLOP/s and memory read bandwidth, measured now (fastest of 5 calls each); fp32
    and the bandwidth come from `probes` (see `peak_probes`)."""
    # bf16 at 512: CPUs without native bf16 emulate it at ~0.3 GFLOP/s, where 2048^3 takes a minute a call
    n = 512
    a, b = torch.randn(n, n).bfloat16(), torch.randn(n, n).bfloat16()
    peaks = {"bf16_matmul_flops": 2 * n**3 / fastest(lambda: a @ b)}
    for name, (fn, work) in probes.items():
        peaks[name] = work / fastest(fn)
    return {**peaks, "threads": torch.get_num_threads()}


def roofline_row(named: dict[str, dict], probes: dict, before: dict, repeat: int, **labels) -> list[dict]:
    """One table row: the named cases (each {"fn", "flops", "bytes", ...}; "fn" is removed) and the peak
    probes called in turn, `repeat` rounds. Returns each case's record (see `against_roofline`: the median
    seconds) against the roofline of the peaks these rounds measured (work / fastest probe call), which
    every record also keeps as "row_peaks"."""
    fns = [case.pop("fn") for case in named.values()] + [fn for fn, _ in probes.values()]
    samples = time_in_turn(fns, repeat)
    row_peaks = {name: work / min(spent) for (name, (_, work)), spent in zip(probes.items(), samples[len(named):])}
    # The compute peak: the faster of bf16 and fp32 matmul (a 16-bit cache may be computed on in either;
    # CPUs without native bf16 emulate it far below fp32, and then fp32 is the peak).
    peak_flops = max(before["bf16_matmul_flops"], row_peaks["fp32_matmul_flops"])
    return [against_roofline({**case, "seconds": median(spent)}, row_peaks, peak_flops, kernel=name, **labels,
                             row_peaks=row_peaks)
            for (name, case), spent in zip(named.items(), samples)]


def peaks_after(before: dict, probes: dict, what: str) -> dict:
    """Measure the peaks again after the runs; the JSON's "peaks" (both measurements; each row's roofline
    used its own, see `roofline_row`)."""
    after = machine_peaks(probes)
    print(json.dumps({"peaks_before": before, "peaks_after": after}), flush=True)
    return {"measured_before_runs": before, "measured_after_runs": after,
            "rooflines": f"per row: peaks measured in turn with the row's {what} (row_peaks)"}


def _block_table(batch: int, blocks_per_seq: int, gen) -> torch.Tensor:
    return torch.randperm(batch * blocks_per_seq, generator=gen).view(batch, blocks_per_seq).int()


def mla_case(batch: int, context: int, heads: int, rank: int, rope: int, kernel: str, block: int = 16) -> dict:
    from vllm_transmla.serving import cpu_kernel
    from vllm_transmla.serving.latent_math import paged_latent_decode, torch_latent_decode

    gen = torch.Generator().manual_seed(0)
    blocks = context // block
    cache = (torch.randn(batch * blocks, block, rank + rope, generator=gen) * 0.5).bfloat16()
    table = _block_table(batch, blocks, gen)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    q = torch.randn(batch, heads, rank + rope, generator=gen).bfloat16()
    scale = (128 + rope) ** -0.5
    if kernel == "ours":
        assert cpu_kernel.available(), "our fused CPU kernel did not build here (see the log)"
        fn = lambda: paged_latent_decode(q, cache, table, seq_lens, scale, rank)  # noqa: E731
    elif kernel == "ours-torch":
        fn = lambda: torch_latent_decode(q, cache, table, seq_lens, scale, rank)  # noqa: E731
    else:
        out = torch.zeros(batch, heads, rank, dtype=q.dtype)
        fn = lambda: torch.ops._C.mla_decode_kvcache(out, q, cache, scale, table, seq_lens)  # noqa: E731
    flops = 2 * batch * heads * context * (rank + rope) + 2 * batch * heads * context * rank
    return {"fn": fn, "flops": flops, "bytes": batch * context * (rank + rope) * 2}


def start_run() -> tuple:
    """Load vLLM's CPU kernels, build the peak probes and measure the machine before any row:
    (probes, peaks before)."""
    import vllm._custom_ops  # noqa: F401  (registers vLLM's CPU kernels as torch ops)

    probes = peak_probes()
    before = machine_peaks(probes)
    print(json.dumps(before), flush=True)
    return probes, before


def vllm_paged_attention(batch: int, context: int, queries: int, heads: int, kv_heads: int, head_dim: int,
                         dtype: torch.dtype, gen, block: int = 128):
    """vLLM's CPU attention (causal) over a random paged cache of `context` tokens per sequence.

    Returns (attend, isa): attend(q) takes q [batch * queries, heads, head_dim], the last `queries` tokens
    of each sequence, and writes the output into a reused [batch * queries, heads, head_dim] tensor.
    """
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    blocks = -(-context // block)
    cache = (torch.randn(batch * blocks, kv_heads, block * 2, head_dim, generator=gen) * 0.5).to(dtype)
    key_cache, value_cache = cache.chunk(2, dim=2)
    table = _block_table(batch, blocks, gen)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    query_start = (torch.arange(batch + 1) * queries).int()
    out = torch.empty(batch * queries, heads, head_dim, dtype=dtype)
    isa = _get_attn_isa(dtype, block, head_dim)
    meta = ops.cpu_attn_get_scheduler_metadata(num_reqs=batch, num_heads=heads, num_kv_heads=kv_heads,
                                               head_dim=head_dim, seq_lens=seq_lens, dtype=dtype,
                                               query_start_loc=query_start, causal=True, sliding_window_size=-1,
                                               isa=isa, enable_kv_split=False)

    def attend(q: torch.Tensor) -> torch.Tensor:
        ops.cpu_attention_with_kv_cache(query=q, key_cache=key_cache, value_cache=value_cache, output=out,
                                        query_start_loc=query_start, seq_lens=seq_lens, scale=head_dim ** -0.5,
                                        causal=True, alibi_slopes=None, sliding_window=-1, block_table=table,
                                        softcap=0.0, scheduler_metadata=meta, s_aux=None)
        return out
    return attend, isa


def mha_case(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, block: int = 128) -> dict:
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16
    attend, isa = vllm_paged_attention(batch, context, 1, heads, kv_heads, head_dim, dtype, gen, block)
    q = torch.randn(batch, heads, head_dim, generator=gen).to(dtype)
    return {"fn": lambda: attend(q), "flops": 4 * batch * heads * context * head_dim,
            "bytes": 2 * batch * context * kv_heads * head_dim * 2, "isa": isa}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16, help="KV heads of the original layer")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rank", type=int, default=512)
    parser.add_argument("--rope", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7, help="calls of each kernel per row, in turn")
    parser.add_argument("--out", default=str(Path(__file__).with_name("decode_step.json")))
    args = parser.parse_args()

    probes, before = start_run()
    runs = []
    for batch in args.batches:
        for context in args.contexts:
            mla = (batch, context, args.heads, args.rank, args.rope)
            named = {"ours (fused C kernel)": mla_case(*mla, "ours"),
                     "ours (torch fallback)": mla_case(*mla, "ours-torch"),
                     "original (vLLM CPU attention)": mha_case(batch, context, args.heads, args.kv_heads,
                                                                args.head_dim)}
            if args.rank + args.rope == 576:
                named["stock CPU MLA (576)"] = mla_case(*mla, "stock")
            for record in roofline_row(named, probes, before, args.rounds, batch=batch, context=context):
                runs.append(record)
                print(json.dumps(record), flush=True)
    peaks = peaks_after(before, probes, "kernels")
    save_results(args, peaks, runs, x="context", xlabel="context (tokens)", ylabel="ms per decode step, one layer",
                 title="batch {batch}")


def against_roofline(measured: dict, peaks: dict, peak_flops: float, **labels) -> dict:
    """One run's record: its labels, what the case measured (seconds, flops, bytes) and its roofline
    (max of compute and memory time), bound and efficiency = roofline / measured."""
    compute, memory = measured["flops"] / peak_flops, measured["bytes"] / peaks["read_bytes_per_s"]
    return {**labels, **measured, "roofline_seconds": max(compute, memory),
            "bound": "compute" if compute >= memory else "memory",
            "efficiency": max(compute, memory) / measured["seconds"]}


def save_results(args, peaks: dict, runs: list[dict], **plot_options) -> None:
    """Write the JSON to args.out and the plot (see `plot`) beside it."""
    result = {"machine": platform.processor() or platform.machine(), "peaks": peaks, "shape": vars(args),
              "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.out).with_suffix(".png"), **plot_options)


def plot(result: dict, path: Path, x: str, xlabel: str, ylabel: str, title: str) -> None:
    """Per batch size, every kernel's time against `x` (log-log) next to its roofline (dotted); `title` is
    formatted with the batch and the run's shape arguments."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in result["runs"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for kernel in dict.fromkeys(r["kernel"] for r in result["runs"]):
            runs = [r for r in result["runs"] if r["kernel"] == kernel and r["batch"] == batch]
            line, = ax.plot([r[x] for r in runs], [r["seconds"] * 1e3 for r in runs], "o-", label=kernel)
            ax.plot([r[x] for r in runs], [r["roofline_seconds"] * 1e3 for r in runs], ":",
                    color=line.get_color(), label=f"{kernel} roofline")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title.format(batch=batch, **result["shape"]))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
