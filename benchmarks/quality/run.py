"""Perplexity versus KV-cache fraction on the reference model.

For every fraction of the original KV cache, converts the reference model (compressed mode, calibrated on
the shipped calibration text) and measures held-out perplexity with transformers; the original and the
exact conversion are the reference points. Writes JSON and a plot.

    python benchmarks/quality/run.py                # defaults: reference model, held-out KJV books
    python benchmarks/quality/run.py --fractions 0.125 0.25 0.5 --out /tmp/q.json

Methods measured so far: exact, ours with uniform ranks (RoRoPE + FreqFold + balanced K/V PCA).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "vllm_transmla" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DATA / "reference_model"))
    parser.add_argument("--text", default=str(DATA / "kjv_heldout.txt"))
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.1875, 0.25, 0.375, 0.5, 0.75])
    parser.add_argument("--rope-dim", type=int, default=None, help="qk_rope_dim (default: the converter's)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = parser.parse_args()

    from vllm_transmla.convert.pipeline import convert
    from vllm_transmla.evaluate import perplexity

    results = {"model": args.model, "text": args.text, "runs": []}

    def record(method, fraction, path, settings=None):
        t = time.time()
        ppl = perplexity(path, args.text)
        results["runs"].append({"method": method, "kv_fraction": fraction, **(settings or {}),
                                "perplexity": round(ppl["perplexity"], 4), "tokens": ppl["tokens"],
                                "eval_seconds": round(time.time() - t, 1)})
        print(results["runs"][-1], flush=True)

    record("original", 1.0, args.model)
    with tempfile.TemporaryDirectory() as tmp:
        record("exact", 1.0, convert(args.model, Path(tmp) / "exact", progress=False))
        for fraction in args.fractions:
            dst = convert(args.model, Path(tmp) / f"ours-{fraction}", kv_ratio=fraction, qk_rope_dim=args.rope_dim,
                          progress=False)
            cfg = json.loads((dst / "config.json").read_text())
            record("ours-uniform", fraction, dst, {"kv_lora_rank": cfg["kv_lora_rank"],
                                                   "qk_rope_head_dim": cfg["qk_rope_head_dim"],
                                                   "freqfold": cfg["transmla"]["freqfold"]})
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    plot(results, Path(args.out).with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    original = next(r["perplexity"] for r in results["runs"] if r["method"] == "original")
    ax.axhline(original, color="gray", linestyle="--", label=f"original ({original:.2f})")
    for method in sorted({r["method"] for r in results["runs"]} - {"original", "exact"}):
        runs = sorted((r for r in results["runs"] if r["method"] == method), key=lambda r: r["kv_fraction"])
        ax.plot([r["kv_fraction"] for r in runs], [r["perplexity"] for r in runs], marker="o", label=method)
    ax.set_xlabel("KV cache fraction of the original")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.set_title("Reference model (KJV, 3.9M params): perplexity vs KV cache")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
