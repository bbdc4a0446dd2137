"""Write a checkpoint in the public TransMLA converter's layout (what its users have on disk), from one
of ours with a single rope block: model_type deepseek_v3 + architectures LlamaMLAForCausalLM,
interleaved rope, softmax scale (nope + rope) ** -0.5 folded into the queries, attention_bias for
q / kv_a biases, qk_latent_layernorm false."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _neox_to_interleaved(rows: torch.Tensor) -> torch.Tensor:
    """Rope rows [D, ...] in rotate-half order (x0..x_{D/2-1}, y0..) -> pair order (x0, y0, x1, y1, ...)."""
    half = rows.shape[0] // 2
    return torch.stack([rows[:half], rows[half:]], dim=1).reshape(rows.shape)


def to_public_layout(ours: Path, out: Path) -> Path:
    config = json.loads((ours / "config.json").read_text())
    assert config.get("qk_rope_num_blocks", 1) == 1 and not config.get("mla_o_bias")
    heads, nope, rope, rank = (config["num_attention_heads"], config["qk_nope_head_dim"],
                               config["qk_rope_head_dim"], config["kv_lora_rank"])
    q_scale = config["softmax_scale"] / (nope + rope) ** -0.5
    tensors = {}
    for shard in sorted(ours.glob("*.safetensors")):
        tensors.update(load_file(shard))
    for name in list(tensors):
        t = tensors[name]
        if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
            per_head = t.view(heads, nope + rope, *t.shape[1:]).clone()
            per_head[:, nope:] = torch.stack([_neox_to_interleaved(h) for h in per_head[:, nope:]])
            tensors[name] = (per_head * q_scale).reshape(t.shape)
        elif "kv_a_proj_with_mqa" in name:
            tensors[name] = torch.cat([t[:rank], _neox_to_interleaved(t[rank:])])
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    public = {k: v for k, v in config.items() if k not in (
        "softmax_scale", "qk_rope_num_blocks", "rope_interleave", "mla_q_bias", "mla_kv_a_bias", "mla_o_bias",
        "transmla")}
    arch = "MixtralMLAForCausalLM" if config.get("num_local_experts") else "LlamaMLAForCausalLM"
    public.update(model_type="deepseek_v3", architectures=[arch], q_lora_rank=None,
                  attention_bias=bool(config["mla_q_bias"]), qk_latent_layernorm=False,
                  num_key_value_heads=heads)
    (out / "config.json").write_text(json.dumps(public, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (ours / name).exists():
            shutil.copy(ours / name, out / name)
    return out
