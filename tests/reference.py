"""Independent references for serving tests: greedy decoding and top-k logprobs from transformers."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

import vllm_transmla  # noqa: F401  (registers our transformers classes)


def hf_greedy(model_path, prompts: list[list[int]], max_tokens: int, dtype=torch.float32, top_k: int = 5,
              **config_overrides):
    """Greedy continuation of each prompt (no EOS stop) with the top-k logprobs of every step."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **config_overrides).eval()
    results = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        tokens, logprobs = [], []
        with torch.no_grad():
            for _ in range(max_tokens):
                logp = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
                top = torch.topk(logp, top_k)
                token = int(top.indices[0])
                tokens.append(token)
                logprobs.append({str(int(i)): float(v) for i, v in zip(top.indices, top.values)})
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        results.append({"token_ids": tokens, "logprobs": logprobs})
    return results


def run_vllm(job: dict, env: dict | None = None) -> dict:
    """Run a vLLM engine job in a fresh process (see vllm_transmla.testing.offline)."""
    from vllm_transmla.testing.offline import run_in_subprocess

    return run_in_subprocess(job, env=env)


def check_logprobs_close(reference: list[dict], tested: list[dict], label: str = "") -> None:
    """vLLM's test criterion: tokens agree until the first difference, where each side's token must be
    among the other's top-k; then that sequence stops being compared."""
    for i, (ref, out) in enumerate(zip(reference, tested)):
        for step, (a, b) in enumerate(zip(ref["token_ids"], out["token_ids"])):
            if a != b:
                assert str(a) in out["logprobs"][step] and str(b) in ref["logprobs"][step], (
                    f"{label} prompt {i} step {step}: {a} vs {b} not in each other's top-k")
                break
