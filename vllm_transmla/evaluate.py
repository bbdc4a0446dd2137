"""`transmla eval`: perplexity of a checkpoint (original or converted) on a text file, via transformers."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .errors import TransMLAError


def perplexity(model_path: str | Path, text_file: str | Path, seq_len: int = 256, max_tokens: int | None = None,
               dtype: torch.dtype = torch.float32, model=None) -> dict:
    """Mean next-token negative log-likelihood over non-overlapping windows of `seq_len` (+1) tokens.
    `model`: an already built causal LM to measure instead of loading `model_path`'s (the tokenizer is
    still `model_path`'s).

    Returns {"perplexity", "nll", "tokens", "windows"}.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import vllm_transmla  # noqa: F401  (our checkpoints' classes)

    text_file = Path(text_file)
    if not text_file.is_file():
        raise TransMLAError(f"evaluation text {text_file} does not exist: pass --text FILE")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = torch.tensor(tokenizer(text_file.read_text(), add_special_tokens=False).input_ids)
    if max_tokens:
        ids = ids[: max_tokens + 1]
    windows = (ids.numel() - 1) // seq_len
    if windows < 1:
        raise TransMLAError(f"{text_file} has {ids.numel()} tokens, fewer than one window of {seq_len + 1}: "
                            f"pass more text or a smaller --seq-len")
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    total = 0.0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(windows):
            chunk = ids[i * seq_len:(i + 1) * seq_len + 1][None].to(device)
            logits = model(chunk[:, :-1]).logits.float()
            total += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
    nll = total / (windows * seq_len)
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": windows * seq_len, "windows": windows}
