"""vLLM plugin registration (entry point group `vllm.general_plugins`), run in every vLLM process.

Cheap and re-entrant: model classes are registered lazily as "module:Class" strings; nothing heavy
is imported until vLLM builds a model.
"""

from __future__ import annotations

from ..registry import families, target_architectures

MODELS_MODULE = "vllm_transmla.serving.models"


def register_vllm() -> None:
    from vllm import ModelRegistry
    from vllm.transformers_utils import model_arch_config_convertor as convertors

    from .arch_config import TransMLAArchConfigConvertor

    supported = set(ModelRegistry.get_supported_archs())
    for arch in target_architectures():
        if arch not in supported:
            ModelRegistry.register_model(arch, f"{MODELS_MODULE}:{arch}")
    for spec in families().values():
        convertors.MODEL_ARCH_CONFIG_CONVERTORS[spec.target_model_type] = TransMLAArchConfigConvertor
