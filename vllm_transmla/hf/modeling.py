"""transformers models for converted checkpoints: the source family's model with MLA attention.

Everything but the attention (and the rotary embedding's width) is transformers' own class; these
subclasses only swap the attention module in, in the manner of HF modular models.
"""

from __future__ import annotations

from torch import nn
from transformers.models.llama import modeling_llama as llama
from transformers.models.mixtral import modeling_mixtral as mixtral
from transformers.models.qwen2 import modeling_qwen2 as qwen2
from transformers.models.qwen3 import modeling_qwen3 as qwen3
from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3_moe

from .attention import MLAAttention, rope_config
from .configuration import (LlamaMLAConfig, MixtralMLAConfig, Qwen2MLAConfig, Qwen3MLAConfig, Qwen3MoeMLAConfig,
                            as_our_config)


def _use_mla(model, layer_cls, rotary_cls) -> None:
    """Replace a freshly built base model's decoder layers and rotary embedding with MLA ones."""
    config = model.config
    model.layers = nn.ModuleList(layer_cls(config, i) for i in range(config.num_hidden_layers))
    model.rotary_emb = rotary_cls(config=rope_config(config))


# --- Llama / Mistral -------------------------------------------------------------------------------
class LlamaMLADecoderLayer(llama.LlamaDecoderLayer):
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.self_attn = MLAAttention(config, layer_idx)


class LlamaMLAPreTrainedModel(llama.LlamaPreTrainedModel):
    config_class = LlamaMLAConfig
    _no_split_modules = ["LlamaMLADecoderLayer"]
    _can_record_outputs = {"hidden_states": LlamaMLADecoderLayer, "attentions": MLAAttention}


class LlamaMLAModel(LlamaMLAPreTrainedModel, llama.LlamaModel):
    def __init__(self, config):
        super().__init__(config)
        _use_mla(self, LlamaMLADecoderLayer, llama.LlamaRotaryEmbedding)
        self.post_init()


class LlamaMLAForCausalLM(LlamaMLAPreTrainedModel, llama.LlamaForCausalLM):
    def __init__(self, config):
        config = as_our_config(config)  # a public-converter checkpoint is built as ours
        super().__init__(config)
        self.model = LlamaMLAModel(config)
        self.post_init()


# --- Qwen2 -----------------------------------------------------------------------------------------
class Qwen2MLADecoderLayer(qwen2.Qwen2DecoderLayer):
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.self_attn = MLAAttention(config, layer_idx)


class Qwen2MLAPreTrainedModel(qwen2.Qwen2PreTrainedModel):
    config_class = Qwen2MLAConfig
    _no_split_modules = ["Qwen2MLADecoderLayer"]
    _can_record_outputs = {"hidden_states": Qwen2MLADecoderLayer, "attentions": MLAAttention}


class Qwen2MLAModel(Qwen2MLAPreTrainedModel, qwen2.Qwen2Model):
    def __init__(self, config):
        super().__init__(config)
        _use_mla(self, Qwen2MLADecoderLayer, qwen2.Qwen2RotaryEmbedding)
        self.post_init()


class Qwen2MLAForCausalLM(Qwen2MLAPreTrainedModel, qwen2.Qwen2ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self.model = Qwen2MLAModel(config)
        self.post_init()


# --- Mixtral ---------------------------------------------------------------------------------------
class MixtralMLADecoderLayer(mixtral.MixtralDecoderLayer):
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.self_attn = MLAAttention(config, layer_idx)


class MixtralMLAPreTrainedModel(mixtral.MixtralPreTrainedModel):
    config_class = MixtralMLAConfig
    _no_split_modules = ["MixtralMLADecoderLayer"]
    _can_record_outputs = {
        "router_logits": mixtral.OutputRecorder(mixtral.MixtralTopKRouter, index=0),
        "hidden_states": MixtralMLADecoderLayer,
        "attentions": MLAAttention,
    }


class MixtralMLAModel(MixtralMLAPreTrainedModel, mixtral.MixtralModel):
    def __init__(self, config):
        super().__init__(config)
        _use_mla(self, MixtralMLADecoderLayer, mixtral.MixtralRotaryEmbedding)
        self.post_init()


class MixtralMLAForCausalLM(MixtralMLAPreTrainedModel, mixtral.MixtralForCausalLM):
    def __init__(self, config):
        config = as_our_config(config)
        super().__init__(config)
        self.model = MixtralMLAModel(config)
        self.post_init()


# --- Qwen3 (per-head q/k norms inside MLAAttention) -------------------------------------------------
class Qwen3MLADecoderLayer(qwen3.Qwen3DecoderLayer):
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.self_attn = MLAAttention(config, layer_idx)


class Qwen3MLAPreTrainedModel(qwen3.Qwen3PreTrainedModel):
    config_class = Qwen3MLAConfig
    _no_split_modules = ["Qwen3MLADecoderLayer"]
    _can_record_outputs = {"hidden_states": Qwen3MLADecoderLayer, "attentions": MLAAttention}


class Qwen3MLAModel(Qwen3MLAPreTrainedModel, qwen3.Qwen3Model):
    def __init__(self, config):
        super().__init__(config)
        _use_mla(self, Qwen3MLADecoderLayer, qwen3.Qwen3RotaryEmbedding)
        self.post_init()


class Qwen3MLAForCausalLM(Qwen3MLAPreTrainedModel, qwen3.Qwen3ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self.model = Qwen3MLAModel(config)
        self.post_init()


# --- Qwen3-MoE -------------------------------------------------------------------------------------
class Qwen3MoeMLADecoderLayer(qwen3_moe.Qwen3MoeDecoderLayer):
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.self_attn = MLAAttention(config, layer_idx)


class Qwen3MoeMLAPreTrainedModel(qwen3_moe.Qwen3MoePreTrainedModel):
    config_class = Qwen3MoeMLAConfig
    _no_split_modules = ["Qwen3MoeMLADecoderLayer"]
    _can_record_outputs = {
        "router_logits": qwen3_moe.OutputRecorder(qwen3_moe.Qwen3MoeTopKRouter, index=0),
        "hidden_states": Qwen3MoeMLADecoderLayer,
        "attentions": MLAAttention,
    }


class Qwen3MoeMLAModel(Qwen3MoeMLAPreTrainedModel, qwen3_moe.Qwen3MoeModel):
    def __init__(self, config):
        super().__init__(config)
        _use_mla(self, Qwen3MoeMLADecoderLayer, qwen3_moe.Qwen3MoeRotaryEmbedding)
        self.post_init()


class Qwen3MoeMLAForCausalLM(Qwen3MoeMLAPreTrainedModel, qwen3_moe.Qwen3MoeForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self.model = Qwen3MoeMLAModel(config)
        self.post_init()


MLA_CAUSAL_LM_CLASSES = {
    LlamaMLAConfig: LlamaMLAForCausalLM,
    Qwen2MLAConfig: Qwen2MLAForCausalLM,
    MixtralMLAConfig: MixtralMLAForCausalLM,
    Qwen3MLAConfig: Qwen3MLAForCausalLM,
    Qwen3MoeMLAConfig: Qwen3MoeMLAForCausalLM,
}


def set_absorbed(model, absorb: bool = True) -> None:
    """Switch every MLA layer of `model` between the naive and the absorbed attention path."""
    for module in model.modules():
        if isinstance(module, MLAAttention):
            module.absorb = absorb
