"""Baselines for the quality benchmark, at the same KV-cache size as ours (no fine-tuning for anyone).

Both are applied to the original transformers Llama in place and measured with the same perplexity code.
Cache budget B = dims cached per token and layer (the original caches 2 * n_kv * d).

* per-head SVD: each KV head's W_k and W_v [d, hidden] replaced by their best rank-r approximation
  (r = B / (2 n_kv)); the cache holds the r-dim codes of every head and RoPE is applied after
  reconstruction. Plain weight SVD, no calibration.
* MHA2MLA-style (Ji et al. 2025, "Towards Economical Inference: Enabling DeepSeek's Multi-Head Latent
  Attention in Any Transformer-based LLMs"): partial RoPE keeps, per KV head, the r rotary frequencies
  with the largest 2-norm contribution  sum_{h in group} mean|q_{h,i}| * mean|k_{j,i}|  measured on the
  calibration text (S_2-norm); the other frequencies lose their rotation (NoPE). The NoPE key rows of
  all heads and all value rows are compressed together by one truncated SVD of the stacked weights
  [W_k_nope ; W_v] (SVD_joint) to rank B - 2 r n_kv. r is swept and the best is reported.
* activation-aware variants of both (`activation_aware=True`, as ASVD / SVD-LLM do for weights): the
  truncation minimises the error of the projections' outputs on the calibration inputs X of each layer,
  |(W - W_r) X|, instead of |W - W_r|: W_r = U_r U_r^T W with U_r the top left singular vectors of
  W (X X^T)^1/2, i.e. the principal directions of the keys and values themselves.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import (
    ALL_ATTENTION_FUNCTIONS,
    LlamaAttention,
    eager_attention_forward,
    rotate_half,
)


def low_rank(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-`rank` approximation of weight [out, in] (truncated SVD, float64)."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(weight.dtype)


def activation_aware_low_rank(weight: torch.Tensor, rank: int, input_cov: torch.Tensor) -> torch.Tensor:
    """Rank-`rank` W_r [out, in] minimising |(W - W_r) X| over inputs with sum x x^T = input_cov [in, in]:
    the projection of W onto the top `rank` principal directions of its outputs W x (float64)."""
    w = weight.double()
    values, vectors = torch.linalg.eigh(w @ input_cov.double() @ w.T)
    top = vectors[:, values.argsort(descending=True)[:rank]]  # [out, rank]
    return (top @ (top.T @ w)).to(weight.dtype)


def _input_cov_hooks(model, covs: list) -> list:
    """Hooks adding each layer's sum x x^T [hidden, hidden] (float64) of what k_proj and v_proj read into
    covs[layer] on every forward pass."""
    def keep(i):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            covs[i] = x.T @ x if covs[i] is None else covs[i] + x.T @ x
        return hook

    return [layer.self_attn.k_proj.register_forward_pre_hook(keep(i)) for i, layer in enumerate(model.model.layers)]


def input_covariances(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, sum x x^T [hidden, hidden] (float64) of what k_proj and v_proj read on `tokens`."""
    covs = [None] * len(model.model.layers)
    hooks = _input_cov_hooks(model, covs)
    with torch.no_grad():
        for batch in tokens.split(4):
            model(batch)
    for h in hooks:
        h.remove()
    return covs


def _truncate(weight: torch.Tensor, rank: int, input_cov: torch.Tensor | None) -> torch.Tensor:
    return low_rank(weight, rank) if input_cov is None else activation_aware_low_rank(weight, rank, input_cov)


def _shape(model):
    cfg = model.config
    return cfg.num_key_value_heads, cfg.head_dim


def apply_per_head_svd(model, budget: int, calib_tokens: torch.Tensor | None = None) -> dict:
    """In place; returns the settings. budget: cached dims per token and layer. With `calib_tokens`, the
    activation-aware truncation (module docstring)."""
    n_kv, d = _shape(model)
    rank = budget // (2 * n_kv)
    if rank < 1:
        raise ValueError(f"budget {budget} is below one dim per head for K and V")
    covs = input_covariances(model, calib_tokens) if calib_tokens is not None else [None] * len(model.model.layers)
    with torch.no_grad():
        for layer, cov in zip(model.model.layers, covs):
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                w = proj.weight.view(n_kv, d, -1)
                heads = [_truncate(w[j], rank, cov) for j in range(n_kv)]
                proj.weight.copy_(torch.stack(heads).view_as(proj.weight))
    return {"rank_per_head": rank, "cached_dims": 2 * n_kv * rank}


def pair_scores(model, tokens: torch.Tensor, input_covs: list | None = None) -> list[torch.Tensor]:
    """Per layer [n_kv, d/2]: sum over the group's query heads of mean|q_pair| * mean|k_pair| (pre-rope
    norms of each rotary pair; RoPE does not change them). With `input_covs` (one None per layer), the same
    forward pass also fills each layer's attention-input sum x x^T (as input_covariances)."""
    n_kv, d = _shape(model)
    heads = model.config.num_attention_heads
    seen: dict[tuple[int, str], torch.Tensor] = {}
    hooks = _input_cov_hooks(model, input_covs) if input_covs is not None else []
    for i, layer in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj"):
            hooks.append(getattr(layer.self_attn, name).register_forward_hook(
                lambda m, inp, out, key=(i, name): seen.__setitem__(key, out.detach())))
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()

    def pair_norm(x, n):  # [B, T, n*d] -> [n, d/2] mean over tokens of each pair's norm
        x = x.reshape(-1, n, 2, d // 2)
        return x.norm(dim=2).mean(dim=0)

    scores = []
    for i in range(len(model.model.layers)):
        q = pair_norm(seen[i, "q_proj"], heads).view(n_kv, heads // n_kv, d // 2).sum(dim=1)
        k = pair_norm(seen[i, "k_proj"], n_kv)
        scores.append(q * k)
    return scores


class PartialRopeAttention(LlamaAttention):
    """Llama attention where RoPE rotates only the pairs in `rope_pairs` [n_kv, d/2] (bool) of each KV
    head (and of its query heads); the other pairs are position-free (NoPE)."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, H, T, d]
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, n_kv, T, d]
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings  # [B, T, d]
        mask = torch.cat([self.rope_pairs, self.rope_pairs], dim=-1)[None, :, None, :]  # [1, n_kv, 1, d]

        def rotate(x, groups):
            m = mask.repeat_interleave(groups, dim=1)
            c = torch.where(m, cos[:, None], torch.ones_like(cos[:, None]))
            s = torch.where(m, sin[:, None], torch.zeros_like(sin[:, None]))
            return x * c + rotate_half(x) * s

        q, k = rotate(q, self.num_key_value_groups), rotate(k, 1)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = interface(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def apply_mha2mla(model, budget: int, rope_pairs: int, calib_tokens: torch.Tensor,
                  activation_aware: bool = False) -> dict:
    """In place; returns the settings. rope_pairs: rotary pairs kept per KV head; `activation_aware`: the
    joint truncation on the calibration inputs (module docstring)."""
    n_kv, d = _shape(model)
    rank = budget - 2 * rope_pairs * n_kv
    if rank < 1 or rope_pairs > d // 2:
        raise ValueError(f"budget {budget} leaves no latent beside {rope_pairs} rope pairs per head")
    covs = [None] * len(model.model.layers)  # stays None (plain SVD) unless activation-aware
    scores = pair_scores(model, calib_tokens, covs if activation_aware else None)
    with torch.no_grad():
        for layer, score, cov in zip(model.model.layers, scores, covs):
            attn = layer.self_attn
            keep = torch.zeros(n_kv, d // 2, dtype=torch.bool)
            keep.scatter_(1, score.topk(rope_pairs, dim=1).indices, True)
            dims = torch.cat([keep, keep], dim=1).reshape(-1)  # [n_kv * d] key rows that keep RoPE
            w_k, w_v = attn.k_proj.weight, attn.v_proj.weight
            joint = _truncate(torch.cat([w_k[~dims], w_v]), rank, cov)
            w_k[~dims] = joint[: int((~dims).sum())]
            w_v.copy_(joint[int((~dims).sum()):])
            attn.__class__ = PartialRopeAttention
            attn.register_buffer("rope_pairs", keep, persistent=False)
    return {"rope_pairs_per_head": rope_pairs, "rope_dims": 2 * rope_pairs * n_kv, "latent_rank": rank,
            "cached_dims": budget}


def calibration_batch(model_path, sequences: int = 16, seq_len: int = 256, files=None) -> torch.Tensor:
    """[sequences, seq_len] tokens of the calibration text our converter uses: `files` (read as `--calib`
    reads them), or the shipped text."""
    from importlib import resources

    from transformers import AutoTokenizer

    from vllm_transmla.convert.calibration import DEFAULT_CALIBRATION
    from vllm_transmla.text_files import iter_documents

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    texts = (list(iter_documents(files, "calibration file", "--calib")) if files else
             [resources.files("vllm_transmla.data").joinpath(DEFAULT_CALIBRATION).read_text()])
    ids = [t for text in texts for t in tokenizer(text, add_special_tokens=False).input_ids][: sequences * seq_len]
    return torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
