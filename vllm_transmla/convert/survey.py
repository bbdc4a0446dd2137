"""A calibration pre-pass for the choices that need every layer before the first is written:
`--freqfold auto` (the FreqFold with the least attention error over the model) and
`--rank-allocation measured` (per-layer ranks under one KV budget).

The pass streams the original layers like the conversion itself (one layer held at a time), over at
most `SURVEY_TOKENS` calibration tokens. For each candidate FreqFold F, layer l and candidate rank r
(the uniform one; with per-layer ranks, a grid around it) it measures the relative error of the layer's
attention output (after o_proj) against the original attention on the same inputs:
    error_l(F, r) = |attn_mla(x) - attn(x)|^2 / |h|^2     over SURVEY_ERROR_SEQUENCES sequences,
where h is the layer's input residual stream and x = input_layernorm(h).
FreqFold auto takes the F with the least summed error at the uniform rank; per-layer ranks are the
exact minimiser of the summed error under the uniform total (`allocate_ranks`). The ranks are chosen
from measured errors rather than from the PCA spectra alone: allocating by each layer's spectral
energy share was tried first and lost to uniform ranks at 12.5% of the cache on the reference model
(held-out perplexity 100.8 vs 96.8).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..errors import TransMLAError
from .calibration import LayerByLayer
from .compress import SELECT, allocate_ranks, analyse_layer, build_layer, compressed_mla_shape, plan_rope, rank_grid
from .source import Source

SURVEY_TOKENS = 8192
SURVEY_ERROR_SEQUENCES = 8


@dataclass
class Survey:
    """Per candidate FreqFold and layer: the attention error at each candidate rank."""

    rank: int
    errors: dict[int, list[dict[int, float]]] = field(default_factory=dict)  # fold -> layer -> rank -> error

    def best_freqfold(self) -> int:
        return min(self.errors, key=self.uniform_error)  # ties: the first candidate

    def uniform_error(self, freqfold: int) -> float:
        return sum(layer[self.rank] for layer in self.errors[freqfold])

    def error(self, freqfold: int, ranks: list[int]) -> float:
        return sum(layer[r] for layer, r in zip(self.errors[freqfold], ranks))

    def ranks(self, freqfold: int) -> list[int]:
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


def survey(source: Source, tokens: torch.Tensor, rank: int, rope_dim: int, folds: list[int],
           mla_config_for, per_layer_ranks: bool, progress: bool = True) -> Survey:
    """Run the pre-pass; `mla_config_for(mla_shape)` gives the converted config for a shape. Errors are
    measured at the uniform rank, and with `per_layer_ranks` at every rank of `rank_grid` too."""
    sequences = max(1, min(tokens.shape[0], SURVEY_TOKENS // tokens.shape[1]))
    runner = LayerByLayer(source, tokens[:sequences])
    result = Survey(rank=rank)
    max_rank = 2 * source.gqa.kv_width - rope_dim
    ranks = rank_grid(rank, max_rank) if per_layer_ranks else [rank]
    configs = {(f, r): mla_config_for(compressed_mla_shape(source.gqa, r, rope_dim, f)) for f in folds for r in ranks}
    rotary = _rotary_class(source)
    for layer in tqdm(range(source.num_layers), desc="surveying layers", unit="layer", disable=not progress):
        stats = runner.stats(layer)
        weights = _attention_weights(source, layer)
        for fold in folds:
            basis = analyse_layer(source.gqa, rope_dim, fold, stats, output_weight(source, layer))
            errors = {}
            for r in ranks:
                tensors = build_layer(source.gqa, basis, r, *weights)
                config = configs[fold, r]
                if basis.pair_freqs is not None:
                    config.qk_rope_pair_freqs = [basis.pair_freqs] * source.num_layers
                errors[r] = attention_error(runner, layer, config, rotary, tensors, source)
            result.errors.setdefault(fold, []).append(errors)
        del stats
        runner.advance(layer)
        source.weights.release()
    return result


def _rotary_class(source: Source):
    spec = source.family.calibration
    return getattr(importlib.import_module(spec["module"]), spec["rotary_embedding"])


def output_weight(source: Source, layer: int) -> torch.Tensor | None:
    """o_proj.weight [hidden, H * d] of `layer` for value-error weighting; None turns weighting off
    (TRANSMLA_PCA_WEIGHTING=none, for comparisons)."""
    if os.environ.get("TRANSMLA_PCA_WEIGHTING", "output") == "none":
        return None
    return source.weights.get(f"{source.family.attn_name('o_proj', layer)}.weight").float()


def _attention_weights(source: Source, layer: int):
    fam, w = source.family, source.weights

    def get(role, kind):
        name = f"{fam.attn_name(role, layer)}.{kind}"
        return w.get(name).float() if name in w else None

    return (get("q_proj", "weight"), get("k_proj", "weight"), get("v_proj", "weight"),
            get("q_proj", "bias"), get("k_proj", "bias"), get("v_proj", "bias"))


def attention_error(runner: LayerByLayer, layer: int, mla_cfg, rotary_cls, tensors: dict, source: Source) -> float:
    """Squared error of the compressed layer's attention output against the original's, relative to the
    layer's input residual stream."""
    from ..hf.attention import MLAAttention, rope_config

    x = runner.attention_inputs(layer, SURVEY_ERROR_SEQUENCES)  # [S, T, hidden]
    batch, seq = x.shape[:2]
    mla_cfg._attn_implementation = "sdpa"
    mla = MLAAttention(mla_cfg, layer).float().eval()
    state = {k: v.float() for k, v in tensors.items()}
    fam, w = source.family, source.weights
    for kind in ("weight", "bias"):
        name = f"{fam.attn_name('o_proj', layer)}.{kind}"
        if name in w:
            state[f"o_proj.{kind}"] = w.get(name).float()
    mla.load_state_dict(state, strict=True)
    positions = torch.arange(seq)[None].expand(batch, -1)
    with torch.no_grad():
        reference = runner.module(layer).self_attn(x, position_embeddings=runner.position_embeddings(batch),
                                                   attention_mask=None)[0]
        cos_sin = rotary_cls(config=rope_config(mla_cfg))(x, positions)
        out = mla(x, position_embeddings=cos_sin, attention_mask=None)[0]
    # Relative to the residual stream the error is added to: a layer whose attention barely moves the
    # stream matters less than one that dominates it.
    stream = runner.hidden[:batch]
    return ((out - reference).pow(2).sum() / stream.pow(2).sum().clamp_min(1e-30)).item()
