"""Offline throughput of converted models against their originals, side by side (vLLM `LLM()`).

For each (original, converted) pair and each length L, `--prompts` random prompts of L tokens each
generate L tokens (input = output, greedy, EOS ignored), under two KV
budgets:
* fixed: the KV memory that holds `--fixed-seqs` full sequences (2 L tokens) of the *original* model -
  as a 7B MHA model on one GPU at 8K context holds only a few - and the same bytes for the converted one;
* free: `--gpu-memory-utilization` (default 0.5), up to `--max-num-seqs` sequences.
Output tokens per second are compared as converted / original in the same run. Every engine runs in a
process of its own (on CPU with its engine core inline, see --engine-process).

Default pairs (`--pairs`): the reference model and its 25% conversion; random MHA-shaped and 4:1
GQA-shaped Llama models (~100-200M parameters, built here) converted to 512 + 64; `mha128` is the MHA
shape with LLaMA-2-7B's head size (8 heads x 128 instead of 16 x 64, the same cache per token);
`smollm2-50` / `smollm2-25`: the real model (`transmla fetch`) and its conversion to 50% / 25% of its cache.

    python benchmarks/speed/throughput.py                            # all pairs, L = 256 .. 1024
    python benchmarks/speed/throughput.py --pairs mha --lengths 512 2048 --prompts 16
    python benchmarks/speed/throughput.py --original SRC --converted DST   # any pair of your own

Writes JSON and a plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Random Llama shapes (4 layers, hidden 1024 / 2048): MHA 16 x 64 and MHA 8 x 128 (LLaMA-2-7B's head
# size) both cache 2048 values per token and layer (512 + 64 is 28% of it); GQA 16 x 128 with 4 KV heads
# caches 1024 (512 + 64 is 56%). Absorbed MLA decoding costs ~4 (R + D/2) FLOPs per query head and cached
# token, per-head attention reads 8 d bytes per KV head (fp32): on a compute-bound CPU the head size
# decides which is faster.
PAIRS = ["reference", "mha", "mha128", "gqa", "smollm2-50", "smollm2-25"]
DEFAULT_PAIRS = ["reference", "mha", "gqa"]
SHAPES = {
    "mha": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                num_key_value_heads=16, head_dim=64, vocab_size=8192),
    "mha128": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=8, head_dim=128, vocab_size=8192),
    "gqa": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=16,
                num_key_value_heads=4, head_dim=128, vocab_size=8192),
}


def build_pair(name: str, root: Path) -> tuple[Path, Path]:
    from vllm_transmla.convert.pipeline import convert
    from vllm_transmla.demo import reference_model

    if name == "reference":
        src = reference_model()
        return src, convert(src, root / "reference-25", kv_ratio=0.25, progress=False)
    if name.startswith("smollm2-"):  # the real model (`transmla fetch`) and its conversion from the GGUF file
        from vllm_transmla.real_model import fetch_smollm2

        model = fetch_smollm2()
        fraction = int(name.split("-")[1]) / 100
        return model.hf, convert(model.gguf, root / name, kv_ratio=fraction, progress=False)
    from vllm_transmla.testing.tiny import build_tiny_model

    src = build_tiny_model("llama-tied", root / name, tie_word_embeddings=False,
                           max_position_embeddings=8192, **SHAPES[name])
    return src, convert(src, root / f"{name}-512+64", kv_lora_rank=512, qk_rope_dim=64, progress=False)


def kv_bytes_per_token(path: Path, dtype_bytes: int) -> int:
    from transformers import AutoConfig

    from vllm_transmla.convert.pipeline import kv_bytes_per_token as per_token

    return per_token(AutoConfig.from_pretrained(path), dtype_bytes)


def pairs_from_args(args, root: Path) -> list[tuple[str, Path, Path, dict]]:
    """(name, original, converted, KV bytes per token of each) for --original/--converted, else for each of
    --pairs built under `root`."""
    dtype_bytes = 4 if args.dtype in ("float32", "float") else 2
    pairs = ([("custom", Path(args.original), Path(args.converted))] if args.original
             else [(name, *build_pair(name, root)) for name in args.pairs])
    return [(name, original, converted,
             {m: kv_bytes_per_token(p, dtype_bytes) for m, p in (("original", original), ("converted", converted))})
            for name, original, converted in pairs]


def machine_state() -> dict:
    """This machine's speed now: fp32 matmul GFLOP/s and memory read GB/s (best of 3, ~2 s). A shared
    machine drifts during a long run; the original's (memory-bound) and the converted model's
    (compute-bound) decode feel different drifts, so each engine run records them before and after."""
    import torch
    from decode_step import fastest

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    big = torch.randn(128 * 2**20 // 4)  # 128 MiB, far above the caches
    return {"fp32_gflops": round(2 * 1024**3 / fastest(lambda: a @ b, repeat=3, warmup=1) / 1e9, 1),
            "read_gb_per_s": round(big.numel() * 4 / fastest(big.sum, repeat=3, warmup=1) / 1e9, 1)}


def run_case(model: Path, length: int, prompts: int, budget: int | None, args) -> dict:
    import random

    from vllm_transmla.testing.offline import run_in_subprocess

    rng = random.Random(length)
    job = {"model": str(model), "dtype": args.dtype, "prompts": [[rng.randrange(10, 2000) for _ in range(length)]
                                                                  for _ in range(prompts)],
           "max_tokens": length, "max_model_len": 2 * length, "max_num_seqs": args.max_num_seqs,
           "logprobs": None, "warmup": True, "enforce_eager": True}
    if budget:
        job["kv_cache_memory_bytes"] = budget
    else:
        job["gpu_memory_utilization"] = args.gpu_memory_utilization
    # On a CPU, vLLM's default front-end process (detokenizing, polling) competes for the cores the
    # engine's pinned OpenMP threads run on: on 2 cores it cut batch-8 decode from 170 to 95 tok/s.
    # Both models run the same way; --engine-process separate keeps vLLM's default.
    before = machine_state()
    result = run_in_subprocess(job, timeout=3600, engine_process=args.engine_process)
    after = machine_state()
    tokens = sum(len(o["token_ids"]) for o in result["outputs"])
    return {"machine_before": before, "machine_after": after,
            "output_tokens": tokens, "seconds": round(result["generate_seconds"], 3),
            "output_tokens_per_s": round(tokens / result["generate_seconds"], 2),
            "kv_tokens_that_fit": result["num_gpu_blocks"] * result["block_size"],
            "kv_head_size": result["head_size"], "use_mla": result["use_mla"],
            "num_preemptions": result["num_preemptions"], **finish_times(result.get("timeline"))}


def finish_times(timeline: list[dict] | None) -> dict:
    """The per-request timeline and how long the last request ran after all others had finished: a
    straggler decoding alone spends the model's capacity on one sequence, and with few prompts that
    tail can be a large share of a run."""
    if not timeline:
        return {}
    done = sorted(r["last_token_s"] for r in timeline)
    return {"last_alone_s": round(done[-1] - done[-2], 3) if len(done) > 1 else None, "timeline": timeline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=DEFAULT_PAIRS, choices=PAIRS)
    parser.add_argument("--original", help="your own original checkpoint (with --converted)")
    parser.add_argument("--converted", help="its converted checkpoint")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--fixed-seqs", type=int, default=2, help="full sequences the original holds (fixed)")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--budgets", nargs="+", default=["fixed", "free"], choices=["fixed", "free"])
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                        help="vLLM's share of accelerator memory (on CPU: of one NUMA node's RAM) for the free budget")
    parser.add_argument("--dtype", default="float32", help="model dtype (float32 on CPUs without native bf16)")
    parser.add_argument("--engine-process", choices=["inline", "separate"], default=None,
                        help="engine core in the LLM() process (default on CPU: no front-end process competing "
                             "for the cores) or in its own process (vLLM's default; default on GPU)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("throughput.json")))
    args = parser.parse_args()
    if args.engine_process is None:
        import torch

        args.engine_process = "separate" if torch.cuda.is_available() else "inline"

    results = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, original, converted, per_token in pairs_from_args(args, Path(tmp)):
            for length in args.lengths:
                for budget_kind in args.budgets:
                    # fixed: what `fixed_seqs` full sequences of the original need (+ one block of slack)
                    budget = (per_token["original"] * (2 * length + 128) * args.fixed_seqs
                              if budget_kind == "fixed" else None)
                    row = {"pair": name, "length": length, "budget": budget_kind, "kv_budget_bytes": budget,
                           "kv_bytes_per_token": per_token}
                    for model_kind, path in (("original", original), ("converted", converted)):
                        row[model_kind] = run_case(path, length, args.prompts, budget, args)
                        print(name, length, budget_kind, model_kind, row[model_kind], flush=True)
                    row["speedup"] = round(row["converted"]["output_tokens_per_s"]
                                           / row["original"]["output_tokens_per_s"], 3)
                    results["runs"].append(row)
                    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    plot(results, Path(args.out).with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(dict.fromkeys(r["pair"] for r in results["runs"]))
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        for budget, style in (("fixed", "o-"), ("free", "s--")):
            runs = [r for r in results["runs"] if r["pair"] == pair and r["budget"] == budget]
            if runs:
                ax.plot([r["length"] for r in runs], [r["speedup"] for r in runs], style, label=f"{budget} KV budget")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("input = output length")
        ax.set_ylabel("output tok/s, converted / original")
        ax.set_title(pair)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
