"""A calibration pre-pass for the choices that need every layer before the first is written:
`--freqfold auto` (the rope layout with the least attention error over the model) and
`--rank-allocation measured` (per-layer ranks under one KV budget).

The pass streams the original layers like the conversion itself (one layer held at a time), over at
most `SURVEY_TOKENS` calibration tokens. For each candidate layout F, layer l and candidate rank r
(the uniform one; with per-layer ranks, a grid around it) it measures the relative error of the layer's
attention output (after o_proj) against the original attention on the same inputs:
    error_l(F, r) = |attn_mla(x) - attn(x)|^2 / |h|^2     over SURVEY_ERROR_SEQUENCES sequences,
where h is the layer's input residual stream and x = input_layernorm(h). The compressed layers are
built by the converter's own `analyse_layer` / `build_layer`, their value up-projection refit on the
same sequences (refit.py, as the conversion does: the error a layer keeps after the refit is what the
choice must see), and run by the transformers MLA attention (a smaller rank is the largest one with
zero-padded latent dims).
FreqFold auto takes the layout with the least summed error at the uniform rank; per-layer ranks are the
exact minimiser of the summed error under the uniform total (`allocate_ranks`). The ranks are chosen
from measured errors rather than from the PCA spectra alone: allocating by each layer's spectral
energy share was tried first and lost to uniform ranks at 12.5% of the cache on the reference model
(held-out perplexity 100.8 vs 96.8).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..errors import TransMLAError
from .calibration import LayerByLayer
from .compress import SELECT, allocate_ranks, analyse_layer, plan_rope, rank_grid
from .layers import compressed_layer
from .plan import AUTO, ConversionPlan, compressed_mla_shape
from .mla_runner import mla_attention, rope_tables
from .refit import refit_moments, refit_value_projection
from .source import Source

SURVEY_TOKENS = 8192
SURVEY_ERROR_SEQUENCES = 8


@dataclass
class Survey:
    """Per candidate layout and layer: the attention error at each candidate rank."""

    rank: int
    errors: dict = field(default_factory=dict)  # layout -> layer -> rank -> error

    def best_freqfold(self):
        return min(self.errors, key=self.uniform_error)  # ties: the first candidate

    def uniform_error(self, freqfold) -> float:
        return sum(layer[self.rank] for layer in self.errors[freqfold])

    def error(self, freqfold, ranks: list[int]) -> float:
        return sum(layer[r] for layer, r in zip(self.errors[freqfold], ranks))

    def ranks(self, freqfold) -> list[int]:
        layers = self.errors[freqfold]
        return allocate_ranks(layers, total=self.rank * len(layers))


def freqfold_candidates(gqa, rope_dim: int) -> list:
    """The selected-frequency layout, then the legal FreqFolds: multiples of head_dim * blocks / rope_dim
    that divide head_dim / 2."""
    legal = [SELECT]
    for fold in range(1, gqa.head_dim // 2 + 1):
        try:
            plan_rope(gqa, rope_dim, fold)
        except TransMLAError:
            continue
        legal.append(fold)
    return legal


def settle_with_survey(source: Source, plan: ConversionPlan, tokens: torch.Tensor, progress: bool) -> ConversionPlan:
    """Run the survey the plan asks for and return the plan with its layout and ranks chosen. With both
    choices open, a first pass picks the layout at the uniform rank and a second measures the rank grid
    for that layout only."""
    fold, results, ranks = plan.freqfold, {}, None
    if plan.freqfold == AUTO:
        folds = freqfold_candidates(source.gqa, plan.rope_dim)
        report = survey(source, tokens, plan, folds, [plan.rank], progress)
        fold = report.best_freqfold()
        errors = {str(f): round(report.uniform_error(f), 4) for f in report.errors}
        results["freqfold_auto_errors"] = errors
        print(f"transmla: --freqfold auto chose {fold} (summed attention error per layout: {errors})", file=sys.stderr)
    if plan.rank_allocation == "measured":
        grid = rank_grid(plan.rank, 2 * source.gqa.kv_width - plan.rope_dim)
        report = survey(source, tokens, plan, [fold], grid, progress)
        ranks = report.ranks(fold)
        results["calibration_error"] = {"uniform": round(report.uniform_error(fold), 6),
                                        "per_layer": round(report.error(fold, ranks), 6)}
    return plan.settled(fold, ranks, results)


def survey(source: Source, tokens: torch.Tensor, plan: ConversionPlan, folds: list, ranks: list[int],
           progress: bool = True) -> Survey:
    """Every layer's attention error for every layout in `folds` at every rank in `ranks` (the value
    refit applied, as the conversion applies it), on the original model's hidden states."""
    from .pipeline import mla_config

    gqa, rope = source.gqa, plan.rope_dim
    sequences = max(1, min(tokens.shape[0], SURVEY_TOKENS // tokens.shape[1]))
    runner = LayerByLayer(source, tokens[:sequences])
    result = Survey(rank=plan.rank)
    configs = {f: mla_config(source, compressed_mla_shape(gqa, max(ranks), rope, f), {"mode": "compressed"})
               for f in folds}
    for layer in tqdm(range(source.num_layers), desc="surveying layers", unit="layer", disable=not progress):
        stats = runner.stats(layer)
        weights = source.attention_weights(layer).float()
        x = runner.attention_inputs(layer, SURVEY_ERROR_SEQUENCES)  # [S, T, hidden]
        reference, heads = _original_attention(runner, layer, x)
        stream = runner.hidden[:x.shape[0]].pow(2).sum().clamp_min(1e-30)
        for fold in folds:
            basis = analyse_layer(gqa, rope, fold, stats, weights.o)
            if basis.pair_freqs is not None:
                configs[fold].qk_rope_pair_freqs = [basis.pair_freqs] * source.num_layers
            cos_sin = rope_tables(source, configs[fold], *x.shape[:2])
            errors = {}
            for r in ranks:
                tensors = compressed_layer(gqa, basis, r, weights, nope_scale=runner.attention_scaling ** 2)
                out = _refit_output(mla_attention(configs[fold], layer, tensors, weights, pad_to=max(ranks)),
                                    x, cos_sin, heads)
                # Relative to the residual stream the error is added to: a layer whose attention barely
                # moves the stream matters less than one that dominates it.
                errors[r] = ((out - reference).pow(2).sum() / stream).item()
            result.errors.setdefault(fold, []).append(errors)
        del stats
        runner.advance(layer)
    return result


def _original_attention(runner: LayerByLayer, layer: int, x: torch.Tensor):
    """The source attention's output [S, T, hidden] and its per-head outputs before o_proj [S, T, H, d]."""
    attention, gqa = runner.module(layer).self_attn, runner.source.gqa
    captured = []
    hook = attention.o_proj.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            out = attention(x, position_embeddings=runner.position_embeddings(x.shape[0]), attention_mask=None)[0]
    finally:
        hook.remove()
    return out, captured[0].view(*x.shape[:2], gqa.num_heads, gqa.head_dim)


def _refit_output(attention, x: torch.Tensor, cos_sin, heads: torch.Tensor) -> torch.Tensor:
    """The converted layer's attention output [S, T, hidden] after the value refit, fitted on these inputs."""
    with torch.no_grad():
        z = attention.latent_attention(*attention.project(x, cos_sin))  # [S, T, H, R]
        kv_b = refit_value_projection(attention.kv_b_proj.weight, refit_moments(z, heads), attention.num_heads,
                                      attention.v_head_dim)
        w_uv = kv_b.view(attention.num_heads, -1, kv_b.shape[1])[:, -attention.v_head_dim:]
        out = torch.einsum("bthr,hdr->bthd", z, w_uv).flatten(2)
        return attention.o_proj(out)
