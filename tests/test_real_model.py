"""The real pretrained model (SmolLM2-135M-Instruct, a Llama GQA model: 30 layers, 9 heads x 64, 3 KV heads,
tied embeddings) from its published GGUF file: read by our GGUF reader, converted exactly and compressed,
and served by vLLM with transformers' greedy tokens on the same checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reference import hf_greedy, run_vllm
from vllm_transmla.cli import main as cli_main

pytestmark = pytest.mark.real_model
DATA = Path(__file__).resolve().parents[1] / "vllm_transmla" / "data"
PROMPTS = ["In the beginning God created", "The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a small village,"]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def converted(smollm2, tmp_path_factory):
    """The GGUF file converted exactly and to 25% of its KV cache (default layout, 8K calibration tokens)."""
    root = tmp_path_factory.mktemp("smollm2")
    assert cli_main(["convert", str(smollm2.gguf), str(root / "exact"), "--quiet"]) == 0
    assert cli_main(["convert", str(smollm2.gguf), str(root / "c25"), "--quiet", "--kv-ratio", "0.25",
                     "--calib-tokens", "8192"]) == 0
    return {"exact": root / "exact", "c25": root / "c25"}


def _tokens(model_path, n: int = 256) -> torch.Tensor:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_path)((DATA / "kjv_heldout.txt").read_text()[:4000]).input_ids
    return torch.tensor([ids[:n]])


def test_gguf_tensors_equal_transformers_dequantization(smollm2):
    from safetensors.torch import load_file

    from vllm_transmla.checkpoint.gguf_file import GGUFCheckpoint

    ours = GGUFCheckpoint(smollm2.gguf, num_heads=9, num_kv_heads=3)
    reference = load_file(smollm2.hf / "model.safetensors")
    assert set(ours.names()) == set(reference)
    for name in ours.names():
        assert torch.equal(ours.get(name), reference[name]), name


def test_exact_conversion_of_the_gguf_equals_the_original(smollm2, converted):
    from transformers import AutoModelForCausalLM

    import vllm_transmla  # noqa: F401

    ids = _tokens(smollm2.hf)
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(smollm2.hf, dtype=torch.float32)(ids).logits
        exact = AutoModelForCausalLM.from_pretrained(converted["exact"], dtype=torch.float32)(ids).logits
    assert original.abs().max() > 10 and (original - exact).abs().max() < 1e-3
    config = json.loads((converted["c25"] / "config.json").read_text())
    assert config["kv_lora_rank"] + config["qk_rope_head_dim"] == 96  # 25% of 2 * 3 * 64
    assert cli_main(["check", str(converted["c25"]), "--weights"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("which", ["exact", "c25"])
def test_vllm_greedy_equals_transformers(which, converted):
    from transformers import AutoTokenizer

    path = converted[which]
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    reference = hf_greedy(path, prompts, MAX_TOKENS)
    result = run_vllm({"model": str(path), "dtype": "float32", "prompts": prompts, "max_tokens": MAX_TOKENS,
                       "max_model_len": 512, "kv_cache_memory_bytes": 64 * 2**20})
    config = json.loads((path / "config.json").read_text())
    assert result["use_mla"] and result["head_size"] == config["kv_lora_rank"] + config["qk_rope_head_dim"]
    for i, (ref, out) in enumerate(zip(reference, result["outputs"])):
        assert out["token_ids"] == ref["token_ids"], f"{which} prompt {i}: {tok.decode(out['token_ids'])!r} vs " \
                                                     f"{tok.decode(ref['token_ids'])!r}"


@pytest.mark.slow
def test_vllm_serve_chat_through_the_chat_template(converted, tmp_path):
    """`vllm serve` of the compressed model answers a chat completion through SmolLM2's chat template with
    transformers' greedy answer to the same templated prompt (eager, so the start costs no compilation)."""
    from transformers import AutoTokenizer

    from server import vllm_server

    path = converted["c25"]
    tok = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert "<|im_start|>" in tok.decode(ids)  # SmolLM2's own template, carried from the GGUF file
    reference = hf_greedy(path, [ids], MAX_TOKENS)[0]["token_ids"]
    with vllm_server(path, tmp_path / "server.log", "--max-model-len", "512", "--enforce-eager") as client:
        chat = client.chat.completions.create(model=str(path), messages=messages, max_tokens=MAX_TOKENS,
                                              temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True,
                                                                         "skip_special_tokens": False})
    assert list(chat.choices[0].token_ids) == reference
    assert chat.choices[0].message.content.strip()
