"""What a conversion will do, decided and checked once before any tensor is read.

`ConvertOptions` is what the user asked (the CLI's flags; None means "the default"); `plan_conversion`
resolves it against the source's shape into a `ConversionPlan` (mode, latent shape, ranks per layer,
rope layout, calibration), raising TransMLAError for every illegal combination. Choices that need the
calibration survey (`--freqfold auto`, `--rank-allocation measured`) are planned as such and settled by
`ConversionPlan.settled`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..errors import TransMLAError
from .compress import SELECT, check_q_lora_rank, check_rank, plan_rope
from .geometry import GQAShape, MLAShape
from .groups import group_shape

AUTO = "auto"
MIN_LATENT_RANK = 4  # below this the latent cannot carry keys and values of any model


@dataclass(frozen=True)
class ConvertOptions:
    """What the user asked for; None means the default."""

    mode: str | None = None
    kv_lora_rank: int | None = None
    kv_ratio: float | None = None
    qk_rope_dim: int | None = None
    freqfold: int | str | None = None
    rank_allocation: str | None = None
    q_lora_rank: int | None = None
    calib: tuple[str, ...] | None = None
    calib_seq_len: int = 256
    calib_tokens: int = 32768
    latent_groups: int = 1  # G latents, one per group of query heads and the KV heads they read (groups.py)
    tpla_ready: str | None = None  # rotate each latent for TPLA's slices (tpla.py): the transform's name
    output_refit: bool = True  # refit o_proj over all heads (refit.py); off: the source's o_proj
    refine_epochs: int = 0  # epochs of gradient refinement per layer after the closed form (local_refine.py)

    @property
    def compressing(self) -> bool:
        return any(v is not None for v in (self.kv_lora_rank, self.qk_rope_dim, self.kv_ratio, self.freqfold,
                                           self.rank_allocation, self.q_lora_rank))


@dataclass(frozen=True)
class Calibration:
    files: tuple[str, ...] | None  # None: the shipped text
    seq_len: int
    max_tokens: int


@dataclass(frozen=True)
class ConversionPlan:
    """A resolved, checked conversion. Compressed plans carry the latent rank (`rank`, or per layer
    `ranks`), the rope width and layout, query rank and calibration; exact plans only the mode."""

    mode: str
    gqa: GQAShape
    num_layers: int
    rank: int | None = None
    rope_dim: int | None = None
    freqfold: int | str | None = None  # a FreqFold F, SELECT, or AUTO until the survey settles it
    rank_allocation: str = "uniform"  # or "measured" (per-layer ranks from the survey)
    ranks: tuple[int, ...] | None = None
    q_lora_rank: int | None = None
    calibration: Calibration | None = None
    notes: tuple[str, ...] = ()
    survey_results: dict = field(default_factory=dict)  # what the survey measured, for the provenance
    latent_groups: int = 1  # ranks, rope width and layout are per group (groups.py)
    tpla_transform: str | None = None  # the latent's rotation for TPLA (tpla.py), or None
    output_refit: bool = True
    refine_epochs: int = 0

    @property
    def group_gqa(self) -> GQAShape:
        """The attention shape each latent is built for: the whole model's, or one group's."""
        return group_shape(self.gqa, self.latent_groups)

    @property
    def compressed(self) -> bool:
        return self.mode == "compressed"

    @property
    def needs_survey(self) -> bool:
        return self.compressed and (self.freqfold == AUTO or (self.rank_allocation == "measured" and not self.ranks))

    def layer_rank(self, layer: int) -> int:
        return self.ranks[layer] if self.ranks else self.rank

    def settled(self, freqfold, ranks: list[int] | None, survey_results: dict) -> "ConversionPlan":
        """The plan once the survey chose the FreqFold and (with measured allocation) the ranks."""
        return dataclasses.replace(self, freqfold=freqfold, ranks=tuple(ranks) if ranks else None,
                                   survey_results={**self.survey_results, **survey_results})

    def mla_shape(self) -> MLAShape:
        from .exact import exact_mla_shape

        if not self.compressed:
            return dataclasses.replace(exact_mla_shape(self.group_gqa), latent_groups=self.latent_groups)
        ranks = self.ranks or (self.rank,) * self.num_layers
        shape = compressed_mla_shape(self.group_gqa, max(ranks), self.rope_dim, self.freqfold)
        return dataclasses.replace(shape, kv_lora_ranks=tuple(ranks) if self.ranks else None,
                                   q_lora_rank=self.q_lora_rank, latent_groups=self.latent_groups)

    def settings(self) -> dict:
        """The provenance recorded in config.json's `transmla` entry."""
        groups = {"latent_groups": self.latent_groups} if self.latent_groups > 1 else {}
        if self.tpla_transform:
            groups["tpla_transform"] = self.tpla_transform
        if not self.compressed:
            return {"mode": self.mode, **groups}
        cal = self.calibration
        out = {"mode": self.mode, "kv_lora_rank": self.rank, "qk_rope_dim": self.rope_dim,
               "freqfold": self.freqfold, "rank_allocation": self.rank_allocation, "q_lora_rank": self.q_lora_rank,
               "calibration_seq_len": cal.seq_len}
        if self.ranks:
            out["kv_lora_ranks"] = list(self.ranks)
        if not self.output_refit:
            out["output_refit"] = False
        if self.refine_epochs:
            out["refine_epochs"] = self.refine_epochs
        return {**out, **groups, **self.survey_results}


def compressed_mla_shape(gqa: GQAShape, rank: int, rope_dim: int, freqfold) -> MLAShape:
    """The MLA shape of a compressed conversion; raises TransMLAError for illegal settings."""
    plan = plan_rope(gqa, rope_dim, freqfold)
    check_rank(gqa, rank, rope_dim)
    return MLAShape(kv_lora_rank=rank, qk_rope_head_dim=rope_dim, qk_nope_head_dim=gqa.head_dim,
                    v_head_dim=gqa.head_dim, qk_rope_num_blocks=plan.blocks)


def plan_conversion(gqa: GQAShape, num_layers: int, options: ConvertOptions) -> ConversionPlan:
    """Resolve and check `options` for a source of shape `gqa`; raises TransMLAError naming the flag. With
    latent groups, the ranks, rope width and layout are those of each group's latent."""
    mode = options.mode or ("compressed" if options.compressing else "exact")
    groups = _check_groups(options)
    tpla = _check_tpla(options, groups)
    whole, gqa = gqa, group_shape(gqa, groups)
    if mode not in ("exact", "compressed"):
        raise TransMLAError(f"unknown mode {mode!r}: use --mode exact or --mode compressed")
    if options.rank_allocation not in (None, "uniform", "measured"):
        raise TransMLAError(f"--rank-allocation {options.rank_allocation!r}: use 'uniform' (one rank for every layer) "
                            f"or 'measured' (per-layer ranks by calibration error, same total cache)")
    refine = _check_refine(options.refine_epochs)
    if mode == "exact":
        _check_exact(options)
        return ConversionPlan(mode=mode, gqa=whole, num_layers=num_layers, latent_groups=groups,
                              tpla_transform=tpla)
    calibration = _check_calibration(options)
    notes = []
    width = 2 * gqa.kv_width  # cached values per token and layer in the source (in one group's KV heads)
    ratio = _check_ratio(options.kv_ratio)
    budget = int(round(ratio * width)) if ratio is not None else None
    rope = options.qk_rope_dim if options.qk_rope_dim is not None else _default_rope_dim(gqa, budget, ratio, notes)
    if budget is not None:
        rank = budget - rope
        if rank < MIN_LATENT_RANK:
            floor = (rope + MIN_LATENT_RANK) / width
            raise TransMLAError(f"--kv-ratio {ratio} leaves no latent worth caching ({max(rank, 0)} + {rope} rope of "
                                f"the {width} values the source caches per token and layer): raise it to at least "
                                f"{math.ceil(floor * 1000) / 1000}")
    elif options.kv_lora_rank is not None:
        rank = options.kv_lora_rank
    else:
        rank = min(512, width - rope)
        if rank != 512:
            notes.append(f"kv_lora_rank set to {rank} = 2 * num_kv_heads * head_dim - qk_rope_dim (512 is more "
                         f"than this model caches)")
    freqfold = _check_freqfold(options.freqfold)
    if freqfold is None:
        freqfold = default_freqfold(gqa, rope)
    # Every layout a survey may pick must be legal; check the default one (or the one asked) now.
    compressed_mla_shape(gqa, rank, rope, SELECT if freqfold == AUTO else freqfold)
    if options.q_lora_rank is not None:
        check_q_lora_rank(gqa, options.q_lora_rank, rope)
    if groups > 1:
        _check_grouped_options(freqfold, options)
    per = f" per group ({groups} groups)" if groups > 1 else ""
    notes.append(f"latent {rank} + {rope} rope = {rank + rope} of the {width} values the source caches per token "
                 f"and layer{per} ({(rank + rope) / width:.1%})")
    return ConversionPlan(mode=mode, gqa=whole, num_layers=num_layers, rank=rank, rope_dim=rope, freqfold=freqfold,
                          rank_allocation=options.rank_allocation or "uniform", q_lora_rank=options.q_lora_rank,
                          calibration=calibration, notes=tuple(notes), latent_groups=groups, tpla_transform=tpla,
                          output_refit=options.output_refit, refine_epochs=refine)


def _check_exact(options: ConvertOptions) -> None:
    """Exact mode refuses what only changes a compressed conversion."""
    if options.refine_epochs:
        raise TransMLAError("--refine-epochs applies to compressed conversions: the exact one has no error to "
                            "refine; drop the flag or add --kv-ratio")
    if not options.output_refit:
        raise TransMLAError("--no-output-refit applies to compressed conversions: exact mode keeps the source's "
                            "o_proj anyway; drop the flag or add --kv-ratio")
    if options.compressing:
        raise TransMLAError("--kv-lora-rank/--kv-ratio/--qk-rope-dim/--freqfold/--rank-allocation/--q-lora-rank "
                            "need --mode compressed (exact mode keeps the full K and V)")


def _is_whole(value, minimum: int) -> bool:
    """An int (not a bool) of at least `minimum`: what the whole-number flags accept."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_refine(epochs) -> int:
    if not _is_whole(epochs, 0):
        raise TransMLAError(f"--refine-epochs {epochs!r} must be a whole number >= 0 (0: no refinement)")
    return epochs


def _check_groups(options: ConvertOptions) -> int:
    groups = options.latent_groups
    if not _is_whole(groups, 1):
        raise TransMLAError(f"--latent-groups {groups!r} must be a positive whole number (1: one latent)")
    return groups


def _check_tpla(options: ConvertOptions, groups: int) -> str | None:
    from .tpla import TRANSFORMS

    if options.tpla_ready is None:
        return None
    if options.tpla_ready not in TRANSFORMS:
        raise TransMLAError(f"--tpla-ready {options.tpla_ready!r} is not a known transform: use one of "
                            f"{', '.join(TRANSFORMS)}")
    if groups > 1:
        raise TransMLAError("--tpla-ready is for one latent sliced across ranks; grouped latents (--latent-groups) "
                            "are already split by their heads: pass one of the two")
    return options.tpla_ready


def _check_grouped_options(freqfold, options: ConvertOptions) -> None:
    """What grouped latents do not support yet, refused before any tensor is read."""
    if freqfold in (SELECT, AUTO):
        raise TransMLAError(f"--freqfold {freqfold} is not supported with --latent-groups (each group would pick its "
                            f"own frequencies): pass a FreqFold number, e.g. --freqfold 2")
    if options.rank_allocation == "measured":
        raise TransMLAError("--rank-allocation measured is not supported with --latent-groups: use uniform ranks")
    if options.q_lora_rank is not None:
        raise TransMLAError("--q-lora-rank is not supported with --latent-groups: leave it out")


def _check_ratio(ratio) -> float | None:
    if ratio is None:
        return None
    if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 0 < ratio <= 1:
        raise TransMLAError(f"--kv-ratio {ratio} must be in (0, 1]: the fraction of the original KV cache to keep, "
                            f"e.g. 0.25")
    return float(ratio)


def _default_rope_dim(gqa: GQAShape, budget: int | None, ratio, notes: list[str]) -> int:
    """64 as the reference code, at most head_dim and at most half of a --kv-ratio budget; a legal width
    (even, dividing head_dim) so one rope block serves."""
    limit = min(64, gqa.head_dim, max(2, budget // 2) if budget is not None else 64)
    rope = max(r for r in range(2, limit + 1, 2) if gqa.head_dim % r == 0)
    if rope != 64:
        if limit == gqa.head_dim and gqa.head_dim < 64:
            why = f"head_dim is {gqa.head_dim}"
        else:
            why = (f"the widest that divides head_dim {gqa.head_dim} within half of the --kv-ratio {ratio} budget "
                   f"of {budget} cached values")
        notes.append(f"qk_rope_dim set to {rope} ({why}; pass --qk-rope-dim to choose)")
    return rope


def default_freqfold(gqa: GQAShape, rope_dim: int):
    """FreqFold F = 2 head_dim / D, the reference code's for Llama-3 (d = 128, D = 64): each PCA spans two
    rope pairs' worth of adjacent frequencies. On SmolLM2-135M (d = 64) it beat the selected-frequency
    layout at every cache size measured (benchmarks/quality/results_smollm2.json; at 25%, held-out perplexity
    138 vs 205 before sequential calibration and the value refit). Where it is not a legal layout for the
    shape: the smallest legal F, else the selected-frequency layout."""
    step = max(1, gqa.head_dim // rope_dim) if rope_dim <= gqa.head_dim else 1
    for fold in (2 * step, step):
        try:
            plan_rope(gqa, rope_dim, fold)
            return fold
        except TransMLAError:
            continue
    return SELECT


def _check_freqfold(freqfold):
    if freqfold is None:
        return None  # the default, which depends on the shape
    if freqfold in (AUTO, SELECT):
        return freqfold
    try:
        fold = int(freqfold)
    except (TypeError, ValueError):
        fold = None
    if fold is None or str(fold) != str(freqfold).strip() or fold < 1:
        raise TransMLAError(f"--freqfold {freqfold!r} must be a whole number, 'select' or 'auto' "
                            f"(a FreqFold is at least 1)")
    return fold


def _check_calibration(options: ConvertOptions) -> Calibration:
    for flag, value in (("--calib-seq-len", options.calib_seq_len), ("--calib-tokens", options.calib_tokens)):
        if not _is_whole(value, 1):
            raise TransMLAError(f"{flag} {value} must be a positive number of tokens")
    files = tuple(str(f) for f in options.calib) if options.calib else None
    return Calibration(files=files, seq_len=options.calib_seq_len, max_tokens=options.calib_tokens)
