"""The model registry is data the converter and the plugin both read."""

import pytest

from vllm_transmla.errors import TransMLAError
from vllm_transmla.hf.configuration import MLA_CONFIG_CLASSES
from vllm_transmla.registry import families, family_for_source, target_architectures


def test_every_family_is_declared():
    assert set(families()) == {"llama", "mistral", "qwen2", "mixtral"}
    assert target_architectures() == {"LlamaMLAForCausalLM": "llama_mla", "Qwen2MLAForCausalLM": "qwen2_mla",
                                      "MixtralMLAForCausalLM": "mixtral_mla"}
    assert set(target_architectures().values()) == set(MLA_CONFIG_CLASSES)


@pytest.mark.parametrize("arch,model_type,family", [
    ("LlamaForCausalLM", "llama", "llama"), ("MistralForCausalLM", "mistral", "mistral"),
    ("Qwen2ForCausalLM", "qwen2", "qwen2"), ("MixtralForCausalLM", "mixtral", "mixtral"),
])
def test_family_lookup(arch, model_type, family):
    assert family_for_source([arch], model_type).family == family


def test_qwen3_refused_with_reason():
    with pytest.raises(TransMLAError, match="q_norm/k_norm"):
        family_for_source(["Qwen3ForCausalLM"], "qwen3")


def test_mismatched_model_type():
    with pytest.raises(TransMLAError, match="model_type='qwen2'"):
        family_for_source(["LlamaForCausalLM"], "qwen2")
