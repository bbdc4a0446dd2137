"""`transmla convert`: stream a source checkpoint layer by layer into an MLA checkpoint."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..errors import TransMLAError
from ..hf.configuration import MLA_CONFIG_CLASSES, mla_kv_bytes_per_token
from .checkpoint import ShardWriter
from .exact import exact_attention, exact_mla_shape
from .memory import return_large_blocks_to_the_system
from .output import atomic_directory, check_destination, copy_side_files
from .source import Source, open_source

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


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
    return int(float(m.group(1)) * base**power)


def mla_config(source: Source, mla_shape, settings: dict):
    """The converted checkpoint's config: the source's, plus the MLA shape and provenance."""
    family = source.family
    config_cls = MLA_CONFIG_CLASSES[family.target_model_type]
    fields = source.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path"):
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
        transmla={
            "version": __version__,
            "source_family": family.family,
            "source_architectures": source.raw_config.get("architectures"),
            "source_model_type": source.raw_config.get("model_type"),
            "source_num_key_value_heads": source.gqa.num_kv_heads,
            "source_sliding_window": window,
            **settings,
        },
    )
    config = config_cls(**fields)
    config.architectures = [family.target_architecture]
    return config


def _layer_of(name: str) -> int | None:
    m = LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def _convert_layer_attention(source: Source, layer: int, attention_fn) -> dict[str, torch.Tensor]:
    """The MLA tensors of one layer: `attention_fn(layer, q, k, v, q_bias, k_bias, v_bias)` + o_proj."""
    fam, w = source.family, source.weights
    get = lambda role, kind: (w.get(f"{fam.attn_name(role, layer)}.{kind}")  # noqa: E731
                              if f"{fam.attn_name(role, layer)}.{kind}" in w else None)
    tensors = attention_fn(layer, get("q_proj", "weight"), get("k_proj", "weight"), get("v_proj", "weight"),
                           get("q_proj", "bias"), get("k_proj", "bias"), get("v_proj", "bias"))
    prefix = f"model.layers.{layer}.self_attn."
    out = {prefix + k: v for k, v in tensors.items()}
    out[prefix + "o_proj.weight"] = get("o_proj", "weight")
    if get("o_proj", "bias") is not None:
        out[prefix + "o_proj.bias"] = get("o_proj", "bias")
    return out


def resolve_compression(gqa, kv_lora_rank=None, qk_rope_dim=None, kv_ratio=None, freqfold=None) -> dict:
    """Compressed-mode settings with the reference's defaults (R = 512, D = 64) clamped to the model;
    explicit values out of range are errors. Returns rank, rope_dim, freqfold and notes for the user."""
    notes = []
    width = 2 * gqa.kv_width
    if qk_rope_dim is not None:
        rope = qk_rope_dim
    else:
        # 64 as the reference, at most head_dim and at most half of a --kv-ratio budget; a legal width
        # (even, dividing head_dim) so one rope block serves.
        budget = int(round(kv_ratio * width)) if kv_ratio is not None else width
        limit = min(64, gqa.head_dim, max(2, budget // 2))
        rope = max(r for r in range(2, limit + 1, 2) if gqa.head_dim % r == 0)
        if rope != 64:
            notes.append(f"qk_rope_dim set to {rope} (64 needs head_dim >= 64 and room in the budget)")
    if kv_ratio is not None:
        if not 0 < kv_ratio <= 1:
            raise TransMLAError(f"--kv-ratio {kv_ratio} must be in (0, 1]: "
                                f"the fraction of the original KV cache to keep")
        rank = int(round(kv_ratio * width)) - rope
        if rank < 1:
            raise TransMLAError(f"--kv-ratio {kv_ratio} leaves no latent beyond the {rope} rope dims: raise it")
    elif kv_lora_rank is not None:
        rank = kv_lora_rank
    else:
        rank = min(512, width - rope)
        if rank != 512:
            notes.append(f"kv_lora_rank clamped to 2 * num_kv_heads * head_dim - qk_rope_dim = {rank}")
    if freqfold in ("auto", "select"):
        fold = freqfold
    elif freqfold is not None:
        try:
            fold = int(freqfold)
        except (TypeError, ValueError):
            raise TransMLAError(f"--freqfold {freqfold!r} must be a whole number, 'select' or 'auto'") from None
    else:
        fold = "select"  # exact frequencies per rope pair: measured better than any FreqFold (benchmarks/quality)
    return {"kv_lora_rank": rank, "qk_rope_dim": rope, "freqfold": fold, "notes": notes}


def convert(src: str | Path, dst: str | Path, mode: str | None = None, overwrite: bool = False,
            max_shard_size: str | int = "2GB", progress: bool = True, kv_lora_rank: int | None = None,
            qk_rope_dim: int | None = None, kv_ratio: float | None = None, freqfold: int | None = None,
            calib: list[str] | None = None, calib_seq_len: int = 256, calib_tokens: int = 32768,
            rank_allocation: str | None = None, q_lora_rank: int | None = None) -> Path:
    """Convert the checkpoint at `src` into an MLA checkpoint at `dst`; returns `dst`.

    mode "exact": same function, same cache. mode "compressed": RoRoPE + FreqFold + balanced K/V PCA to
    a latent of kv_lora_rank + qk_rope_dim, calibrated on `calib` files (the shipped text by default).
    freqfold "auto" picks the FreqFold with the least calibration attention error; rank_allocation
    "measured" gives each layer its own rank (same total cache) by measured attention error (survey.py).
    q_lora_rank factors the query projection through that many dims (principal query directions).
    Reads one layer at a time; holds at most one layer, the calibration activations and one output shard.
    """
    src, dst = Path(src), Path(dst)
    compressing = any(v is not None for v in (kv_lora_rank, qk_rope_dim, kv_ratio, freqfold, rank_allocation,
                                              q_lora_rank))
    if rank_allocation not in (None, "uniform", "measured"):
        raise TransMLAError(f"--rank-allocation {rank_allocation!r}: use 'uniform' (one rank for every layer) or "
                            f"'measured' (per-layer ranks by calibration error, same total cache)")
    mode = mode or ("compressed" if compressing else "exact")
    if mode == "exact" and compressing:
        raise TransMLAError("--kv-lora-rank/--kv-ratio/--qk-rope-dim/--freqfold/--rank-allocation/--q-lora-rank need "
                            "--mode compressed (exact mode keeps the full K and V)")
    if mode not in ("exact", "compressed"):
        raise TransMLAError(f"unknown mode {mode!r}: use --mode exact or --mode compressed")
    source = open_source(src)
    check_destination(src, dst, overwrite)
    return_large_blocks_to_the_system()
    pair_freqs = []  # selected-frequency layout: each layer's rope frequencies, for the config
    if mode == "exact":
        mla_shape, settings = exact_mla_shape(source.gqa), {"mode": mode}

        def attention_fn(layer, q, k, v, qb, kb, vb):
            return exact_attention(source.gqa, q, k, v, qb, kb, vb)
    else:
        from .calibration import LayerByLayer, calibration_tokens
        from .compress import analyse_layer, build_layer, check_q_lora_rank, compressed_mla_shape
        from .survey import freqfold_candidates, output_weight, survey

        chosen = resolve_compression(source.gqa, kv_lora_rank, qk_rope_dim, kv_ratio, freqfold)
        for note in chosen["notes"]:
            print(f"transmla: {note}", file=sys.stderr)
        rank, rope, fold = chosen["kv_lora_rank"], chosen["qk_rope_dim"], chosen["freqfold"]
        # Illegal rope widths leave no candidate; the default fold then raises the precise error below.
        candidates = freqfold_candidates(source.gqa, rope) if fold == "auto" else [fold]
        candidates = candidates or [source.gqa.head_dim // rope]
        compressed_mla_shape(source.gqa, rank, rope, candidates[0])  # validates the settings before any work
        if q_lora_rank is not None:
            check_q_lora_rank(source.gqa, q_lora_rank, rope)
        tokens, calib_names = calibration_tokens(source, calib, calib_seq_len, calib_tokens)
        settings = {"mode": mode, "kv_lora_rank": rank, "qk_rope_dim": rope, "freqfold": fold,
                    "rank_allocation": rank_allocation or "uniform", "q_lora_rank": q_lora_rank,
                    "calibration_files": calib_names,
                    "calibration_tokens": int(tokens.numel()), "calibration_seq_len": calib_seq_len}
        ranks = [rank] * source.num_layers
        if fold == "auto" or rank_allocation == "measured":
            report = survey(source, tokens, rank, rope, candidates,
                            lambda shape: mla_config(source, shape, {"mode": mode}),
                            per_layer_ranks=rank_allocation == "measured", progress=progress)
            if fold == "auto":
                fold = report.best_freqfold()
                errors = {str(f): round(report.uniform_error(f), 4) for f in report.errors}
                settings.update(freqfold=fold, freqfold_auto_errors=errors)
                print(f"transmla: --freqfold auto chose {fold} (summed attention error per FreqFold: {errors})",
                      file=sys.stderr)
            if rank_allocation == "measured":
                ranks = report.ranks(fold)
                settings.update(kv_lora_ranks=ranks, calibration_error={
                    "uniform": round(report.uniform_error(fold), 6), "per_layer": round(report.error(fold, ranks), 6)})
        mla_shape = compressed_mla_shape(source.gqa, max(ranks), rope, fold)
        if rank_allocation == "measured":
            mla_shape = dataclasses.replace(mla_shape, kv_lora_ranks=tuple(ranks))
        mla_shape = dataclasses.replace(mla_shape, q_lora_rank=q_lora_rank)
        runner = LayerByLayer(source, tokens)


        def attention_fn(layer, q, k, v, qb, kb, vb):
            stats = runner.stats(layer, input_cov=q_lora_rank is not None)
            basis = analyse_layer(source.gqa, rope, fold, stats, output_weight(source, layer))
            pair_freqs.append(basis.pair_freqs)
            tensors = build_layer(source.gqa, basis, ranks[layer], q, k, v, qb, kb, vb, q_lora_rank, stats.input_cov)
            del stats
            runner.advance(layer)
            return tensors
    config = mla_config(source, mla_shape, settings)
    window = config.transmla["source_sliding_window"]
    if window:
        print(f"transmla: the source uses a sliding window of {window} tokens; the MLA model attends to the "
              f"whole context, which is the same function for sequences up to {window} tokens", file=sys.stderr)

    # Attention tensors are rebuilt; every other tensor is copied verbatim, layer by layer.
    attn_prefixes = [source.family.attn_name(r, 0).split("layers.0.")[1]
                     for r in ("q_proj", "k_proj", "v_proj", "o_proj")]
    by_layer: dict[int | None, list[str]] = {}
    for name in source.weights.names():
        by_layer.setdefault(_layer_of(name), []).append(name)
    delay = float(os.environ.get("TRANSMLA_DEBUG_LAYER_DELAY", "0"))  # lets tests interrupt mid-way

    with atomic_directory(dst, overwrite) as tmp:
        writer = ShardWriter(tmp, parse_size(max_shard_size))
        for name in sorted(by_layer.get(None, [])):
            writer.add(name, source.weights.get(name))
        for layer in tqdm(range(source.num_layers), desc="converting layers", unit="layer",
                          disable=not progress):
            for name, tensor in sorted(_convert_layer_attention(source, layer, attention_fn).items()):
                writer.add(name, tensor)
            for name in sorted(by_layer.get(layer, [])):
                local = name.split(f"layers.{layer}.", 1)[1]
                if not any(local.startswith(p + ".") for p in attn_prefixes):
                    writer.add(name, source.weights.get(name))
            source.weights.release()
            if delay:
                time.sleep(delay)
        writer.finish()
        if any(f is not None for f in pair_freqs):
            config.qk_rope_pair_freqs = pair_freqs
        config.dtype = source.config.dtype
        config.save_pretrained(tmp)
        copy_side_files(src, tmp)
    return dst


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """KV-cache bytes one token costs over all layers: the latent for MLA configs, K+V otherwise."""
    if hasattr(config, "kv_lora_rank"):
        return mla_kv_bytes_per_token(config, dtype_bytes)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = 2 * (config.num_key_value_heads or config.num_attention_heads) * head_dim
    return width * dtype_bytes * config.num_hidden_layers
