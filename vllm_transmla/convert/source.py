"""Opening and checking a source checkpoint before anything is written."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import TransMLAError
from ..registry import FamilySpec, family_for_source
from .checkpoint import SourceCheckpoint
from .geometry import GQAShape

SUPPORTED_ROPE_SCALING_DOC = "default, linear, dynamic, llama3, yarn"


@dataclass
class Source:
    path: Path
    raw_config: dict
    config: object  # transformers PreTrainedConfig
    family: FamilySpec
    gqa: GQAShape
    weights: SourceCheckpoint

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers


def read_raw_config(path: Path, what: str = "source", expected: str = "a Hugging Face checkpoint directory",
                    fix: str = "fix or re-download it") -> dict:
    """config.json of the checkpoint directory `path` as a dict; errors name `what` the directory is, what
    was `expected` there and how to `fix` a broken file."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not path.is_dir():
        raise TransMLAError(f"{what} {path} is not a directory: "
                            f"pass a checkpoint directory (config.json + *.safetensors)")
    if not cfg_path.is_file():
        raise TransMLAError(f"no config.json in {what} {path}: pass {expected}")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TransMLAError(f"{cfg_path} is not valid JSON ({err}): {fix}") from None
    if not isinstance(raw, dict):
        raise TransMLAError(f"{cfg_path} is not a JSON object: {fix}")
    return raw


def open_source(path: Path) -> Source:
    """Read config + shard headers and check that they agree; raises TransMLAError otherwise."""
    path = Path(path)
    raw = read_raw_config(path)
    family = family_for_source(raw.get("architectures"), raw.get("model_type"))
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:  # transformers validates fields strictly
        raise TransMLAError(f"config.json in {path} is invalid ({str(err).splitlines()[0]}): "
                            f"fix the named key") from None
    _check_config(config, family)
    weights = SourceCheckpoint(path)
    source = Source(path, raw, config, family, GQAShape.from_config(config), weights)
    check_weights_match_config(source)
    return source


def _check_config(config, family: FamilySpec) -> None:
    for key in family.refuse.get("config_keys", []):
        if getattr(config, key, None):
            raise TransMLAError(f"config key {key}={getattr(config, key)!r} is not supported for {family.family}: "
                                f"set it to false/null if the model does not need it")
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type not in family.rope["scaling_types"]:
        raise TransMLAError(f"rope scaling type {rope_type!r} is not supported (supported: "
                            f"{', '.join(family.rope['scaling_types'])}): convert a model without it")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise TransMLAError("partial_rotary_factor != 1 is not supported: only fully rotary heads convert")
    gqa = GQAShape.from_config(config)
    if gqa.num_heads % gqa.num_kv_heads:
        raise TransMLAError(f"num_attention_heads={gqa.num_heads} is not a multiple of "
                            f"num_key_value_heads={gqa.num_kv_heads}: fix config.json")
    if gqa.head_dim % 2:
        raise TransMLAError(f"head_dim={gqa.head_dim} is odd: RoPE needs an even head_dim; fix config.json")


def check_weights_match_config(source: Source) -> None:
    """Every attention tensor exists with the shape the config implies; say which key disagrees."""
    gqa, family, w, cfg = source.gqa, source.family, source.weights, source.config
    expected = {
        "q_proj": (gqa.num_heads * gqa.head_dim, gqa.hidden_size),
        "k_proj": (gqa.kv_width, gqa.hidden_size),
        "v_proj": (gqa.kv_width, gqa.hidden_size),
        "o_proj": (gqa.hidden_size, gqa.num_heads * gqa.head_dim),
    }
    qkv_bias, o_bias = family.has_bias("qkv_bias", cfg), family.has_bias("o_bias", cfg)
    for layer in range(source.num_layers):
        for role, shape in expected.items():
            name = family.attn_name(role, layer) + ".weight"
            if name not in w:
                raise TransMLAError(f"tensor {name} is missing although config.json has num_hidden_layers="
                                    f"{source.num_layers}: the checkpoint is incomplete or the config is wrong")
            if w.shape(name) != shape:
                raise TransMLAError(
                    f"config.json contradicts the weights: {name} has shape {list(w.shape(name))} but "
                    f"hidden_size={gqa.hidden_size}, num_attention_heads={gqa.num_heads}, "
                    f"num_key_value_heads={gqa.num_kv_heads}, head_dim={gqa.head_dim} imply {list(shape)}; "
                    f"fix config.json to match the weights"
                )
            bias = family.attn_name(role, layer) + ".bias"
            wants_bias = o_bias if role == "o_proj" else qkv_bias
            if (bias in w) != wants_bias:
                raise TransMLAError(
                    f"config.json contradicts the weights: {bias} is {'present' if bias in w else 'absent'} "
                    f"but the config implies {'a' if wants_bias else 'no'} bias; fix attention_bias in config.json"
                )
    floating = {"F32", "F16", "BF16"}
    for shard, header in w.headers.items():
        odd = next(((n, h["dtype"]) for n, h in header.items() if n != "__metadata__" and h["dtype"] not in floating),
                   None)
        if odd:
            raise TransMLAError(f"tensor {odd[0]} in {shard} has dtype {odd[1]}: vllm-transmla converts float32, "
                                f"float16 and bfloat16 checkpoints; dequantize the model (or load and re-save it in "
                                f"bfloat16) first")
    extra = f"model.layers.{source.num_layers}."
    if any(n.startswith(extra) for n in w.names()):
        raise TransMLAError(f"the weights have more layers than num_hidden_layers={source.num_layers}: "
                            f"fix num_hidden_layers in config.json")
    vocab = cfg.vocab_size
    if "model.embed_tokens.weight" in w and w.shape("model.embed_tokens.weight") != (vocab, gqa.hidden_size):
        raise TransMLAError(f"config.json contradicts the weights: model.embed_tokens.weight has shape "
                            f"{list(w.shape('model.embed_tokens.weight'))} but vocab_size={vocab}, "
                            f"hidden_size={gqa.hidden_size}; fix config.json")
    if not getattr(cfg, "tie_word_embeddings", False) and "lm_head.weight" not in w:
        raise TransMLAError("lm_head.weight is missing and tie_word_embeddings is false: set "
                            "tie_word_embeddings=true in config.json if the model ties them, or re-download")
