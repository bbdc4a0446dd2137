"""`make demo`: build the embedded default model, convert it, and show both models agree.

Prints the max logit difference (transformers, fp32), then serves both models with vLLM's offline
`LLM()` and prints greedy continuations side by side with vLLM's own KV-cache figures for each.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

PROMPTS = ["In the beginning God created", "And God said, Let there be", "And the evening and the morning",
           "And God called the dry land"]
NEW_TOKENS = 24


def build_default_model(workdir: Path) -> Path:
    """The embedded default: a small Llama (GQA 4:2, llama3 rope scaling) with a local tokenizer."""
    from .tiny import build_tiny_model

    path = workdir / "original"
    if not (path / "config.json").exists():
        build_tiny_model("llama-rope3", path, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    return path


def hf_greedy(path: Path, prompts: list[str]) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        outs.append(tok.decode(gen[0, ids.shape[1]:]))
    return outs


def max_logit_diff(a: Path, b: Path, tokens: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    logits = []
    for path in (a, b):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(tokens).logits)
    return (logits[0] - logits[1]).abs().max().item()


KV_BUDGET = 16 * 2**20  # bytes of KV cache given to each engine


def vllm_side_by_side(original: Path, converted: Path) -> None:
    """Serve both models with vLLM (each in a fresh process) and print outputs and KV figures."""
    from transformers import AutoTokenizer

    from .serving.offline import run_in_subprocess

    tok = AutoTokenizer.from_pretrained(converted)
    prompt_ids = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    results = {}
    for label, path in (("original", original), ("MLA exact", converted)):
        print(f"starting vLLM for the {label} model ...", flush=True)
        results[label] = run_in_subprocess({"model": str(path), "prompts": prompt_ids, "max_tokens": NEW_TOKENS,
                                            "dtype": "float32", "kv_cache_memory_bytes": KV_BUDGET,
                                            "enforce_eager": True})
    print(f"\nvLLM, fp32, KV budget {KV_BUDGET // 2**20} MiB:")
    for label, r in results.items():
        tokens = r["num_gpu_blocks"] * r["block_size"]
        print(f"  {label:>9}: use_mla={r['use_mla']}, cache head size {r['head_size']} x {r['num_kv_heads']} "
              f"head(s); {tokens} tokens fit -> {KV_BUDGET / tokens:.0f} bytes per token")
    print("\ngreedy continuations (vLLM):")
    for i, prompt in enumerate(PROMPTS):
        a, b = (results[k]["outputs"][i]["token_ids"] for k in ("original", "MLA exact"))
        print(f"  prompt   : {prompt!r}\n  original : {tok.decode(a)!r}\n  MLA      : {tok.decode(b)!r}"
              f"  [{'same' if a == b else 'DIFFERENT'}]")


def main(workdir: str | Path = "demo_out", serve: bool = True) -> int:
    from transformers import AutoConfig

    import vllm_transmla  # noqa: F401
    from .convert.pipeline import convert, kv_bytes_per_token

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    original = build_default_model(workdir)
    converted = workdir / "mla-exact"
    shutil.rmtree(converted, ignore_errors=True)
    convert(original, converted, mode="exact")

    torch.manual_seed(0)
    tokens = torch.randint(3, 384, (4, 64))
    print(f"\nmax |logit difference| over 4 x 64 tokens (fp32): {max_logit_diff(original, converted, tokens):.2e}")
    for label, path in (("original", original), ("MLA exact", converted)):
        cfg = AutoConfig.from_pretrained(path)
        print(f"KV cache per token, bf16, {label:>9}: {kv_bytes_per_token(cfg)} bytes ({cfg.model_type})")
    print("\ngreedy continuations (transformers):")
    for prompt, a, b in zip(PROMPTS, hf_greedy(original, PROMPTS), hf_greedy(converted, PROMPTS)):
        print(f"  prompt   : {prompt!r}\n  original : {a!r}\n  MLA      : {b!r}  [{'same' if a == b else 'DIFFERENT'}]")
    if serve:
        vllm_side_by_side(original, converted)
    return 0
