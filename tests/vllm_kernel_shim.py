"""Make vLLM's Triton MLA decode kernel importable on a GPU machine that has torch and Triton but no
vLLM (the project's lent GPU machines cannot install one: vLLM's CUDA wheel pins another torch and is
far above what a call can carry).

    python tests/vllm_kernel_shim.py vllm-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl .gpu_shim
    PYTHONPATH=.gpu_shim:. python -m pytest --noconftest tests/test_triton_decode_cuda.py

writes DIR/vllm/... with `v1/attention/ops/triton_decode_attention.py` taken unchanged from the wheel
(its sha256 checked against the wheel's RECORD) and stubs for the two modules it imports: `platforms`
(`current_platform.is_rocm()` is False: an NVIDIA GPU) and `triton_utils` (Triton itself)."""

from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path

KERNEL = "vllm/v1/attention/ops/triton_decode_attention.py"
STUBS = {
    "vllm/__init__.py": '"""Stub: only what v1/attention/ops/triton_decode_attention.py imports."""\n',
    "vllm/platforms/__init__.py": (
        "class _NvidiaGPU:\n"
        "    @staticmethod\n"
        "    def is_rocm() -> bool:\n"
        "        return False\n\n\n"
        "current_platform = _NvidiaGPU()\n"
    ),
    "vllm/triton_utils/__init__.py": "import triton  # noqa: F401\nimport triton.language as tl  # noqa: F401\n",
    "vllm/v1/__init__.py": "",
    "vllm/v1/attention/__init__.py": "",
    "vllm/v1/attention/ops/__init__.py": "",
}


def recorded_sha256(wheel: zipfile.ZipFile, name: str) -> str:
    record = next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))
    for line in wheel.read(record).decode().splitlines():
        path, digest, _ = line.rsplit(",", 2)
        if path == name:
            return digest.removeprefix("sha256=")
    raise SystemExit(f"{name} is not in {record}: not a vLLM wheel with the Triton MLA decode kernel")


def main(wheel_path: str, out_dir: str) -> None:
    out = Path(out_dir)
    with zipfile.ZipFile(wheel_path) as wheel:
        source = wheel.read(KERNEL)
        digest = base64.urlsafe_b64encode(hashlib.sha256(source).digest()).rstrip(b"=").decode()
        if digest != recorded_sha256(wheel, KERNEL):
            raise SystemExit(f"{KERNEL} in {wheel_path} does not match the wheel's RECORD")
    for name, text in {**STUBS, KERNEL: source.decode()}.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    print(f"wrote vLLM's {KERNEL} ({len(source)} bytes, sha256 checked) and its stubs under {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
