"""Shared fixtures: tiny random models of every family and their exact conversions (built once)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from vllm_transmla.convert.pipeline import convert
from vllm_transmla.tiny import TINY_MODELS, build_tiny_model


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
