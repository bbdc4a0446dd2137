"""The model registry is data the converter and the plugin both read."""

import pytest

from vllm_transmla.errors import TransMLAError
from vllm_transmla.hf.configuration import MLA_CONFIG_CLASSES
from vllm_transmla.registry import families, family_for_source, target_architectures


def test_every_family_is_declared():
    assert set(families()) == {"llama", "mistral", "qwen2", "mixtral", "qwen3", "qwen3_moe"}
    assert target_architectures() == {"LlamaMLAForCausalLM": "llama_mla", "Qwen2MLAForCausalLM": "qwen2_mla",
                                      "MixtralMLAForCausalLM": "mixtral_mla", "Qwen3MLAForCausalLM": "qwen3_mla",
                                      "Qwen3MoeMLAForCausalLM": "qwen3_moe_mla"}
    assert set(target_architectures().values()) == set(MLA_CONFIG_CLASSES)


@pytest.mark.parametrize("arch,model_type,family", [
    ("LlamaForCausalLM", "llama", "llama"), ("MistralForCausalLM", "mistral", "mistral"),
    ("Qwen2ForCausalLM", "qwen2", "qwen2"), ("MixtralForCausalLM", "mixtral", "mixtral"),
    ("Qwen3ForCausalLM", "qwen3", "qwen3"), ("Qwen3MoeForCausalLM", "qwen3_moe", "qwen3_moe"),
])
def test_family_lookup(arch, model_type, family):
    assert family_for_source([arch], model_type).family == family


def test_gemma2_refused_with_reason():
    with pytest.raises(TransMLAError, match="Gemma2ForCausalLM: Gemma2 uses logit soft-capping"):
        family_for_source(["Gemma2ForCausalLM"], "gemma2")


def test_qwen3_no_longer_refused():
    """Qwen3's per-head q/k norms convert (convert/head_norm.py): nothing in unsupported.toml names Qwen3."""
    from vllm_transmla.registry import unsupported_reasons

    assert family_for_source(["Qwen3ForCausalLM"], "qwen3").head_norms
    assert family_for_source(["Qwen3MoeForCausalLM"], "qwen3_moe").head_norms
    assert not any("Qwen3" in arch or "q_norm" in why for arch, why in unsupported_reasons().items())
    assert not family_for_source(["Qwen2ForCausalLM"], "qwen2").head_norms


def test_mismatched_model_type():
    with pytest.raises(TransMLAError, match="model_type='qwen2'"):
        family_for_source(["LlamaForCausalLM"], "qwen2")
