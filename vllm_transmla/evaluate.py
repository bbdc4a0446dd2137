"""`transmla eval`: perplexity of a checkpoint (original or converted) on a text file, via transformers."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .errors import TransMLAError
from .text_files import read_text


WINDOWS_PER_BATCH = 8  # windows are independent; a batch keeps the matmuls wide


def perplexity(model_path: str | Path, text_file: str | Path, seq_len: int = 256, max_tokens: int | None = None,
               dtype: torch.dtype = torch.float32, model=None) -> dict:
    """Mean next-token negative log-likelihood over non-overlapping windows of `seq_len` (+1) tokens.
    `model_path` is a checkpoint directory (or a .gguf file); `model`: an already built causal LM to measure
    instead of loading `model_path`'s (the tokenizer is still `model_path`'s).

    Returns {"perplexity", "nll", "tokens", "windows"}.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise TransMLAError(f"--seq-len {seq_len} must be a positive number of tokens")
    if max_tokens is not None and max_tokens < 1:
        raise TransMLAError(f"--max-tokens {max_tokens} must be a positive number of tokens (or left out)")
    text = read_text(text_file, "evaluation text", "--text")
    tokenizer, model = _load(Path(model_path), dtype, model)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and seq_len > max_positions:
        raise TransMLAError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {max_positions}: "
                            f"positions past it are outside what the model was built for; use --seq-len "
                            f"{max_positions} or less")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    if max_tokens:
        ids = ids[: max_tokens + 1]
    windows = (ids.numel() - 1) // seq_len
    if windows < 1:
        raise TransMLAError(f"{text_file} has {ids.numel()} tokens, fewer than one window of {seq_len + 1}: "
                            f"pass more text or a smaller --seq-len")
    total = 0.0
    device = next(model.parameters()).device
    with torch.no_grad():
        for first in range(0, windows, WINDOWS_PER_BATCH):
            batch = torch.stack([ids[i * seq_len:(i + 1) * seq_len + 1]
                                 for i in range(first, min(windows, first + WINDOWS_PER_BATCH))]).to(device)
            logits = model(batch[:, :-1], use_cache=False).logits.float()  # no KV cache to build
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(),
                                                       reduction="sum").item()
    nll = total / (windows * seq_len)
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": windows * seq_len, "windows": windows}


def _load(path: Path, dtype: torch.dtype, model=None):
    """(tokenizer, model) of a checkpoint directory or GGUF file, with our classes registered."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import vllm_transmla  # noqa: F401  (our checkpoints' classes)

    from .convert.source import transformers_view

    if not path.exists():
        raise TransMLAError(f"model {path} does not exist: pass a checkpoint directory or a .gguf file")
    try:
        with transformers_view(path) as (directory, gguf_file):
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
            if model is None:
                model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=dtype).eval()
    except (OSError, ValueError, KeyError) as err:
        raise TransMLAError(f"cannot load model {path} ({str(err).splitlines()[0]}): pass a checkpoint directory "
                            f"(config.json, weights, tokenizer) or a .gguf file") from None
    return tokenizer, model
