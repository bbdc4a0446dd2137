"""transformers classes for converted (MLA) checkpoints; registered with the Auto classes on import."""

from .configuration import MLA_CONFIG_CLASSES, LlamaMLAConfig, MixtralMLAConfig, Qwen2MLAConfig

__all__ = ["MLA_CONFIG_CLASSES", "LlamaMLAConfig", "MixtralMLAConfig", "Qwen2MLAConfig"]

from .. import register_hf  # noqa: E402  (with our classes defined, transformers learns them)

register_hf()
