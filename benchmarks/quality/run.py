"""Held-out perplexity versus KV-cache fraction, every method of ours against two baselines, no fine-tuning.

For every fraction of the original KV cache (cached values per token and layer, against the original's
2 * n_kv * head_dim), each method compresses the model and held-out perplexity is measured with
transformers on every text:

* original, and exact: the exact MLA conversion (fraction 1.0), a check that the pipeline loses nothing;
* ours: `transmla convert --kv-ratio X` with the defaults;
* ours-select / ours-freqfold: the selected-frequency layout, the paper's FreqFold (F = 2 head_dim / D);
* ours-auto: `--freqfold auto` (the layout with the least calibration attention error);
* ours-per-layer: `--freqfold auto --rank-allocation measured` (per-layer ranks, same total cache);
* mha2mla: partial RoPE by 2-norm + joint SVD (baselines.py), best of the swept rope widths;
* per-head-svd: rank-r SVD of every KV head's W_k and W_v (baselines.py; RoPE after reconstruction,
  which MLA cannot absorb - a lower bound on what a cache of that size holds, not a servable model).

    python benchmarks/quality/run.py            # the reference model on the held-out KJV books (~5 min)
    python benchmarks/quality/run.py --real     # SmolLM2-135M-Instruct (`transmla fetch`), calibrated on
                                                # Debian's license texts, KJV + Devil's Dictionary (~1 h)

Writes JSON (every run and, per text, where each of ours is below each baseline) and a plot next to it.
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
OURS = {  # method -> convert options beside --kv-ratio
    "ours": {},
    "ours-select": {"freqfold": "select"},
    "ours-freqfold": {"freqfold": "paper"},  # F = 2 * head_dim / D, resolved per fraction
    "ours-auto": {"freqfold": "auto"},
    "ours-per-layer": {"freqfold": "auto", "rank_allocation": "measured"},
}
BASELINES = ("mha2mla", "per-head-svd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct, license calibration, 2 texts")
    parser.add_argument("--model", help="source checkpoint (default: the reference model, or SmolLM2 with --real)")
    parser.add_argument("--texts", nargs="+", help="held-out texts (never the calibration text)")
    parser.add_argument("--calib", nargs="+", help="calibration files (default: the converter's default, or the "
                        "license texts with --real)")
    parser.add_argument("--fractions", type=float, nargs="+")
    parser.add_argument("--methods", nargs="+", default=[*OURS, *BASELINES], choices=[*OURS, *BASELINES])
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.real:
        from vllm_transmla.real_model import LICENSE_TEXTS, fetch_smollm2

        model = args.model or str(fetch_smollm2().hf)
        texts = args.texts or [str(DATA / "kjv_heldout.txt"), str(DATA / "devils_dictionary_heldout.txt")]
        calib = args.calib or list(LICENSE_TEXTS)
        fractions = args.fractions or [0.25, 0.5, 0.125, 0.75, 0.375]  # the two first
        out = Path(args.out or Path(__file__).with_name("results_smollm2.json"))
    else:
        model = args.model or str(DATA / "reference_model")
        texts = args.texts or [str(DATA / "kjv_heldout.txt")]
        calib = args.calib
        fractions = args.fractions or [0.125, 0.1875, 0.25, 0.375, 0.5, 0.75]
        out = Path(args.out or Path(__file__).with_name("results.json"))
    results = run(model, texts, calib, fractions, args.methods, out)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(json.dumps(results["claims"], indent=2))


def perplexities(model_path, texts: list[str], model=None) -> dict:
    """{text name: perplexity} (the model loaded once for all texts)."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_transmla.evaluate import perplexity

    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return {Path(t).stem: round(perplexity(model_path, t, model=model)["perplexity"], 4) for t in texts}


def run(model: str, texts: list[str], calib, fractions: list[float], methods: list[str],
        out: Path | None = None) -> dict:
    """Every method at every fraction (in the order given); with `out`, the runs so far are written there
    after each one (an hour-long sweep that stops early keeps what it measured)."""
    from transformers import AutoConfig

    from vllm_transmla.convert.pipeline import convert

    cfg = AutoConfig.from_pretrained(model)
    n_kv, d = cfg.num_key_value_heads, cfg.head_dim
    results = {"model": model, "texts": texts, "calibration": calib or "converter default",
               "cached_dims_original": 2 * n_kv * d, "runs": []}

    def record(method, fraction, ppl, settings=None, seconds=None):
        results["runs"].append({"method": method, "kv_fraction": fraction, **(settings or {}), "perplexity": ppl,
                                "seconds": round(seconds, 1) if seconds is not None else None})
        print(json.dumps(results["runs"][-1]), flush=True)
        if out is not None:
            out.write_text(json.dumps(results, indent=2) + "\n")

    record("original", 1.0, perplexities(model, texts))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        exact = convert(model, Path(tmp) / "exact", progress=False)
        record("exact", 1.0, perplexities(exact, texts), seconds=time.time() - t)
        for fraction in fractions:
            default = None  # the "ours" run at this fraction
            for method in [m for m in methods if m in OURS]:
                options = dict(OURS[method])
                if options.get("freqfold") == "paper":
                    options["freqfold"] = _paper_freqfold(model, fraction)
                    if options["freqfold"] is None:
                        continue
                    if default is not None and default["freqfold"] == options["freqfold"]:
                        record(method, fraction, default["perplexity"],  # the same conversion: not run twice
                               {k: default[k] for k in ("kv_lora_rank", "kv_lora_ranks", "qk_rope_head_dim",
                                                        "freqfold")} | {"same_as": "ours"})
                        continue
                t = time.time()
                dst = convert(model, Path(tmp) / f"{method}-{fraction}", kv_ratio=fraction, calib=calib,
                              progress=False, overwrite=True, **options)
                seconds = time.time() - t
                mla = json.loads((dst / "config.json").read_text())
                record(method, fraction, perplexities(dst, texts), {
                    "kv_lora_rank": mla["kv_lora_rank"], "kv_lora_ranks": mla.get("kv_lora_ranks"),
                    "qk_rope_head_dim": mla["qk_rope_head_dim"], "freqfold": mla["transmla"]["freqfold"]}, seconds)
                if method == "ours":
                    default = results["runs"][-1]
            _baselines(model, texts, calib, fraction, int(round(fraction * 2 * n_kv * d)), methods, record)
    results["claims"] = claims(results)
    return results


def _paper_freqfold(model: str, fraction: float):
    """The paper's FreqFold for the rope width the converter picks at `fraction`: 2 * head_dim / D (None
    where that is not a legal layout)."""
    from vllm_transmla.convert.plan import ConvertOptions, plan_conversion
    from vllm_transmla.convert.source import open_source
    from vllm_transmla.errors import TransMLAError

    source = open_source(Path(model))
    plan = plan_conversion(source.gqa, source.num_layers, ConvertOptions(kv_ratio=fraction))
    fold = 2 * source.gqa.head_dim // plan.rope_dim
    try:
        plan_conversion(source.gqa, source.num_layers, ConvertOptions(kv_ratio=fraction, freqfold=fold))
    except TransMLAError:
        return None
    return fold


def _baselines(model: str, texts, calib, fraction: float, budget: int, methods, record) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from baselines import apply_mha2mla, apply_per_head_svd, calibration_batch

    def fresh():
        return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    if "per-head-svd" in methods:
        t = time.time()
        m = fresh()
        settings = apply_per_head_svd(m, budget)
        record("per-head-svd", fraction, perplexities(model, texts, m), settings, time.time() - t)
    if "mha2mla" in methods:
        cfg = AutoConfig.from_pretrained(model)
        n_kv, d = cfg.num_key_value_heads, cfg.head_dim
        tokens = calibration_batch(model, files=calib)
        sweep = []
        for pairs in (1, 2, 4, 8, 16, 32):
            if pairs > d // 2 or budget - 2 * pairs * n_kv < 1:
                continue
            t = time.time()
            m = fresh()
            settings = apply_mha2mla(m, budget, pairs, tokens)
            sweep.append((perplexities(model, texts, m), settings, time.time() - t))
        first = Path(texts[0]).stem
        best = min(sweep, key=lambda s: s[0][first])  # best rope width on the first text
        record("mha2mla", fraction, best[0], {**best[1], "swept": [
            {"rope_pairs_per_head": s[1]["rope_pairs_per_head"], "perplexity": s[0]} for s in sweep]},
               sum(s[2] for s in sweep))


def claims(results: dict) -> dict:
    """Per text, for each of ours and each baseline: the fractions <= 0.5 where ours is below."""
    by: dict = {}
    for r in results["runs"]:
        for text, ppl in r["perplexity"].items():
            by.setdefault(text, {}).setdefault(r["method"], {})[r["kv_fraction"]] = ppl
    out = {}
    for text, methods in by.items():
        for ours in [m for m in methods if m in OURS]:
            for base in BASELINES:
                fractions = sorted(f for f in methods[ours] if f <= 0.5 and f in methods.get(base, {}))
                below = {str(f): methods[ours][f] < methods[base][f] for f in fractions}
                out[f"{text}: {ours} < {base}"] = {"all_fractions_le_0.5": all(below.values()), "by_fraction": below}
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = list(results["runs"][0]["perplexity"])
    fig, axes = plt.subplots(1, len(texts), figsize=(7 * len(texts), 4.5), squeeze=False)
    styles = {"ours": "o-", "ours-select": "v:", "ours-freqfold": "^:", "ours-auto": "D-.", "ours-per-layer": "s-",
              "mha2mla": "x--", "per-head-svd": "d--"}
    for ax, text in zip(axes[0], texts):
        original = next(r["perplexity"][text] for r in results["runs"] if r["method"] == "original")
        ax.axhline(original, color="gray", linestyle="--", label=f"original / exact ({original:.2f})")
        for method, style in styles.items():
            runs = sorted((r for r in results["runs"] if r["method"] == method), key=lambda r: r["kv_fraction"])
            if runs:
                ax.plot([r["kv_fraction"] for r in runs], [r["perplexity"][text] for r in runs], style, label=method)
        ax.set_xlabel("KV cache size, fraction of the original")
        ax.set_ylabel("held-out perplexity (log)")
        ax.set_yscale("log")
        ax.set_title(f"{Path(results['model']).name}: {text}, no fine-tuning")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
