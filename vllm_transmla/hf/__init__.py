"""transformers classes for converted (MLA) checkpoints; registered with the Auto classes on import."""

from .configuration import (MLA_CONFIG_CLASSES, LlamaMLAConfig, MixtralMLAConfig, Qwen2MLAConfig, Qwen3MLAConfig,
                            Qwen3MoeMLAConfig)

__all__ = ["MLA_CONFIG_CLASSES", "LlamaMLAConfig", "MixtralMLAConfig", "Qwen2MLAConfig", "Qwen3MLAConfig",
           "Qwen3MoeMLAConfig"]

from .. import register_hf  # noqa: E402  (with our classes defined, transformers learns them)

register_hf()
