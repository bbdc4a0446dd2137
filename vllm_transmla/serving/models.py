"""vLLM model classes for converted checkpoints: vLLM's own Llama / Qwen2 / Mixtral / Qwen3 / Qwen3-MoE with
our MLA attention in every decoder layer (MLPs, MoE routing, norms, embeddings and lm_head are vLLM's)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models import mixtral, qwen3_moe
from vllm.model_executor.models.llama import LlamaForCausalLM, LlamaMLP, LlamaModel
from vllm.model_executor.models.utils import WeightsMapper, extract_layer_index

from .attention import LatentAttention

# Our checkpoints have q_proj / kv_a_proj_with_mqa / kv_b_proj, not a fused qkv_proj: only the MLP
# halves are stacked on load.
MLA_WEIGHTS_MAPPER = WeightsMapper(orig_to_new_stacked={".gate_proj": (".gate_up_proj", 0),
                                                        ".up_proj": (".gate_up_proj", 1)})


def finite_weights(weights):
    """The (name, tensor) stream of a checkpoint, refusing NaN/Inf tensors: vLLM would load them and answer
    every request with token 0 (empty text) at HTTP 200."""
    for name, tensor in weights:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"vllm-transmla: tensor {name} holds {bad} NaN/Inf values: the checkpoint is broken (a "
                             f"diverged fine-tune?); find them with `transmla check --weights DIR` and reconvert")
        yield name, tensor


class _CheckedWeights:
    """Mixin for the causal LMs: weights pass `finite_weights` on their way to vLLM's loader."""

    def load_weights(self, weights):
        return super().load_weights(finite_weights(weights))


@contextlib.contextmanager
def _module_globals(module, **replacements):
    """Let a vLLM constructor that names its sub-classes directly build ours instead: vLLM 0.32 / 0.33's
    Mixtral has no layer-type hook, Qwen3-MoE's causal LM none for its model (Llama's has one, and Llama, Qwen2
    and Qwen3 use it)."""
    saved = {name: getattr(module, name) for name in replacements}
    for name, value in replacements.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


class _MLADecoderLayer(nn.Module):
    """Pre-norm residual block: latent attention, then the family's feed-forward (`self._ffn`)."""

    def _init_attention(self, config, cache_config, quant_config, prefix):
        self.hidden_size = config.hidden_size
        self.self_attn = LatentAttention(config, cache_config, quant_config, prefix=f"{prefix}.self_attn")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self._ffn(hidden_states), residual


# --- Llama / Mistral -------------------------------------------------------------------------------
class LlamaMLADecoderLayer(_MLADecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", config=None):
        super().__init__()
        config = config or vllm_config.model_config.hf_config
        self._init_attention(config, vllm_config.cache_config, vllm_config.quant_config, prefix)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            quant_config=vllm_config.quant_config, bias=getattr(config, "mlp_bias", False),
                            prefix=f"{prefix}.mlp")

    def _ffn(self, x):
        return self.mlp(x)


class LlamaMLAModel(LlamaModel):
    hf_to_vllm_mapper = MLA_WEIGHTS_MAPPER


class LlamaMLAForCausalLM(_CheckedWeights, LlamaForCausalLM):
    hf_to_vllm_mapper = MLA_WEIGHTS_MAPPER
    packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=LlamaMLADecoderLayer)

    def _init_model(self, vllm_config, prefix: str = "", layer_type=LlamaMLADecoderLayer):
        return LlamaMLAModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)


# --- Qwen2 -----------------------------------------------------------------------------------------
# A Qwen2 decoder layer is a Llama one up to the attention biases, which our latent attention carries
# (mla_q_bias / mla_kv_a_bias), and the tensor names are Llama's: vLLM's Llama model with its layer_type
# hook builds it, so no vLLM internals are swapped.
class Qwen2MLAForCausalLM(LlamaMLAForCausalLM):
    pass


# --- Mixtral ---------------------------------------------------------------------------------------
class MixtralMLADecoderLayer(_MLADecoderLayer, mixtral.MixtralDecoderLayer):
    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "", enable_eplb=False):
        nn.Module.__init__(self)
        self._init_attention(config, cache_config, quant_config, prefix)
        self.block_sparse_moe = mixtral.MixtralMoE(
            num_experts=config.num_local_experts, top_k=config.num_experts_per_tok,
            hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            quant_config=quant_config, prefix=f"{prefix}.block_sparse_moe", enable_eplb=enable_eplb)

    def _ffn(self, x):
        return self.block_sparse_moe(x)

    forward = _MLADecoderLayer.forward


class MixtralMLAModel(mixtral.MixtralModel):
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_substr=mixtral.MixtralModel.hf_to_vllm_mapper.orig_to_new_substr)


class MixtralMLAForCausalLM(_CheckedWeights, mixtral.MixtralForCausalLM):
    hf_to_vllm_mapper = MixtralMLAModel.hf_to_vllm_mapper
    packed_modules_mapping = {}

    def __init__(self, *, vllm_config, prefix: str = ""):
        with _module_globals(mixtral, MixtralModel=MixtralMLAModel, MixtralDecoderLayer=MixtralMLADecoderLayer):
            super().__init__(vllm_config=vllm_config, prefix=prefix)


# --- Qwen3 -----------------------------------------------------------------------------------------
# A Qwen3 decoder layer is a Llama one up to its attention's per-head q/k norms, which our latent attention
# carries (mla_key_norm_heads); MLP, norms and tied embeddings are Llama's, so vLLM's Llama model builds it.
class Qwen3MLAForCausalLM(LlamaMLAForCausalLM):
    pass


# --- Qwen3-MoE -------------------------------------------------------------------------------------
class Qwen3MoeMLADecoderLayer(_MLADecoderLayer, qwen3_moe.Qwen3MoeDecoderLayer):
    """vLLM's Qwen3-MoE layer with our attention: sparse MoE block (FusedMoE, no shared expert), or the dense
    MLP in `mlp_only_layers` and off the `decoder_sparse_step`, chosen as vLLM chooses."""

    def __init__(self, vllm_config, prefix: str = "", **_unused):
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_text_config
        self._init_attention(config, vllm_config.cache_config, vllm_config.quant_config, prefix)
        layer = extract_layer_index(prefix)
        sparse = (layer not in (getattr(config, "mlp_only_layers", None) or []) and config.num_experts > 0
                  and (layer + 1) % config.decoder_sparse_step == 0)
        if sparse:
            self.mlp = qwen3_moe.Qwen3MoeSparseMoeBlock(vllm_config=vllm_config, prefix=f"{prefix}.mlp")
        else:
            self.mlp = qwen3_moe.Qwen3MoeMLP(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                                             hidden_act=config.hidden_act, quant_config=vllm_config.quant_config,
                                             prefix=f"{prefix}.mlp")

    def _ffn(self, x):
        return self.mlp(x)

    forward = _MLADecoderLayer.forward


class Qwen3MoeMLAModel(qwen3_moe.Qwen3MoeModel):
    # vLLM's mapper also stacks q/k/v into qkv_proj, which our attention does not have
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_stacked={".mlp.gate_proj": (".mlp.gate_up_proj", 0),
                                                           ".mlp.up_proj": (".mlp.gate_up_proj", 1)})

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, decoder_layer_type=Qwen3MoeMLADecoderLayer)


class Qwen3MoeMLAForCausalLM(_CheckedWeights, qwen3_moe.Qwen3MoeForCausalLM):
    hf_to_vllm_mapper = Qwen3MoeMLAModel.hf_to_vllm_mapper
    packed_modules_mapping = {}

    def __init__(self, *, vllm_config, prefix: str = ""):
        with _module_globals(qwen3_moe, Qwen3MoeModel=Qwen3MoeMLAModel):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
