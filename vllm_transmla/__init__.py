"""vllm-transmla: convert GQA models (Llama, Mistral, Qwen2, Mixtral, Qwen3, Qwen3-MoE) to Multi-head Latent
Attention and serve them in vLLM with a compressed, paged latent KV cache.

Importing the package registers the converted checkpoints' config and model classes with
transformers' Auto classes, so `AutoModelForCausalLM.from_pretrained(converted_dir)` works: at once if
transformers is already imported, else the moment it is (a post-import hook), so that `import
vllm_transmla` itself - and `transmla --help` - load neither torch nor transformers.
`register()` is vLLM's plugin entry point (group `vllm.general_plugins`).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_hf_registered = False


def register_hf() -> None:
    """Register our configs and models with transformers' Auto classes (idempotent)."""
    global _hf_registered
    if _hf_registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    from .hf.configuration import MLA_CONFIG_CLASSES
    from .hf.modeling import MLA_CAUSAL_LM_CLASSES

    for model_type, config_cls in MLA_CONFIG_CLASSES.items():
        AutoConfig.register(model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, MLA_CAUSAL_LM_CLASSES[config_cls], exist_ok=True)
    # The public converter's checkpoints say model_type deepseek_v3: transformers picks among a tuple of
    # classes by the config's architectures, so ours build them and real DeepSeek-V3 keeps its own class.
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from .hf.configuration import PUBLIC_ARCHITECTURES

    public = tuple(cls for cls in MLA_CAUSAL_LM_CLASSES.values() if cls.__name__ in PUBLIC_ARCHITECTURES)
    AutoModelForCausalLM._model_mapping.register(DeepseekV3Config, (DeepseekV3ForCausalLM, *public), exist_ok=True)
    # MoE checkpoints store experts one by one; transformers fuses them on load for its own model_types.
    for ours, theirs in (("mixtral_mla", "mixtral"), ("qwen3_moe_mla", "qwen3_moe")):
        register_checkpoint_conversion_mapping(ours, get_checkpoint_conversion_mapping(theirs), overwrite=True)
    _hf_registered = True


def register() -> None:
    """vLLM plugin entry point; see vllm_transmla.serving.plugin."""
    register_hf()
    from .serving.plugin import register_vllm

    register_vllm()


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Runs register_hf() right after `transformers` finishes importing (once; then it leaves sys.meta_path)."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                if "vllm_transmla.hf" not in sys.modules:  # else our classes are mid-import; hf/ registers them
                    register_hf()

            spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    register_hf()
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
