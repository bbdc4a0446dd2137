"""Opening and checking a source checkpoint (a safetensors directory or a GGUF file) before anything is
written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint.atomic import copy_side_files
from ..checkpoint.config_json import read_raw_config
from ..checkpoint.gguf_file import GGUFCheckpoint, read_architecture
from ..checkpoint.safetensors_dir import SafetensorsCheckpoint
from ..errors import TransMLAError
from ..registry import FamilySpec, family_for_source
from .geometry import GQAShape

# Tensors a source may carry that no model reads: pre-4.x transformers saved each layer's rotary
# frequencies; they are recomputed from the config, and copied they would be attention tensors no MLA
# config describes.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass
class AttentionWeights:
    """One decoder layer's source attention weights (as stored): q [H*d, hidden], k and v [n*d, hidden],
    o [hidden, H*d], biases [rows] or None; Qwen3's per-head norm weights q_norm, k_norm [d] or None."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None

    def float(self) -> "AttentionWeights":
        return AttentionWeights(**{k: v.float() if v is not None else None for k, v in vars(self).items()})


@dataclass
class Source:
    path: Path  # the checkpoint directory, or the .gguf file
    raw_config: dict
    config: object  # transformers PreTrainedConfig
    family: FamilySpec
    gqa: GQAShape
    weights: SafetensorsCheckpoint | GGUFCheckpoint
    _tokenizer: object = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def is_gguf(self) -> bool:
        return isinstance(self.weights, GGUFCheckpoint)

    def attention_weights(self, layer: int) -> AttentionWeights:
        """The source attention weights of decoder layer `layer`, by role."""
        def get(role, kind):
            name = f"{self.family.attn_name(role, layer)}.{kind}"
            return self.weights.get(name) if name in self.weights else None

        norms = {}
        if self.family.head_norms:
            norms = dict(q_norm=get("q_norm", "weight"), k_norm=get("k_norm", "weight"))
        return AttentionWeights(q=get("q_proj", "weight"), k=get("k_proj", "weight"), v=get("v_proj", "weight"),
                                o=get("o_proj", "weight"), q_bias=get("q_proj", "bias"), k_bias=get("k_proj", "bias"),
                                v_bias=get("v_proj", "bias"), o_bias=get("o_proj", "bias"), **norms)

    def attention_tensor_names(self, layer: int) -> set[str]:
        """Names of the source tensors `attention_weights(layer)` reads (rebuilt, never copied)."""
        roles = ("q_proj", "k_proj", "v_proj", "o_proj") + (("q_norm", "k_norm") if self.family.head_norms else ())
        return {f"{self.family.attn_name(role, layer)}.{kind}" for role in roles for kind in ("weight", "bias")}

    def tensor_names(self) -> list[str]:
        """Every tensor a model reads (ignored buffers left out)."""
        return [n for n in self.weights.names() if not n.endswith(IGNORED_SUFFIXES)]

    def tokenizer(self):
        """The source's tokenizer, loaded once (from a GGUF it takes seconds: transformers parses the file)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            with transformers_view(self.path) as (directory, gguf_file):
                self._tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        return self._tokenizer

    def write_side_files(self, dst: Path) -> None:
        """Tokenizer, chat template and generation files beside the converted weights."""
        if not self.is_gguf:
            copy_side_files(self.path, dst)
            return
        self.tokenizer().save_pretrained(dst)  # the GGUF's vocabulary, merges, special tokens, chat template
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(self.config).save_pretrained(dst)


@contextlib.contextmanager
def transformers_view(path: Path):
    """(directory, gguf_file) for transformers' from_pretrained: a GGUF file is shown through a private
    directory holding only a link to it, so transformers reads nothing beside the file the user named."""
    if not path.is_file():
        yield path, None
        return
    with tempfile.TemporaryDirectory(prefix="transmla-gguf-") as tmp:
        os.symlink(path.resolve(), Path(tmp) / path.name)
        yield tmp, path.name


def open_source(path: Path) -> Source:
    """Read config + tensor headers and check that they agree; raises TransMLAError otherwise."""
    path = Path(path)
    if path.suffix.lower() == ".gguf" and path.is_file():
        return _open_gguf(path)
    raw = read_raw_config(path)
    family = family_for_source(raw.get("architectures"), raw.get("model_type"))
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:  # transformers validates fields strictly
        raise TransMLAError(f"config.json in {path} is invalid ({str(err).splitlines()[0]}): "
                            f"fix the named key") from None
    _check_config(config, family)
    weights = SafetensorsCheckpoint(path)
    source = Source(path, raw, config, family, GQAShape.from_config(config, family.head_norms), weights)
    check_weights_match_config(source)
    return source


def _open_gguf(path: Path) -> Source:
    """A GGUF file as a source: transformers' GGUF config parser for the config (metadata only), our
    reader for the tensors."""
    from gguf import GGUFReader
    from transformers import AutoConfig

    try:
        reader = GGUFReader(path)
        architecture = read_architecture(reader)
    except TransMLAError:
        raise
    except Exception as err:  # noqa: BLE001  (any parse failure means a broken download)
        raise TransMLAError(f"{path} is not a readable GGUF file ({type(err).__name__}): re-download it") from None
    try:
        with transformers_view(path) as (directory, gguf_file):
            config = AutoConfig.from_pretrained(directory, gguf_file=gguf_file)
    except Exception as err:  # noqa: BLE001
        raise TransMLAError(f"transformers cannot read the configuration of {path} ({str(err).splitlines()[0]}): "
                            f"convert the model's safetensors checkpoint instead") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the tensors are dequantized on reading
    config.dtype = "float32"
    raw = {"model_type": config.model_type, "gguf_architecture": architecture, "gguf_file": path.name}
    family = family_for_source(None, config.model_type)
    raw["architectures"] = [family.source_architectures[0]]
    config.architectures = raw["architectures"]
    _check_config(config, family)
    gqa = GQAShape.from_config(config, family.head_norms)
    weights = GGUFCheckpoint(path, gqa.num_heads, gqa.num_kv_heads, reader)
    source = Source(path, raw, config, family, gqa, weights)
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
    gqa = GQAShape.from_config(config, family.head_norms)
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
    if family.head_norms:
        expected.update(q_norm=(gqa.head_dim,), k_norm=(gqa.head_dim,))
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
            if role.endswith("_norm"):
                continue
            bias = family.attn_name(role, layer) + ".bias"
            wants_bias = o_bias if role == "o_proj" else qkv_bias
            if (bias in w) != wants_bias:
                raise TransMLAError(
                    f"config.json contradicts the weights: {bias} is {'present' if bias in w else 'absent'} "
                    f"but the config implies {'a' if wants_bias else 'no'} bias; fix attention_bias in config.json"
                )
    odd = w.non_float_tensor()
    if odd:
        raise TransMLAError(f"tensor {odd[0]} in {odd[2]} has dtype {odd[1]}: vllm-transmla converts float32, "
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
