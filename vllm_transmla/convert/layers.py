"""Layer converters: each turns one source decoder layer's attention weights into its MLA tensors.

`convert(layer)` returns the layer's tensors under their names inside `self_attn.` (q_proj,
kv_a_proj_with_mqa, kv_b_proj; the compressed converter's refit o_proj, else the caller adds the source's
o_proj) and `pair_freqs`
lists, per converted layer, the rope frequencies the selected-frequency layout chose (None otherwise).
Layers are converted in order: the compressed converter streams calibration through them.
"""

from __future__ import annotations

import torch

from .exact import exact_attention
from .geometry import GQAShape
from .groups import group_shape, group_stats, group_weights, merge_groups
from .head_norm import head_norm_tensors, linear_view
from .plan import ConversionPlan
from .refit import refit_output_projection, refit_value_projection
from .source import AttentionWeights, Source


def exact_layer(gqa: GQAShape, w: AttentionWeights) -> dict[str, torch.Tensor]:
    """One layer's exact MLA tensors (exact.py; with per-head q/k norms through head_norm.py)."""
    if not gqa.head_norms:
        return exact_attention(gqa, w.q, w.k, w.v, w.q_bias, w.k_bias, w.v_bias)
    lin = linear_view(gqa, w)
    return head_norm_tensors(gqa, exact_attention(gqa, lin.q, lin.k, lin.v, v_bias=lin.v_bias), w)


def compressed_layer(gqa: GQAShape, basis, rank: int, w: AttentionWeights, q_lora_rank: int | None = None,
                     input_cov: torch.Tensor | None = None, nope_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """One layer's compressed MLA tensors at latent rank `rank` from its calibrated `basis` (compress.py; with
    per-head q/k norms through head_norm.py, low-rank queries then factor the source q_proj)."""
    from .compress import build_layer, query_low_rank

    if not gqa.head_norms:
        return build_layer(gqa, basis, rank, w.q, w.k, w.v, w.q_bias, w.k_bias, w.v_bias, q_lora_rank, input_cov,
                           nope_scale=nope_scale)
    lin = linear_view(gqa, w)
    built = build_layer(gqa, basis, rank, lin.q, lin.k, lin.v, v_bias=lin.v_bias, nope_scale=nope_scale)
    factors = None
    if q_lora_rank:
        bias = w.q_bias.double() if w.q_bias is not None else None
        factors = query_low_rank(w.q.double(), bias, q_lora_rank, input_cov)
    return head_norm_tensors(gqa, built, w, factors)


class ExactLayers:
    """Same function, same cache (see exact.py); with latent groups, the exact construction per group."""

    def __init__(self, source: Source, groups: int = 1):
        self.source, self.groups = source, groups
        self.pair_freqs: list[list[int] | None] = []

    def convert(self, layer: int) -> dict[str, torch.Tensor]:
        self.pair_freqs.append(None)
        w, g = self.source.attention_weights(layer), self.groups
        if g == 1:
            return exact_layer(self.source.gqa, w)
        shape = group_shape(self.source.gqa, g)
        return merge_groups([exact_layer(shape, group_weights(w, g, i)) for i in range(g)])


class CompressedLayers:
    """RoRoPE + balanced K/V PCA at the plan's ranks, calibrated on `tokens` [num_sequences, seq_len]
    streamed through the source layers (see compress.py and calibration.py)."""

    def __init__(self, source: Source, plan: ConversionPlan, tokens: torch.Tensor):
        from .calibration import LayerByLayer
        from .pipeline import mla_config

        self.source, self.plan = source, plan
        self.runner = LayerByLayer(source, tokens)
        self.config = mla_config(source, plan.mla_shape(), {"mode": "compressed"})  # to run converted layers
        self.pair_freqs: list[list[int] | None] = []
        self.refine_errors: list[tuple[float, float]] = []  # per layer with --refine-epochs: (before, after)

    def convert(self, layer: int) -> dict[str, torch.Tensor]:
        plan, gqa = self.plan, self.source.gqa
        stats = self.runner.stats(layer, input_cov=plan.q_lora_rank is not None)
        w = self.source.attention_weights(layer)
        tensors, pair_freqs = self._build(layer, stats, w)
        self.pair_freqs.append(pair_freqs)
        del stats
        converted = self._converted_attention(layer, tensors, w, pair_freqs)
        attention, cos_sin = converted.attention, converted.cos_sin
        *moments, kept = self.runner.value_refit_moments(layer, attention, cos_sin, keep=True)
        tensors["kv_b_proj.weight"] = refit_value_projection(tensors["kv_b_proj.weight"], moments, gqa.num_heads,
                                                             gqa.head_dim)
        attention.kv_b_proj.weight.data = tensors["kv_b_proj.weight"].float()
        if plan.output_refit:  # then o_proj over all heads, on the refit values (refit.py)
            moments = self.runner.output_refit_moments(layer, attention, cos_sin, kept)
            tensors["o_proj.weight"] = refit_output_projection(w.o, moments)
            attention.o_proj.weight.data = tensors["o_proj.weight"].float()
        if plan.refine_epochs:  # the trained weights change the latents: the next pass runs the attention itself
            tensors.update(self._refine(layer, converted, kept, w.o.dtype))
        elif kept is not None:
            from .calibration import ReplayAttention

            converted = ReplayAttention([z for z, _ in kept], attention)
        self.runner.advance(layer, converted)
        return tensors

    def _refine(self, layer: int, converted, kept: list | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Gradient refinement of the converted attention (local_refine.py): its trained matrices. The targets
        are the source attention's outputs: its o_proj on the head outputs the value refit `kept`, if it did;
        returned in the checkpoint's `dtype`."""
        from .local_refine import refine_attention, refined_parameters

        inputs = self.runner.attention_inputs(layer)
        if kept is not None:
            with torch.no_grad():
                o_proj = self.runner.module(layer).self_attn.o_proj
                targets = torch.cat([o_proj(o.flatten(2)) for _, o in kept])
        else:
            targets = self.runner.source_attention_outputs(layer, inputs)
        result = refine_attention(converted, inputs, targets, self.plan.refine_epochs, seed=layer)
        self.refine_errors.append((result.before, result.after))
        return {name: p.detach().to(dtype) for name, p in refined_parameters(converted.attention).items()}

    def _build(self, layer: int, stats, w: AttentionWeights) -> tuple[dict[str, torch.Tensor], list[int] | None]:
        """The layer's tensors before the value refit, and its rope pair frequencies (select layout); per latent
        group on the group's statistics and weights, then merged (groups.py)."""
        from .compress import analyse_layer

        plan, groups = self.plan, self.plan.latent_groups
        shape, scale = plan.group_gqa, self.runner.attention_scaling ** 2
        built, pair_freqs = [], None
        for g in range(groups):
            group_w = group_weights(w, groups, g) if groups > 1 else w
            group_st = group_stats(stats, groups, g) if groups > 1 else stats
            basis = analyse_layer(shape, plan.rope_dim, plan.freqfold, group_st, group_w.o.float())
            pair_freqs = basis.pair_freqs  # one group, or FreqFold layouts (None) for several
            built.append(compressed_layer(shape, basis, plan.layer_rank(layer), group_w, plan.q_lora_rank,
                                          group_st.input_cov, nope_scale=scale))
        return (built[0] if groups == 1 else merge_groups(built)), pair_freqs

    def _converted_attention(self, layer: int, tensors: dict, weights, pair_freqs):
        """The converted attention of `layer`, for the decoder layer to run in place of the source's."""
        from .mla_runner import AttentionWithOwnRope, mla_attention, rope_tables

        if pair_freqs is not None:
            self.config.qk_rope_pair_freqs = [pair_freqs] * self.source.num_layers
        attention = mla_attention(self.config, layer, tensors, weights)
        return AttentionWithOwnRope(attention, rope_tables(self.source, self.config, 1, self.runner.hidden.shape[1]))
