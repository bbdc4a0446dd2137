"""Tell vLLM that our model_types use MLA.

vLLM decides `use_mla` (and so a latent cache of kv_lora_rank + qk_rope_head_dim per token) in
`ModelArchConfigConvertorBase.is_deepseek_mla()` from a hard-coded model_type list. Without this
convertor vLLM would silently fall back to an uncompressed per-head cache. The class lives at
module level because the engine process unpickles configs that refer to it.
"""

from __future__ import annotations

from vllm.transformers_utils.model_arch_config_convertor import ModelArchConfigConvertorBase


class TransMLAArchConfigConvertor(ModelArchConfigConvertorBase):
    def is_deepseek_mla(self) -> bool:
        return getattr(self.hf_text_config, "kv_lora_rank", None) is not None
