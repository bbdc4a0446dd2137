"""Latent attention backend of ours, for any latent width (kv_lora_rank + qk_rope_head_dim).

vLLM's stock CPU MLA kernel takes only a 576-wide latent and its common MLA metadata rejects head
sizes outside {320, 512, 576}. This backend reuses vLLM's MLA scaffolding (`MLAAttention` orchestrates
absorbed decode and expanded prefill; the paged cache, block tables and scheduler are vLLM's) and
supplies:

* decode (`forward_mqa`): absorbed attention over the paged latent cache (our fused C kernel on x86
  CPUs, torch elsewhere on CPU, vLLM's Triton MLA decode on CUDA), for single tokens and for short
  multi-token queries (short extends after a prefix-cache hit, a chunked prompt's short tail,
  speculative tokens), which then skip the prefill's up-projection of their whole cached context;
* prefill (`LatentPrefillBackend`): per-request causal attention over the expanded K/V (chunked
  matmuls on CPU, faster there than torch's SDPA; SDPA elsewhere), and attention over chunks of cached
  context with its log-sum-exp, so chunked prefill and prefix caching work;
* metadata that accepts any head size.

It is handed to `MLAAttention(attn_backend=...)` by our model classes, so vLLM's global backend
choice for other models is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.model_executor.layers.attention.mla_attention import (
    MLACommonBackend,
    MLACommonDecodeMetadata,
    MLACommonMetadata,
    MLACommonMetadataBuilder,
    QueryLenSupport,
)
from vllm.v1.attention.backend import AttentionLayer, MultipleOf
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLAImpl
from vllm.v1.attention.backends.mla.prefill.base import MLAPrefillBackend

from .. import envs
from .latent_math import AttentionPaths, paged_latent_decode, per_token_rows, ragged_attention
from .triton_decode import triton_latent_decode


@dataclass
class LatentMLAMetadata(MLACommonMetadata):
    def __post_init__(self):  # any latent width is fine here
        pass


# Requests with at most this many new tokens go through the absorbed (decode) path. Per query token
# and cached token it costs 2 H (2 R + D) FLOPs; the prefill path instead up-projects every cached
# token through kv_b, 2 R H (d_nope + d_v) FLOPs, whatever the query length: the break-even is
# R (d_nope + d_v) / (2 R + D) query tokens, 60 for 512 + 64 and heads of 64, 120 for heads of 128.
# VLLM_TRANSMLA_SHORT_QUERY_TOKENS=1 sends every multi-token query to the prefill path, as vLLM does
# (benchmarks/speed/prefix_hit.py compares the two).
SHORT_QUERY_TOKENS = envs.short_query_tokens()


class LatentMLAMetadataBuilder(MLACommonMetadataBuilder[LatentMLAMetadata]):
    query_len_support: ClassVar[QueryLenSupport] = QueryLenSupport.VARLEN
    reorder_batch_threshold: int = SHORT_QUERY_TOKENS

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device, **kwargs):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device, metadata_cls=LatentMLAMetadata, **kwargs)

    def _build_decode(self, block_table_tensor, seq_lens_device, max_seq_len, query_start_loc_cpu,
                      query_start_loc_device, num_decode_tokens, max_query_len, dcp_tot_seq_lens_device):
        """One row per decode query token (block table and causal length), once per step for all layers."""
        if num_decode_tokens != block_table_tensor.shape[0]:  # some requests have several new tokens
            block_table_tensor, seq_lens_device = per_token_rows(query_start_loc_device, block_table_tensor,
                                                                 seq_lens_device, num_decode_tokens)
        return MLACommonDecodeMetadata(block_table=block_table_tensor, seq_lens=seq_lens_device,
                                       dcp_tot_seq_lens=dcp_tot_seq_lens_device)


class LatentMLABackend(MLACommonBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]

    @classmethod
    def supports_block_size(cls, block_size: int | None) -> bool:
        return True

    @staticmethod
    def get_builder_cls():
        return LatentMLAMetadataBuilder

    @staticmethod
    def get_impl_cls():
        return LatentMLAImpl


class LatentMLAImpl(CPUMLAImpl):
    """vLLM's MLA scaffolding (cache writes, prefill through MLAAttention) with a decode that takes
    any latent width: vectorized torch on CPU, vLLM's Triton MLA decode kernel on CUDA."""

    def forward_mqa(self, q, kv_c_and_k_pe_cache: torch.Tensor, attn_metadata, layer: AttentionLayer):
        decode = attn_metadata.decode
        assert decode is not None
        if isinstance(q, tuple):
            q = torch.cat(q, dim=-1)
        decode_fn = triton_latent_decode if q.is_cuda else paged_latent_decode
        # one block-table row and length per query token (`LatentMLAMetadataBuilder._build_decode`)
        out = decode_fn(q, kv_c_and_k_pe_cache, decode.block_table, decode.seq_lens, self.scale, self.kv_lora_rank)
        return out, None


class LatentPrefillBackend(MLAPrefillBackend):
    """Prefill over the expanded per-head K/V, request by request: causal attention of the new tokens,
    and (chunked prefill, prefix caching) attention of the new tokens over chunks of their cached context,
    with the log-sum-exp vLLM merges the two parts by. Chunked matmuls on CPU (`chunked_attention`);
    elsewhere SDPA, or the same torch code where a log-sum-exp is needed."""

    # Which implementation runs; None: latent_math.DEFAULT_PATHS (an instance may take others).
    paths: AttentionPaths | None = None

    @staticmethod
    def get_name() -> str:
        return "TRANSMLA_SDPA"

    @classmethod
    def is_available(cls) -> bool:
        return True

    def supports_out(self) -> bool:
        return True

    def run_prefill_new_tokens(self, q, k, v, return_softmax_lse, out=None, output_scale=None):
        """q/k [T, H, d_qk], v [T, H, d_v] of every prefill's new tokens -> out [T, H, d_v] (and lse [H, T])."""
        assert output_scale is None, "fused FP8 output is not supported by the transmla prefill"
        starts = self._prefill_metadata.query_start_loc.tolist()
        return ragged_attention(q, k, v, starts, starts, self.scale, causal=True,
                                return_lse=return_softmax_lse, out=out, paths=self.paths)

    def run_prefill_context_chunk(self, chunk, q, k, v, out=None):
        """q [Tq, H, d_qk] of the chunk's requests' new tokens; k [Tc, H, d_qk], v [Tc, H, d_v] of the
        chunk's slice of their cached context -> out [Tq, H, d_v], lse [H, Tq] (no causal mask: all of
        the context precedes every new token)."""
        return ragged_attention(q, k, v, chunk.query_start_loc.tolist(), chunk.cu_seq_lens.tolist(), self.scale,
                                causal=False, return_lse=True, out=out, paths=self.paths)


