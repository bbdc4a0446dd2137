"""Running a converted layer's attention during conversion (the calibration survey measures it, sequential
calibration feeds the next layer with it): the transformers MLA attention of hf/attention.py, given the
layer's tensors, with the rope tables of the converted config."""

from __future__ import annotations

import importlib

import torch

from ..hf.attention import MLAAttention, rope_config
from .source import AttentionWeights, Source


def mla_attention(config, layer: int, tensors: dict[str, torch.Tensor], weights: AttentionWeights,
                  pad_to: int | None = None) -> MLAAttention:
    """The MLA attention of `layer` (fp32, eval) holding `tensors` (q / kv_a / kv_b, as build_layer returns
    them) and the source's o_proj. With `pad_to`, a module built for that larger latent rank (the
    config's) takes a smaller one: the extra latent dims get zero rows in kv_a and zero columns in kv_b,
    so they are 0 and change nothing."""
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        module = MLAAttention(config, layer).eval()
    state = {k: v.float() for k, v in tensors.items()}  # with per-head norms, their weights too
    state["o_proj.weight"] = weights.o.float()
    if weights.o_bias is not None:
        state["o_proj.bias"] = weights.o_bias.float()
    if pad_to is not None:
        _zero_pad_latent(state, pad_to)
    module.load_state_dict(state, strict=True, assign=True)
    return module


def _zero_pad_latent(state: dict, rank_to: int) -> None:
    rank = state["kv_b_proj.weight"].shape[1]
    pad = rank_to - rank
    for name in ("kv_a_proj_with_mqa.weight", "kv_a_key_proj.weight"):
        if name in state:
            kv_a = state[name]
            state[name] = torch.cat([kv_a[:rank], kv_a.new_zeros(pad, kv_a.shape[1]), kv_a[rank:]])
    if "kv_a_proj_with_mqa.bias" in state:
        b = state["kv_a_proj_with_mqa.bias"]
        state["kv_a_proj_with_mqa.bias"] = torch.cat([b[:rank], b.new_zeros(pad), b[rank:]])
    kv_b = state["kv_b_proj.weight"]
    state["kv_b_proj.weight"] = torch.cat([kv_b, kv_b.new_zeros(kv_b.shape[0], pad)], dim=1)


def rope_tables(source: Source, config, batch: int, length: int):
    """cos, sin [batch, length, block] of the converted config's rope blocks (the family's rotary class)."""
    spec = source.family.calibration
    rotary = getattr(importlib.import_module(spec["module"]), spec["rotary_embedding"])(config=rope_config(config))
    positions = torch.arange(length)[None].expand(batch, -1)
    with torch.no_grad():
        return rotary(torch.zeros(batch, length, 1), positions)


class AttentionWithOwnRope(torch.nn.Module):
    """An MLA attention that a source decoder layer can call in place of its own: it ignores the source's
    rope tables and uses the converted config's (the layouts rotate other dims at other widths)."""

    def __init__(self, attention: MLAAttention, cos_sin):
        super().__init__()
        self.attention, self.cos_sin = attention, cos_sin

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        batch = hidden_states.shape[0]
        cos_sin = tuple(t[:1].expand(batch, -1, -1) for t in self.cos_sin)
        return self.attention(hidden_states, position_embeddings=cos_sin, attention_mask=None)
