"""Perplexity versus KV-cache fraction on the reference model, ours against two baselines.

For every fraction of the original KV cache (cached dims per token and layer, against the original's
2 * n_kv * head_dim), each method compresses the reference model and held-out perplexity is measured
with transformers (no fine-tuning for anyone):

* exact: the exact MLA conversion (fraction 1.0), a check that the pipeline loses nothing;
* ours-uniform: `transmla convert --kv-ratio X` (selected-frequency RoRoPE, error-weighted balanced K/V
  PCA, one rank for every layer: what the stock 512 + 64 kernels need);
* ours-per-layer: `--freqfold auto --rank-allocation measured` (same total cache, per-layer ranks);
* ours-freqfold: the paper's FreqFold block layout (`--freqfold head_dim/D`), uniform ranks;
* mha2mla: partial RoPE by 2-norm + joint SVD (baselines.py), best of the swept rope widths;
* per-head-svd: rank-r SVD of every KV head's W_k and W_v (baselines.py).

    python benchmarks/quality/run.py                # defaults: reference model, held-out KJV books
    python benchmarks/quality/run.py --fractions 0.125 0.25 0.5 --out /tmp/q.json

Writes JSON (every run, plus `claims`: where ours-uniform and ours-per-layer are below each baseline)
and a plot next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "vllm_transmla" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DATA / "reference_model"))
    parser.add_argument("--text", default=str(DATA / "kjv_heldout.txt"))
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.1875, 0.25, 0.375, 0.5, 0.75])
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = parser.parse_args()
    results = run(args.model, args.text, args.fractions)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    plot(results, Path(args.out).with_suffix(".png"))
    print(json.dumps(results["claims"], indent=2))


def run(model: str, text: str, fractions: list[float]) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from baselines import apply_mha2mla, apply_per_head_svd, calibration_batch
    from vllm_transmla.convert.pipeline import convert
    from vllm_transmla.evaluate import perplexity

    source_cfg = AutoConfig.from_pretrained(model)
    n_kv, d = source_cfg.num_key_value_heads, source_cfg.head_dim
    full = 2 * n_kv * d
    results = {"model": model, "text": text, "cached_dims_original": full, "runs": []}
    calib = calibration_batch(model)

    def record(method, fraction, ppl, settings=None, seconds=None):
        results["runs"].append({"method": method, "kv_fraction": fraction, **(settings or {}),
                                "perplexity": round(ppl["perplexity"], 4), "tokens": ppl["tokens"],
                                "seconds": round(seconds, 1) if seconds is not None else None})
        print(results["runs"][-1], flush=True)

    def fresh():
        return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    record("original", 1.0, perplexity(model, text))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        exact = convert(model, Path(tmp) / "exact", progress=False)
        record("exact", 1.0, perplexity(exact, text), seconds=time.time() - t)
        for fraction in fractions:
            budget = int(round(fraction * full))
            for method, options in (("ours-uniform", {}),
                                    ("ours-per-layer", {"freqfold": "auto", "rank_allocation": "measured"})):
                t = time.time()
                dst = convert(model, Path(tmp) / f"{method}-{fraction}", kv_ratio=fraction, progress=False, **options)
                cfg = json.loads((dst / "config.json").read_text())
                record(method, fraction, perplexity(dst, text), {
                    "kv_lora_rank": cfg["kv_lora_rank"], "kv_lora_ranks": cfg.get("kv_lora_ranks"),
                    "qk_rope_head_dim": cfg["qk_rope_head_dim"], "freqfold": cfg["transmla"]["freqfold"]},
                    seconds=time.time() - t)
            rope = json.loads((dst / "config.json").read_text())["qk_rope_head_dim"]
            if d % rope == 0:  # the block layout needs D to divide head_dim
                t = time.time()
                dst = convert(model, Path(tmp) / f"freqfold-{fraction}", kv_ratio=fraction, freqfold=d // rope,
                              progress=False)
                record("ours-freqfold", fraction, perplexity(dst, text), {"freqfold": d // rope,
                       "qk_rope_head_dim": rope}, seconds=time.time() - t)

            t = time.time()
            m = fresh()
            settings = apply_per_head_svd(m, budget)
            record("per-head-svd", fraction, perplexity(model, text, model=m), settings, seconds=time.time() - t)

            sweep = []
            for pairs in (1, 2, 4, 8, 16, 32):
                if pairs > d // 2 or budget - 2 * pairs * n_kv < 1:
                    continue
                t = time.time()
                m = fresh()
                settings = apply_mha2mla(m, budget, pairs, calib)
                sweep.append((perplexity(model, text, model=m), settings, time.time() - t))
            best = min(sweep, key=lambda s: s[0]["perplexity"])
            record("mha2mla", fraction, best[0], {**best[1], "swept": [
                {"rope_pairs_per_head": s[1]["rope_pairs_per_head"], "perplexity": round(s[0]["perplexity"], 4)}
                for s in sweep]}, seconds=sum(s[2] for s in sweep))
    results["claims"] = claims(results)
    return results


def claims(results: dict) -> dict:
    """For each of ours and each baseline: the fractions <= 0.5 where ours is below, and whether all are."""
    by = {}
    for r in results["runs"]:
        by.setdefault(r["method"], {})[r["kv_fraction"]] = r["perplexity"]
    out = {}
    for ours in ("ours-uniform", "ours-per-layer"):
        for base in ("mha2mla", "per-head-svd"):
            fractions = sorted(f for f in by.get(ours, {}) if f <= 0.5 and f in by.get(base, {}))
            below = {str(f): by[ours][f] < by[base][f] for f in fractions}
            out[f"{ours} < {base}"] = {"all_fractions_le_0.5": all(below.values()), "by_fraction": below}
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    original = next(r["perplexity"] for r in results["runs"] if r["method"] == "original")
    ax.axhline(original, color="gray", linestyle="--", label=f"original / exact ({original:.2f})")
    styles = {"ours-uniform": "o-", "ours-per-layer": "s-", "ours-freqfold": "^:", "mha2mla": "x--",
              "per-head-svd": "d--"}
    for method, style in styles.items():
        runs = sorted((r for r in results["runs"] if r["method"] == method), key=lambda r: r["kv_fraction"])
        if runs:
            ax.plot([r["kv_fraction"] for r in runs], [r["perplexity"] for r in runs], style, label=method)
    ax.set_xlabel("KV cache size, fraction of the original")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_yscale("log")
    ax.set_title("Reference model (KJV, 3.9M params), no fine-tuning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
