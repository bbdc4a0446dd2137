"""`transmla convert`: plan, then stream the source checkpoint layer by layer into an MLA checkpoint."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__, envs
from ..checkpoint.atomic import atomic_directory, check_destination
from ..checkpoint.writer import ShardWriter
from ..errors import TransMLAError
from ..hf.configuration import MLA_CONFIG_CLASSES, mla_kv_bytes_per_token
from ..hf.remote_code import auto_map, write_remote_code
from .memory import large_blocks_returned
from .plan import ConversionPlan, ConvertOptions, plan_conversion
from .source import Source, open_source
from .tpla import rotate_latent

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1GiB' or a number of bytes -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise TransMLAError(f"cannot read size {text!r}: write it like 2GB, 500MB or 1048576")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit[0] in "KMGT" else 0
    size = int(float(m.group(1)) * base**power)
    if size < 1:
        raise TransMLAError(f"size {text!r} must be at least one byte: write it like 2GB or 500MB")
    return size


def mla_config(source: Source, mla_shape, settings: dict):
    """The converted checkpoint's config: the source's, plus the MLA shape and provenance (the caller sets
    `dtype` to the dtype the tensors are written in)."""
    family = source.family
    config_cls = MLA_CONFIG_CLASSES[family.target_model_type]
    fields = source.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path",
                "quantization_config", "dtype"):
        fields.pop(key, None)
    window_key = family.sliding_window.get("config_key")
    window = fields.pop(window_key, None) if window_key else None
    qkv_bias = family.has_bias("qkv_bias", source.config)
    fields.update(mla_shape.config_fields())
    fields.update(
        num_key_value_heads=source.gqa.num_heads,
        head_dim=source.gqa.head_dim,
        softmax_scale=source.gqa.head_dim ** -0.5,
        rope_interleave=False,
        mla_q_bias=qkv_bias,
        mla_kv_a_bias=qkv_bias,
        mla_o_bias=family.has_bias("o_bias", source.config),
        mla_key_norm_heads=source.gqa.num_kv_heads if source.gqa.head_norms else None,
        transmla={
            "version": __version__,
            "source_family": family.family,
            "source_architectures": source.raw_config.get("architectures"),
            "source_model_type": source.raw_config.get("model_type"),
            "source_num_key_value_heads": source.gqa.num_kv_heads,
            "source_sliding_window": window,
            **({"source_gguf_file": source.path.name} if source.is_gguf else {}),
            **settings,
        },
    )
    config = config_cls(**fields)
    config.architectures = [family.target_architecture]
    config.auto_map = auto_map(config_cls.__name__, family.target_architecture)
    return config


def _layer_of(name: str) -> int | None:
    m = LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def convert(src: str | Path, dst: str | Path, options: ConvertOptions | None = None, *, overwrite: bool = False,
            max_shard_size: str | int = "2GB", progress: bool = True, **option_fields) -> Path:
    """Convert the checkpoint at `src` (a safetensors directory or a GGUF file) into an MLA checkpoint at
    `dst`; returns `dst`. `options` (or its fields as keywords: mode, kv_ratio, kv_lora_rank, ...) say
    what to build; see ConvertOptions and `transmla convert --help`.

    mode "exact": same function, same cache. mode "compressed": RoRoPE + balanced K/V PCA to a latent of
    kv_lora_rank + qk_rope_dim, calibrated on the `calib` files (the shipped text by default).
    Reads one layer at a time; holds at most one layer, the calibration activations and one output tensor.
    """
    if option_fields:
        if options is not None:
            raise TypeError("pass either options or its fields as keywords, not both")
        if option_fields.get("calib"):
            option_fields["calib"] = tuple(str(f) for f in option_fields["calib"])
        options = ConvertOptions(**option_fields)
    options = options or ConvertOptions()
    src, dst = Path(src), Path(dst)
    shard_bytes = parse_size(max_shard_size)
    source = open_source(src)
    plan = plan_conversion(source.gqa, source.num_layers, options)
    dst = check_destination(src, dst, overwrite)
    for note in plan.notes:
        print(f"transmla: {note}", file=sys.stderr)
    with large_blocks_returned():
        layers, plan = _layer_converter(source, plan, progress)
        config = mla_config(source, plan.mla_shape(), plan.settings())
        window = config.transmla["source_sliding_window"]
        if window:
            print(f"transmla: the source uses a sliding window of {window} tokens; the MLA model attends to the "
                  f"whole context, which is the same function for sequences up to {window} tokens", file=sys.stderr)
        with atomic_directory(dst, overwrite) as tmp:
            dtype = _write_tensors(source, layers, ShardWriter(tmp, shard_bytes), progress, plan.tpla_transform)
            if any(f is not None for f in layers.pair_freqs):
                config.qk_rope_pair_freqs = layers.pair_freqs
            if getattr(layers, "refine_errors", None):  # per layer, relative to the source attention's output
                before, after = zip(*layers.refine_errors)
                config.transmla["refine_error"] = {"before": [round(e, 6) for e in before],
                                                   "after": [round(e, 6) for e in after]}
            config.dtype = dtype
            config.save_pretrained(tmp)
            write_remote_code(tmp, type(config).__name__, config.architectures[0])
            source.write_side_files(tmp)
    return dst


def _layer_converter(source: Source, plan: ConversionPlan, progress: bool):
    """The layer converter for `plan` (after the calibration survey, where the plan needs one)."""
    from .layers import CompressedLayers, ExactLayers

    if not plan.compressed:
        return ExactLayers(source, plan.latent_groups), plan
    from .calibration import calibration_tokens

    tokens, names = calibration_tokens(source, plan.calibration)
    plan = plan.settled(plan.freqfold, plan.ranks, {"calibration_files": names,
                                                    "calibration_tokens": int(tokens.numel())})
    if plan.needs_survey:
        from .survey import settle_with_survey

        plan = settle_with_survey(source, plan, tokens, progress)
    return CompressedLayers(source, plan, tokens), plan


def _write_tensors(source: Source, layers, writer: ShardWriter, progress: bool, tpla_transform: str | None = None
                   ) -> torch.dtype:
    """Every tensor of the converted checkpoint: attention rebuilt by `layers` (its latent rotated by
    `tpla_transform` when given, tpla.py), the rest copied verbatim, layer by layer. Returns the dtype of
    the attention tensors written."""
    by_layer: dict[int | None, list[str]] = {}
    for name in source.tensor_names():
        by_layer.setdefault(_layer_of(name), []).append(name)
    delay = envs.debug_layer_delay()  # lets tests interrupt mid-way
    for name in sorted(by_layer.get(None, [])):
        writer.add(name, source.weights.get(name))
    dtype = None
    for layer in tqdm(range(source.num_layers), desc="converting layers", unit="layer", disable=not progress):
        prefix = f"model.layers.{layer}.self_attn."
        attention = layers.convert(layer)
        if tpla_transform:
            attention = rotate_latent(attention, tpla_transform)
        tensors = {prefix + k: v for k, v in attention.items()}
        weights = source.attention_weights(layer)
        tensors.setdefault(prefix + "o_proj.weight", weights.o)  # the source's, unless the converter refit it
        if weights.o_bias is not None:
            tensors[prefix + "o_proj.bias"] = weights.o_bias
        dtype = tensors[prefix + "kv_b_proj.weight"].dtype
        for name, tensor in sorted(tensors.items()):
            writer.add(name, tensor)
        rebuilt = source.attention_tensor_names(layer)
        for name in sorted(by_layer.get(layer, [])):
            if name not in rebuilt:
                writer.add(name, source.weights.get(name))
        if delay:
            time.sleep(delay)
    writer.finish()
    return dtype


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """KV-cache bytes one token costs over all layers: the latent for MLA configs, K+V otherwise."""
    if hasattr(config, "kv_lora_rank"):
        return mla_kv_bytes_per_token(config, dtype_bytes)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = 2 * (config.num_key_value_heads or config.num_attention_heads) * head_dim
    return width * dtype_bytes * config.num_hidden_layers


def conversion_summary(dst: Path) -> str:
    """One line: what was written and the KV cache per token before and after, in the checkpoint's dtype."""
    from transformers import AutoConfig

    import vllm_transmla  # noqa: F401  (our config classes)

    cfg = AutoConfig.from_pretrained(dst)
    dtype = str(cfg.dtype).removeprefix("torch.") if cfg.dtype is not None else "bfloat16"
    width = DTYPE_BYTES.get(dtype, 2)
    original = 2 * cfg.transmla["source_num_key_value_heads"] * cfg.head_dim * cfg.num_hidden_layers * width
    groups = f", {cfg.mla_latent_groups} latent groups" if cfg.mla_latent_groups > 1 else ""
    return (f"wrote {dst} ({cfg.architectures[0]}, kv_lora_rank={cfg.kv_lora_rank}, qk_rope_head_dim="
            f"{cfg.qk_rope_head_dim}{groups}); KV cache per token ({dtype}): {original} B -> "
            f"{kv_bytes_per_token(cfg, width)} B")
