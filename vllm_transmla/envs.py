"""Every environment variable vllm-transmla reads, in one place, typed, read when asked (not at import), so
that a test or a launcher may set them before use.

| variable | type, default | what it does |
|---|---|---|
| VLLM_TRANSMLA_CACHE | path, ~/.cache/vllm_transmla | the compiled CPU kernels and the fetched real model |
| VLLM_TRANSMLA_CPU_KERNEL | 0/1, 1 | 0: decode and prefill in torch ops instead of the fused C kernels |
| VLLM_TRANSMLA_SHORT_QUERY_TOKENS | int, 16 | requests with up to this many new tokens take the absorbed decode path |
| CC | path, cc or gcc on PATH | the C compiler that builds the CPU kernels |
| TRANSMLA_DEBUG_LAYER_DELAY | seconds, 0 | sleep after each converted layer (tests interrupt conversions) |
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("VLLM_TRANSMLA_CACHE") or Path.home() / ".cache" / "vllm_transmla")


def cpu_kernel_enabled() -> bool:
    return os.environ.get("VLLM_TRANSMLA_CPU_KERNEL", "1") != "0"


def short_query_tokens() -> int:
    return int(os.environ.get("VLLM_TRANSMLA_SHORT_QUERY_TOKENS", "16"))


def c_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def debug_layer_delay() -> float:
    return float(os.environ.get("TRANSMLA_DEBUG_LAYER_DELAY", "0"))
