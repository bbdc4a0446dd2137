"""KV cache per tensor-parallel rank: the original GQA model, one latent (replicated on every rank, as vLLM does
for MLA), grouped latents (`--latent-groups`, split with their heads) and TPLA (one latent sliced across ranks,
`mla_tpla_shards`), and what each costs in held-out perplexity.

1. Analytic, from the configs: per-rank KV bytes per token (bf16) and tokens per rank in 40 GiB of cache, at
   TP 1, 2, 4, 8, for the Llama-3-8B, Llama-3-70B and Llama-2-7B shapes with a 512 + 64 latent (grouped:
   8 groups of (512 + 64) / 8, the same total; TPLA: the latent's c_kv split across ranks, k_pe replicated).
2. Measured on this CPU at TP=2 (vLLM's own KV-cache figures, `kv_cache_memory_bytes` the same for all): the
   reference model, its 25% single-latent conversion (replicated, and served with TPLA) and its 25% two-group
   conversion.
3. Held-out perplexity (no fine-tuning) at equal total cache and at equal per-rank cache (TP = G), single
   latent against grouped: the reference model (G = 2) and, with --real, SmolLM2-135M (3 KV heads: G = 3,
   calibrated on the license texts like benchmarks/quality/run.py --real).
4. TPLA's perplexity (transformers' slice-wise attention, what vLLM computes at TP = slices): the same 25% and
   50% single latents sliced 2 and 4 ways, as converted (PCA order) and with --tpla-ready's Hadamard rotation.

    python benchmarks/groups/run.py                     # parts 1-4 on the reference model (~4 minutes)
    python benchmarks/groups/run.py --real              # parts 3-4 on SmolLM2 as well (~30 minutes more)
    python benchmarks/groups/run.py --real --only-tpla  # parts 2 and 4 only, into the existing results

Writes benchmarks/groups/results.json and results.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "vllm_transmla" / "data"
sys.path.insert(0, str(ROOT / "benchmarks" / "quality"))
SHAPES = {  # name -> (layers, KV heads, head_dim)
    "Llama-3-8B": (32, 8, 128),
    "Llama-3-70B": (80, 8, 128),
    "Llama-2-7B": (32, 32, 128),
}
LATENT, ROPE, GROUPS = 512, 64, 8
TP_SIZES = (1, 2, 4, 8)
CACHE_PER_RANK = 40 * 1024**3
BF16 = 2


def per_rank_values(design: str, kv_heads: int, head_dim: int, tp: int) -> float:
    """Cached values per token and layer on one rank."""
    if design == "original":  # vLLM splits the KV heads; past TP = KV heads each rank keeps one
        return 2 * head_dim * max(1, kv_heads // tp)
    if design == "single latent":
        return LATENT + ROPE
    if design == "grouped":  # GROUPS latents of (512 + 64) / GROUPS, GROUPS / TP of them per rank
        return (LATENT + ROPE) * max(1, GROUPS // tp) / GROUPS
    if design == "TPLA":  # c_kv sliced across ranks, k_pe on every rank
        return LATENT / tp + ROPE
    raise ValueError(design)


def analytic() -> list[dict]:
    rows = []
    for name, (layers, kv_heads, head_dim) in SHAPES.items():
        compression = (LATENT + ROPE) / (2 * kv_heads * head_dim)
        for tp in TP_SIZES:
            original = per_rank_values("original", kv_heads, head_dim, tp) * layers * BF16
            for design in ("original", "single latent", "grouped", "TPLA"):
                per_token = per_rank_values(design, kv_heads, head_dim, tp) * layers * BF16
                rows.append({"model": name, "tp": tp, "design": design, "bytes_per_token_per_rank": per_token,
                             "tokens_per_rank": int(CACHE_PER_RANK // per_token),
                             "vs_original_tokens": round(original / per_token, 3),
                             "vs_original_bytes_times_compression": None if design == "original" else
                             round(per_token / (original * compression), 3)})
    return rows


def measured_tp2(tmp: Path) -> dict:
    """vLLM at TP=2 on the reference model: what one rank caches per token and how many tokens fit."""
    from vllm_transmla.convert.pipeline import convert
    from vllm_transmla.testing.offline import run_in_subprocess

    source = DATA / "reference_model"
    single = convert(source, tmp / "single25", kv_ratio=0.25, progress=False)
    runs = {"original": (source, {}),
            "single latent 25%": (single, {}),
            "single latent 25%, TPLA": (single, {"hf_overrides": {"mla_tpla_shards": 2}}),
            "grouped 25% (G=2)": (convert(source, tmp / "grouped25", kv_ratio=0.25, latent_groups=2,
                                          progress=False), {})}
    budget = 8_000_000
    out = {}
    for name, (path, extra) in runs.items():
        job = {"model": str(path), "prompts": [[1, 2, 3, 4]], "max_tokens": 4, "kv_cache_memory_bytes": budget,
               "tp": 2, **extra}
        result = run_in_subprocess(job, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
        tokens = result["num_gpu_blocks"] * result["block_size"]
        out[name] = {"head_size": result["head_size"], "use_mla": result["use_mla"], "tokens_per_rank": tokens,
                     "kv_cache_memory_bytes_per_rank": budget}
        print(json.dumps({name: out[name]}), flush=True)
    return out


def perplexity_pairs(model: str, texts: list[str], calib, groups: int, tmp: Path, tag: str) -> list[dict]:
    """Single latent vs G groups: at the same total cache, and at the same per-rank cache with TP = G."""
    from transformers import AutoConfig

    from run import perplexities  # benchmarks/quality/run.py
    from vllm_transmla.convert.pipeline import convert

    cfg = AutoConfig.from_pretrained(model)
    width = 2 * cfg.num_key_value_heads * cfg.head_dim
    rows = []
    for fraction in (0.25, 0.5):
        grouped = convert(model, tmp / f"{tag}-g{fraction}", kv_ratio=fraction, latent_groups=groups, calib=calib,
                          progress=False)
        gcfg = json.loads((grouped / "config.json").read_text())
        per_group = gcfg["kv_lora_rank"] + gcfg["qk_rope_head_dim"]
        runs = {"grouped": (grouped, fraction, per_group)}
        for label, total in (("single, same total", groups * per_group), ("single, same per rank", per_group)):
            path = tmp / f"{tag}-s{total}"  # the same single latent may serve both comparisons
            single = path if path.exists() else convert(model, path, kv_ratio=total / width, calib=calib,
                                                        progress=False)
            runs[label] = (single, total / width, total)
        for label, (path, frac, per_rank) in runs.items():
            mla = json.loads((path / "config.json").read_text())
            row = {"model": tag, "design": label, "grouped_fraction": fraction, "kv_fraction": round(frac, 4),
                   "latent_groups": mla.get("mla_latent_groups", 1), "kv_lora_rank": mla["kv_lora_rank"],
                   "qk_rope_head_dim": mla["qk_rope_head_dim"], "freqfold": mla["transmla"]["freqfold"],
                   "values_per_rank_at_tp_g": per_rank,
                   "perplexity": perplexities(path, texts)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def tpla_perplexity(model: str, texts: list[str], calib, tmp: Path, tag: str) -> list[dict]:
    """TPLA at 2 and 4 slices of the 25% and 50% single latents, as converted and Hadamard-rotated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from run import perplexities  # benchmarks/quality/run.py
    from vllm_transmla.convert.pipeline import convert

    cfg = AutoConfig.from_pretrained(model)
    width = 2 * cfg.num_key_value_heads * cfg.head_dim
    rows = []
    for fraction in (0.25, 0.5):
        for transform in (None, "hadamard"):
            path = convert(model, tmp / f"{tag}-tpla{fraction}-{transform}", kv_ratio=fraction, calib=calib,
                           tpla_ready=transform, progress=False)
            mla = json.loads((path / "config.json").read_text())
            rank, rope = mla["kv_lora_rank"], mla["qk_rope_head_dim"]
            for shards in (1, 2, 4):
                if transform and shards == 1:
                    continue  # the rotation leaves MLA's function unchanged (tests/test_tpla.py)
                model_obj = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                 mla_tpla_shards=shards).eval()
                row = {"model": tag, "design": "TPLA" if shards > 1 else "single latent (MLA)",
                       "kv_fraction": round((rank + rope) / width, 4), "kv_lora_rank": rank, "qk_rope_head_dim": rope,
                       "transform": transform or "none (PCA order)", "tp_slices": shards,
                       "values_per_rank": rank // shards + rope, "values_total": rank + rope,
                       "perplexity": perplexities(path, texts, model=model_obj)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SHAPES) + 1, figsize=(5 * (len(SHAPES) + 1), 4))
    for ax, name in zip(axes, SHAPES):
        for design in ("original", "single latent", "grouped", "TPLA"):
            rows = [r for r in results["analytic"] if r["model"] == name and r["design"] == design]
            ax.plot([r["tp"] for r in rows], [r["tokens_per_rank"] / 1e6 for r in rows], marker="o", label=design)
        ax.set_xscale("log", base=2)
        ax.set_xticks(TP_SIZES, [str(t) for t in TP_SIZES])
        ax.set_title(f"{name}: tokens per rank in 40 GiB (bf16)")
        ax.set_xlabel("tensor-parallel size")
    axes[0].set_ylabel("million tokens per rank")
    axes[0].legend()
    _plot_quality_per_rank(axes[-1], results)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_quality_per_rank(ax, results: dict) -> None:
    """Held-out perplexity (first text) against the values one rank caches per token and layer: single latents
    (replicated), grouped latents at TP = G, TPLA at TP = slices (latents as converted), for the real model
    when it was run, else the reference model."""
    rows = results.get("perplexity", []) + results.get("tpla_perplexity", [])
    model = "SmolLM2-135M" if any(r["model"] == "SmolLM2-135M" for r in rows) else "reference"
    points: dict[str, set] = {"single latent": set(), "grouped (TP = G)": set(), "TPLA (TP = slices)": set()}
    for r in rows:
        if r["model"] != model or r.get("transform", "none").startswith("hadamard"):
            continue
        text, ppl = next(iter(r["perplexity"].items()))
        if r["design"] == "TPLA":
            points["TPLA (TP = slices)"].add((r["values_per_rank"], ppl))
        elif r["design"] == "grouped":
            points["grouped (TP = G)"].add((r["values_per_rank_at_tp_g"], ppl))
        else:  # a single latent caches all of itself on every rank
            points["single latent"].add((r.get("values_per_rank", r.get("values_per_rank_at_tp_g")), ppl))
    for label, pts in points.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="none" if "TPLA" in label else "-",
                label=label)
    ax.set_yscale("log")
    ax.set_xlabel("values cached per token and layer, per rank")
    ax.set_ylabel(f"perplexity ({text})")
    ax.set_title(f"{model}: quality at a per-rank cache size")
    ax.legend()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="also SmolLM2-135M (G = 3) in the perplexity part")
    parser.add_argument("--skip-vllm", action="store_true", help="do not run the measured TP=2 part (an existing "
                        "results file's is kept)")
    parser.add_argument("--only-tpla", action="store_true",
                        help="run parts 2 and 4 only, keeping the other parts of an existing results file")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = parser.parse_args()
    out = Path(args.out)
    results = {"analytic": analytic(), "notes": {
        "grouped": f"{GROUPS} latents of ({LATENT} + {ROPE}) / {GROUPS} values, {GROUPS} // TP per rank",
        "TPLA": "c_kv's dims split across ranks (R / TP each), k_pe on every rank (mla_tpla_shards = TP)"}}
    previous = json.loads(out.read_text()) if out.exists() else {}
    if args.only_tpla:
        results = {**previous, **results}
    elif args.skip_vllm and "measured_tp2" in previous:  # cache sizes, not weights: still true of a new conversion
        results["measured_tp2"] = previous["measured_tp2"]
    texts = [str(DATA / "kjv_heldout.txt"), str(DATA / "devils_dictionary_heldout.txt")]
    reference = str(DATA / "reference_model")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_vllm:
            results["measured_tp2"] = measured_tp2(Path(tmp))
        out.write_text(json.dumps(results, indent=2) + "\n")
        if not args.only_tpla:
            results["perplexity"] = perplexity_pairs(reference, texts[:1], None, 2, Path(tmp), "reference")
            out.write_text(json.dumps(results, indent=2) + "\n")
        results["tpla_perplexity"] = tpla_perplexity(reference, texts[:1], None, Path(tmp), "reference")
        out.write_text(json.dumps(results, indent=2) + "\n")
        if args.real:
            from vllm_transmla.real_model import LICENSE_TEXTS, fetch_smollm2

            real, calib = str(fetch_smollm2().hf), list(LICENSE_TEXTS)
            if not args.only_tpla:
                results["perplexity"] += perplexity_pairs(real, texts, calib, 3, Path(tmp), "SmolLM2-135M")
                out.write_text(json.dumps(results, indent=2) + "\n")
            results["tpla_perplexity"] += tpla_perplexity(real, texts, calib, Path(tmp), "SmolLM2-135M")
            out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
