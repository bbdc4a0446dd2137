"""`make demo`: convert the embedded reference model and show what conversion keeps.

The reference model is a small Llama (8 query heads of 32 dims, 2 KV heads, 3.9M parameters) trained on
this machine on the King James Bible (benchmarks/reference_model/train_reference.py). The demo converts
it exactly and compressed to a quarter of its KV cache, then prints the logit difference of the exact
conversion, held-out perplexity of all three, and - served by vLLM's offline `LLM()` under the same KV
budget - greedy continuations side by side with vLLM's own KV-cache figures.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import torch

PROMPTS = ["In the beginning God created", "And the LORD spake unto Moses, saying,",
           "Blessed are the poor in spirit:", "The heavens declare the glory of God;"]
NEW_TOKENS = 24
KV_BUDGET = 16 * 2**20  # bytes of KV cache given to each engine
COMPRESSED_FRACTION = 0.25


def reference_model() -> Path:
    return Path(str(resources.files("vllm_transmla.data").joinpath("reference_model")))


def heldout_text() -> Path:
    return Path(str(resources.files("vllm_transmla.data").joinpath("kjv_heldout.txt")))


def max_logit_diff(a: Path, b: Path, tokens: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    logits = []
    for path in (a, b):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(tokens).logits)
    return (logits[0] - logits[1]).abs().max().item()


def vllm_side_by_side(models: dict[str, Path]) -> None:
    """Serve each model with vLLM (each in a fresh process) and print outputs and KV figures."""
    from transformers import AutoTokenizer

    from .serving.offline import run_in_subprocess

    tok = AutoTokenizer.from_pretrained(next(iter(models.values())))
    prompt_ids = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    results = {}
    for label, path in models.items():
        print(f"starting vLLM for the {label} model ...", flush=True)
        results[label] = run_in_subprocess({"model": str(path), "prompts": prompt_ids, "max_tokens": NEW_TOKENS,
                                            "dtype": "float32", "kv_cache_memory_bytes": KV_BUDGET,
                                            "enforce_eager": True})
    print(f"\nvLLM, fp32, KV budget {KV_BUDGET // 2**20} MiB per model:")
    for label, r in results.items():
        tokens = r["num_gpu_blocks"] * r["block_size"]
        print(f"  {label:>10}: use_mla={r['use_mla']!s:5} cache head size {r['head_size']:>3} x {r['num_kv_heads']} "
              f"head(s); {tokens:>6} tokens fit -> {KV_BUDGET / tokens:6.0f} bytes per token")
    print("\ngreedy continuations (vLLM):")
    for i, prompt in enumerate(PROMPTS):
        print(f"  {prompt!r}")
        first = results["original"]["outputs"][i]["token_ids"]
        for label, r in results.items():
            ids = r["outputs"][i]["token_ids"]
            mark = "" if label == "original" else ("  [same as original]" if ids == first else "")
            print(f"    {label:>10}: {tok.decode(ids)!r}{mark}")


def main(workdir: str | Path = "demo_out", serve: bool = True) -> int:
    from transformers import AutoConfig

    import vllm_transmla  # noqa: F401
    from .convert.pipeline import convert, kv_bytes_per_token
    from .evaluate import perplexity

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    models = {"original": reference_model(), "MLA exact": workdir / "mla-exact",
              f"MLA {COMPRESSED_FRACTION:.0%}": workdir / "mla-compressed"}
    for path in list(models.values())[1:]:
        shutil.rmtree(path, ignore_errors=True)
    convert(models["original"], models["MLA exact"], mode="exact")
    convert(models["original"], models[f"MLA {COMPRESSED_FRACTION:.0%}"], kv_ratio=COMPRESSED_FRACTION)

    torch.manual_seed(0)
    tokens = torch.randint(3, 2000, (4, 128))
    diff = max_logit_diff(models["original"], models["MLA exact"], tokens)
    print(f"\nexact conversion: max |logit difference| over 4 x 128 tokens (fp32) = {diff:.2e}")
    print(f"\nheld-out perplexity ({heldout_text().name}) and KV cache per token (bf16, all layers):")
    for label, path in models.items():
        cfg = AutoConfig.from_pretrained(path)
        ppl = perplexity(path, heldout_text())["perplexity"]
        print(f"  {label:>10}: perplexity {ppl:7.3f}   KV {kv_bytes_per_token(cfg):5d} bytes/token ({cfg.model_type})")
    if serve:
        vllm_side_by_side(models)
    return 0
