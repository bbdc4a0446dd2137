"""Held-out perplexity versus KV-cache fraction, every method of ours against four baselines, no fine-tuning.

For every fraction of the original KV cache (cached values per token and layer, against the original's
2 * n_kv * head_dim), each method compresses the model and held-out perplexity is measured with
transformers on every text:

* original, and exact: the exact MLA conversion (fraction 1.0), a check that the pipeline loses nothing;
* ours: `transmla convert --kv-ratio X` with the defaults;
* ours-select / ours-freqfold: the selected-frequency layout, the paper's FreqFold (F = 2 head_dim / D);
* ours-auto: `--freqfold auto` (the layout with the least calibration attention error);
* ours-per-layer: `--freqfold auto --rank-allocation measured` (per-layer ranks, same total cache);
* ours-refined, ours-refined-10: `--refine-epochs 4` / `10` (the defaults, then that many epochs of
  gradient refinement of every layer);
* mha2mla: partial RoPE by 2-norm + joint SVD (baselines.py), best of the swept rope widths;
* per-head-svd: rank-r SVD of every KV head's W_k and W_v (baselines.py; RoPE after reconstruction,
  which MLA cannot absorb - a lower bound on what a cache of that size holds, not a servable model);
* mha2mla-aa, per-head-svd-aa: the same with activation-aware truncations (ASVD / SVD-LLM style: the
  error of the keys and values on the calibration inputs, not of the weights).

    python benchmarks/quality/run.py            # the reference model on the held-out KJV books (~5 min)
    python benchmarks/quality/run.py --real     # SmolLM2-135M-Instruct (`transmla fetch`), calibrated on
                                                # Debian's license texts, KJV + Devil's Dictionary (~2 h)

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
    "ours-refined": {"refine_epochs": 4},  # the defaults, then gradient refinement of each layer (local_refine.py)
    "ours-refined-10": {"refine_epochs": 10},
}
BASELINES = ("mha2mla", "per-head-svd", "mha2mla-aa", "per-head-svd-aa")  # -aa: activation-aware


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
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out, run the rest")
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
    results = run(model, texts, calib, fractions, args.methods, out, args.resume)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(json.dumps(results["claims"], indent=2))


def perplexities(model_path, texts: list[str], model=None, max_tokens: int | None = None) -> dict:
    """{text name: perplexity} (the model loaded once for all texts)."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_transmla.evaluate import perplexity

    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return {Path(t).stem: round(perplexity(model_path, t, model=model, max_tokens=max_tokens)["perplexity"], 4)
            for t in texts}


def run(model: str, texts: list[str], calib, fractions: list[float], methods: list[str],
        out: Path | None = None, resume: bool = False) -> dict:
    """Every method at every fraction; with `out`, the runs so far are written there after each one (an
    hours-long sweep that stops keeps what it measured) and `resume` skips the runs already there. The
    plain conversion and the baselines run first at every fraction, then the other methods of ours."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    n_kv, d = cfg.num_key_value_heads, cfg.head_dim
    results = {"model": model, "texts": texts, "calibration": calib or "converter default",
               "cached_dims_original": 2 * n_kv * d, "runs": []}
    if resume and out is not None and out.exists():
        previous = json.loads(out.read_text())
        if previous.get("model") == model and previous.get("texts") == texts:
            results["runs"] = previous["runs"]
    done = {(r["method"], r["kv_fraction"]) for r in results["runs"]}

    def record(method, fraction, ppl, settings=None, seconds=None):
        results["runs"].append({"method": method, "kv_fraction": fraction, **(settings or {}), "perplexity": ppl,
                                "seconds": round(seconds, 1) if seconds is not None else None})
        print(json.dumps(results["runs"][-1]), flush=True)
        if out is not None:
            out.write_text(json.dumps(results, indent=2) + "\n")

    if ("original", 1.0) not in done:
        record("original", 1.0, perplexities(model, texts))
    with tempfile.TemporaryDirectory() as tmp:
        if ("exact", 1.0) not in done:
            from vllm_transmla.convert.pipeline import convert

            t = time.time()
            exact = convert(model, Path(tmp) / "exact", progress=False)
            record("exact", 1.0, perplexities(exact, texts), seconds=time.time() - t)
        first = [m for m in ("ours", *BASELINES) if m in methods]
        for batch in (first, [m for m in methods if m not in first]):
            for fraction in fractions:
                for method in batch:
                    if (method, fraction) in done:
                        continue
                    if method in OURS:
                        _ours(model, texts, calib, fraction, method, results["runs"], Path(tmp), record)
                    else:
                        _baseline(model, texts, calib, fraction, int(round(fraction * 2 * n_kv * d)), method, record)
    results["claims"] = claims(results)
    return results


def _ours(model: str, texts, calib, fraction: float, method: str, runs: list, tmp: Path, record) -> None:
    from vllm_transmla.convert.pipeline import convert

    options = dict(OURS[method])
    if options.get("freqfold") == "paper":
        options["freqfold"] = _paper_freqfold(model, fraction)
        if options["freqfold"] is None:
            return
        default = next((r for r in runs if r["method"] == "ours" and r["kv_fraction"] == fraction), None)
        if default is not None and default["freqfold"] == options["freqfold"]:  # the same conversion
            record(method, fraction, default["perplexity"], {k: default[k] for k in (
                "kv_lora_rank", "kv_lora_ranks", "qk_rope_head_dim", "freqfold")} | {"same_as": "ours"})
            return
    t = time.time()
    dst = convert(model, tmp / f"{method}-{fraction}", kv_ratio=fraction, calib=calib, progress=False,
                  overwrite=True, **options)
    seconds = time.time() - t  # the conversion alone
    mla = json.loads((dst / "config.json").read_text())
    record(method, fraction, perplexities(dst, texts), {
        "kv_lora_rank": mla["kv_lora_rank"], "kv_lora_ranks": mla.get("kv_lora_ranks"),
        "qk_rope_head_dim": mla["qk_rope_head_dim"], "freqfold": mla["transmla"]["freqfold"]}, seconds)


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


SWEEP_TOKENS = 4096  # MHA2MLA's rope width is chosen on this many tokens of the first text


def _baseline(model: str, texts, calib, fraction: float, budget: int, method: str, record) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from baselines import apply_mha2mla, apply_per_head_svd, calibration_batch

    def fresh():
        return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    t = time.time()
    aware = method.endswith("-aa")
    if method.startswith("per-head-svd"):
        m = fresh()
        settings = apply_per_head_svd(m, budget, calibration_batch(model, files=calib) if aware else None)
        record(method, fraction, perplexities(model, texts, m), settings, time.time() - t)
        return
    cfg = AutoConfig.from_pretrained(model)
    n_kv, d = cfg.num_key_value_heads, cfg.head_dim
    tokens = calibration_batch(model, files=calib)
    first = Path(texts[0]).stem
    sweep, best = [], None  # best: (perplexity, settings, model) of the best rope width so far, the only model kept
    for pairs in (1, 2, 4, 8, 16, 32):
        if pairs > d // 2 or budget - 2 * pairs * n_kv < 1:
            continue
        m = fresh()
        settings = apply_mha2mla(m, budget, pairs, tokens, activation_aware=aware)
        ppl = perplexities(model, texts[:1], m, max_tokens=SWEEP_TOKENS)[first]
        sweep.append({"rope_pairs_per_head": settings["rope_pairs_per_head"], "perplexity": ppl})
        if best is None or ppl < best[0]:
            best = (ppl, settings, m)
    record(method, fraction, perplexities(model, texts, best[2]), {
        **best[1], "swept_on_first_tokens": sweep, "sweep_tokens": SWEEP_TOKENS}, time.time() - t)


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
              "ours-refined": "h-", "ours-refined-10": "H-",
              "mha2mla": "x--", "per-head-svd": "d--", "mha2mla-aa": "P--", "per-head-svd-aa": "*--"}
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
        ax.set_title(f"{_model_name(results['model'])}: {text}, no fine-tuning")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _model_name(path: str) -> str:
    """The checkpoint's directory name (the fetched real model's is <cache>/smollm2-135m-instruct/hf)."""
    return Path(path).parent.name if Path(path).name == "hf" else Path(path).name


if __name__ == "__main__":
    main()
