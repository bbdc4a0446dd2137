"""Check a converted checkpoint before anything loads it: config keys, model_type and every attention
tensor's presence and shape, from config.json and the safetensors headers only (no tensor is read).

vLLM would otherwise fail deep in its stack (a KeyError in weight loading, a shape assertion in a
kernel) or, worse, fall back to defaults: our config classes default kv_lora_rank to 512, so a config
missing it would build a model of the wrong shape. The plugin runs this check before vLLM parses the
config (see serving/plugin.py); `transmla check DIR` runs it by hand.
"""

from __future__ import annotations

from pathlib import Path

from .errors import TransMLAError

# Keys our dialect must state: without them the config class would invent defaults.
REQUIRED_MLA_KEYS = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "num_attention_heads",
                     "hidden_size", "num_hidden_layers", "vocab_size")
PUBLIC_MODEL_TYPE = "deepseek_v3"  # the public TransMLA converter's dialect, which we also serve


def is_converted_config(raw: dict) -> bool:
    """Whether config.json claims to be a checkpoint our plugin serves (by architecture or model_type)."""
    from .hf.configuration import MLA_CONFIG_CLASSES
    from .registry import target_architectures

    archs = set(raw.get("architectures") or [])
    return bool(archs & set(target_architectures())) or raw.get("model_type") in MLA_CONFIG_CLASSES


def _read_config(path: Path) -> dict:
    from .checkpoint.config_json import read_raw_config

    return read_raw_config(path, what="checkpoint", expected="a checkpoint written by `transmla convert`",
                           fix="restore it from the conversion output")


def _check_config(path: Path, raw: dict) -> None:
    from .hf.configuration import MLA_CONFIG_CLASSES
    from .registry import target_architectures

    model_type = raw.get("model_type")
    archs = [a for a in raw.get("architectures") or [] if a in target_architectures()]
    if model_type not in MLA_CONFIG_CLASSES and model_type != PUBLIC_MODEL_TYPE:
        expected = target_architectures().get(archs[0]) if archs else None
        raise TransMLAError(f"{path}/config.json has model_type {model_type!r}, which vllm-transmla does not serve "
                            f"(known: {', '.join([*MLA_CONFIG_CLASSES, PUBLIC_MODEL_TYPE])}): "
                            + (f"architecture {archs[0]} expects model_type {expected!r}; fix config.json or "
                               if expected else "")
                            + "reconvert the source with `transmla convert`")
    if model_type in MLA_CONFIG_CLASSES:
        missing = [k for k in REQUIRED_MLA_KEYS if raw.get(k) is None]
        if missing:
            raise TransMLAError(f"{path}/config.json lacks {', '.join(missing)}: the MLA shape cannot be known and a "
                                f"default would build the wrong model; restore config.json from the conversion "
                                f"output or reconvert")
    rope, rank = raw.get("qk_rope_head_dim"), raw.get("kv_lora_rank")
    if not isinstance(rope, int) or rope <= 0 or rope % 2:
        raise TransMLAError(f"{path}/config.json has qk_rope_head_dim={rope!r}: it must be a positive even number "
                            f"(rope rotates pairs); reconvert the checkpoint")
    if not isinstance(rank, int) or rank <= 0:
        raise TransMLAError(f"{path}/config.json has kv_lora_rank={rank!r}: it must be a positive integer; "
                            f"reconvert the checkpoint")
    groups, heads = raw.get("mla_latent_groups", 1), raw.get("num_attention_heads")
    bad_type = not isinstance(groups, int) or isinstance(groups, bool) or groups < 1
    if bad_type or (isinstance(heads, int) and heads % groups):
        raise TransMLAError(f"{path}/config.json has mla_latent_groups={groups!r}: it must be a positive integer "
                            f"dividing num_attention_heads={heads}; reconvert the checkpoint")
    _check_rope_layout(path, raw, rope)


def _check_rope_layout(path: Path, raw: dict, rope: int) -> None:
    """qk_rope_num_blocks and qk_rope_pair_freqs describe rope dims the model can rotate."""
    blocks = raw.get("qk_rope_num_blocks", 1)
    if not isinstance(blocks, int) or blocks < 1 or rope % blocks or (rope // blocks) % 2:
        raise TransMLAError(f"{path}/config.json has qk_rope_num_blocks={blocks!r}: it must be a positive integer "
                            f"dividing qk_rope_head_dim={rope} into even blocks; reconvert the checkpoint")
    freqs = raw.get("qk_rope_pair_freqs")
    if freqs is None:
        return
    layers, head_dim = raw.get("num_hidden_layers"), raw.get("head_dim")
    if not isinstance(head_dim, int) or head_dim < 2:
        raise TransMLAError(f"{path}/config.json has qk_rope_pair_freqs but head_dim={head_dim!r}: the selected "
                            f"frequencies index the source's head_dim / 2 rotary frequencies; reconvert")
    if (not isinstance(freqs, list) or len(freqs) != layers
            or any(not isinstance(f, list) or len(f) * 2 != rope for f in freqs)):
        raise TransMLAError(f"{path}/config.json has qk_rope_pair_freqs that do not list qk_rope_head_dim / 2 = "
                            f"{rope // 2} frequencies for each of the {layers} layers: reconvert the checkpoint")
    bad = next(((i, f) for i, layer in enumerate(freqs) for f in layer
                if not isinstance(f, int) or isinstance(f, bool) or not 0 <= f < head_dim // 2), None)
    if bad:
        raise TransMLAError(f"{path}/config.json has qk_rope_pair_freqs[{bad[0]}] entry {bad[1]!r}: a frequency "
                            f"index must be in 0..{head_dim // 2 - 1} (head_dim / 2 rotary frequencies); reconvert")


def _expected_attention(config, layer: int) -> dict[str, tuple[int, ...]]:
    """name suffix -> shape of layer `layer`'s attention tensors (see hf/configuration.py for the layout)."""
    from .hf.configuration import mla_layout

    lay = mla_layout(config, layer)
    heads, hidden = config.num_attention_heads, config.hidden_size
    qk = lay.qk_nope_head_dim + lay.qk_rope_head_dim
    latent = lay.latent_groups * (lay.kv_lora_rank + lay.qk_rope_head_dim)  # group-major rows
    q_width = heads * (lay.head_dim if lay.key_norm_heads else qk)  # per-head norms: the source's q_proj
    shapes = {}
    if lay.q_lora_rank:
        shapes.update({"q_a_proj.weight": (lay.q_lora_rank, hidden), "q_b_proj.weight": (q_width, lay.q_lora_rank)})
        if lay.q_bias:
            shapes["q_b_proj.bias"] = (q_width,)
    else:
        shapes["q_proj.weight"] = (q_width, hidden)
        if lay.q_bias:
            shapes["q_proj.bias"] = (q_width,)
    shapes["kv_a_proj_with_mqa.weight"] = (latent, hidden)
    if lay.kv_a_bias:
        shapes["kv_a_proj_with_mqa.bias"] = (latent,)
    if lay.key_norm_heads:
        keys = lay.key_norm_heads * lay.head_dim
        shapes.update({"q_norm.weight": (lay.head_dim,), "q_head_proj.weight": (heads * qk, lay.head_dim),
                       "k_proj.weight": (keys, hidden), "k_norm.weight": (lay.head_dim,),
                       "kv_a_key_proj.weight": (latent, keys)})
        if lay.kv_a_bias:
            shapes["k_proj.bias"] = (keys,)
    if lay.latent_layernorm:
        shapes["kv_a_layernorm.weight"] = (lay.kv_lora_rank,)
    shapes["kv_b_proj.weight"] = (heads * (lay.qk_nope_head_dim + lay.v_head_dim), lay.kv_lora_rank)
    shapes["o_proj.weight"] = (hidden, heads * lay.v_head_dim)
    if lay.o_bias:
        shapes["o_proj.bias"] = (hidden,)
    return shapes


def validate_converted_checkpoint(path: str | Path, check_tensors: bool = True, scan_weights: bool = False) -> None:
    """Raise TransMLAError naming the problem and the fix if `path` is not a servable converted checkpoint.
    `scan_weights` also reads every tensor and refuses NaN/Inf values (a diverged fine-tune)."""
    from transformers import AutoConfig

    import vllm_transmla  # noqa: F401  (our config classes)

    from .checkpoint.safetensors_dir import SafetensorsCheckpoint

    path = Path(path)
    raw = _read_config(path)
    _check_config(path, raw)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:  # noqa: BLE001  (any parse error is the user's config)
        raise TransMLAError(f"{path}/config.json cannot be read as a {raw.get('model_type')} config "
                            f"({str(err).splitlines()[0]}): restore it from the conversion output") from None
    ranks = raw.get("kv_lora_ranks")
    if ranks is not None and (len(ranks) != config.num_hidden_layers or max(ranks) != config.kv_lora_rank):
        raise TransMLAError(f"{path}/config.json has kv_lora_ranks {ranks} for {config.num_hidden_layers} layers "
                            f"with kv_lora_rank {config.kv_lora_rank} (must be their maximum): reconvert")
    if not check_tensors:
        return
    checkpoint = SafetensorsCheckpoint(path)  # checks shards, index and headers
    expected = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size)}
    if not getattr(config, "tie_word_embeddings", False):
        expected["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    for layer in range(config.num_hidden_layers):
        for suffix, shape in _expected_attention(config, layer).items():
            expected[f"model.layers.{layer}.self_attn.{suffix}"] = shape
    for name, shape in expected.items():
        if name not in checkpoint:
            raise TransMLAError(f"{path} has no tensor {name}, which config.json implies: the checkpoint is "
                                f"incomplete; copy it again or reconvert")
        if checkpoint.shape(name) != shape:
            raise TransMLAError(f"tensor {name} in {path} has shape {list(checkpoint.shape(name))} but config.json "
                                f"implies {list(shape)}: the config and weights are from different conversions; "
                                f"reconvert")
    extra = sorted(n for n in checkpoint.names() if ".self_attn." in n and n not in expected)
    if extra:
        raise TransMLAError(f"{path} has attention tensors config.json does not describe ({', '.join(extra[:3])}): "
                            f"the config and weights are from different conversions; reconvert")
    if scan_weights:
        _scan_weights(path, checkpoint)


def _scan_weights(path: Path, checkpoint) -> None:
    import torch

    for name in checkpoint.names():
        tensor = checkpoint.get(name)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise TransMLAError(f"tensor {name} in {path} holds {bad} NaN/Inf values: the checkpoint is broken (a "
                                f"diverged fine-tune?); reconvert, or fine-tune again with a lower --lr")
