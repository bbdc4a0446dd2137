"""Small random models of every supported family, built locally (no model hub), for tests and the demo.

Each is a real transformers checkpoint directory: config.json, sharded safetensors with an index, and
a byte-level BPE tokenizer trained on the public-domain text shipped in `vllm_transmla/data`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

SAMPLE_TEXT = "genesis_kjv.txt"

# name -> (transformers config class name, config overrides)
_BASE = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
             initializer_range=0.08, bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY_MODELS: dict[str, tuple[str, dict]] = {
    "llama-rope3": ("LlamaConfig", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama-mha": ("LlamaConfig", dict(num_key_value_heads=4, attention_bias=True)),
    "mistral": ("MistralConfig", dict(sliding_window=4096)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=1)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    # per-head q/k RMSNorm; head_dim 32 x 4 heads != hidden 64, as in Qwen3-0.6B
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True)),
    "qwen3-bias": ("Qwen3Config", dict(tie_word_embeddings=False, attention_bias=True, num_key_value_heads=1)),
    "qwen3-moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                         mlp_only_layers=[0], decoder_sparse_step=1, norm_topk_prob=True,
                                         tie_word_embeddings=False)),
}


def sample_text() -> str:
    return resources.files("vllm_transmla.data").joinpath(SAMPLE_TEXT).read_text()


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on the shipped sample text (deterministic)."""
    return train_bpe_tokenizer(sample_text().splitlines(), vocab_size)


def train_bpe_tokenizer(lines: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (transformers fast tokenizer) trained on `lines`, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


# A plain chat template so `/v1/chat/completions` works on the tiny models.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_tiny_model(name: str, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                     max_shard_size: str = "200KB", **overrides) -> Path:
    """Save a random tiny model of kind `name` (see TINY_MODELS) to `out_dir`; returns the path."""
    import transformers

    config_cls_name, extra = TINY_MODELS[name]
    config = getattr(transformers, config_cls_name)(**{**_BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    build_tokenizer(config.vocab_size).save_pretrained(out_dir)
    return out_dir


def build_random_mla(out_dir: str | Path, kv_lora_rank: int, qk_rope_head_dim: int, qk_nope_head_dim: int = 32,
                     v_head_dim: int = 32, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a random MLA checkpoint of our format with the given latent shape (no source model)."""
    from ..hf.configuration import MLA_CONFIG_CLASSES
    from ..hf.modeling import MLA_CAUSAL_LM_CLASSES

    config_cls = MLA_CONFIG_CLASSES[f"{family}_mla"]
    fields = {**_BASE, "num_key_value_heads": _BASE["num_attention_heads"], "kv_lora_rank": kv_lora_rank,
              "qk_rope_head_dim": qk_rope_head_dim, "qk_nope_head_dim": qk_nope_head_dim,
              "v_head_dim": v_head_dim, "softmax_scale": (qk_nope_head_dim + qk_rope_head_dim) ** -0.5,
              "mla_q_bias": family == "qwen2", "mla_kv_a_bias": family == "qwen2",
              "transmla": {"mode": "random", "source_family": family}, **overrides}
    config = config_cls(**fields)
    config.architectures = [MLA_CAUSAL_LM_CLASSES[config_cls].__name__]
    torch.manual_seed(seed)
    model = MLA_CAUSAL_LM_CLASSES[config_cls](config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, max_shard_size="1MB")
    build_tokenizer(config.vocab_size).save_pretrained(out_dir)
    return out_dir
