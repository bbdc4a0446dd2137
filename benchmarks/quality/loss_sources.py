"""Where a compressed conversion loses its quality: the partial-RoPE cut alone, the latent rank alone, both,
and how the hidden-state error grows through the layers. No fine-tuning.

Each variant is `convert()` with explicit shapes (the calibration as `benchmarks/quality/run.py --real`:
Debian's license texts), measured by held-out perplexity on every text:

* rope cut alone: the rope width of a budget (D = 32 at 25% of SmolLM2's cache, 64 at 50%) with the full
  latent rank 2 n_kv d - D (nothing of K_nope or V is dropped, only the rotation of most key dims), for
  the default FreqFold layout and `select`;
* rank alone: every key dim keeps its exact rotation (D = n_kv d, FreqFold 1) and the latent, which then
  carries only the values, is cut to the rank of a budget (64 at 25%, 128 at 50%);
* both: the defaults at 25% and 50%.

For the defaults it also writes each layer's relative hidden-state error |h_mla - h| / |h| on the first
held-out text (the residual stream after every decoder layer, both models in fp32 on the same tokens).

    python benchmarks/quality/loss_sources.py     # SmolLM2 (`transmla fetch`), ~25 min; loss_sources.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import DATA, perplexities  # noqa: E402

# name -> convert options (kv_ratio or explicit shapes)
VARIANTS = {
    "rope cut alone, D=32, default layout (FreqFold 4)": {"kv_lora_rank": 352, "qk_rope_dim": 32, "freqfold": 4},
    "rope cut alone, D=32, select": {"kv_lora_rank": 352, "qk_rope_dim": 32, "freqfold": "select"},
    "rope cut alone, D=64, default layout (FreqFold 2)": {"kv_lora_rank": 320, "qk_rope_dim": 64, "freqfold": 2},
    "rope cut alone, D=64, select": {"kv_lora_rank": 320, "qk_rope_dim": 64, "freqfold": "select"},
    "rank alone, R=64 (exact rope)": {"kv_lora_rank": 64, "qk_rope_dim": 192, "freqfold": 1},
    "rank alone, R=128 (exact rope)": {"kv_lora_rank": 128, "qk_rope_dim": 192, "freqfold": 1},
    "both: defaults at 25% (64 + 32)": {"kv_ratio": 0.25},
    "both: defaults at 50% (128 + 64)": {"kv_ratio": 0.5},
}


def layer_errors(original: str, converted: Path, text: str, tokens: int = 2048, seq_len: int = 256) -> list[float]:
    """Relative error of the residual stream after each decoder layer, over `tokens` tokens of `text`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import vllm_transmla  # noqa: F401

    ids = AutoTokenizer.from_pretrained(original)(Path(text).read_text(), add_special_tokens=False).input_ids
    batch = torch.tensor(ids[: tokens // seq_len * seq_len]).view(-1, seq_len)
    states = []
    for path in (original, converted):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            states.append(model(batch, output_hidden_states=True).hidden_states[1:])
        del model
    return [round(((m - o).norm() / o.norm()).item(), 5) for o, m in zip(*states)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).with_name("loss_sources.json")))
    args = parser.parse_args()
    from vllm_transmla.convert.pipeline import convert
    from vllm_transmla.real_model import LICENSE_TEXTS, fetch_smollm2

    model = str(fetch_smollm2().hf)
    texts = [str(DATA / "kjv_heldout.txt"), str(DATA / "devils_dictionary_heldout.txt")]
    out = Path(args.out)
    results = {"model": model, "texts": texts, "calibration": list(LICENSE_TEXTS),
               "original": perplexities(model, texts), "variants": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in VARIANTS.items():
            start = time.time()
            dst = convert(model, Path(tmp) / "mla", calib=list(LICENSE_TEXTS), progress=False, overwrite=True,
                          **options)
            row = {"variant": name, "options": options, "perplexity": perplexities(dst, texts),
                   "seconds": round(time.time() - start, 1)}
            if name.startswith("both"):
                row["hidden_state_error_by_layer"] = layer_errors(model, dst, texts[0])
            results["variants"].append(row)
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in results["variants"]:
        if "hidden_state_error_by_layer" in row:
            errors = row["hidden_state_error_by_layer"]
            ax.plot(range(1, len(errors) + 1), errors, "o-", label=row["variant"])
    ax.set(xlabel="decoder layer", ylabel="|h_mla - h| / |h| after the layer",
           title=f"{Path(results['model']).parent.name}: error through the layers (held-out KJV)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
