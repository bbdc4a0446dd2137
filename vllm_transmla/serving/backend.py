"""Latent attention backend of ours, for any latent width (kv_lora_rank + qk_rope_head_dim).

vLLM's stock CPU MLA kernel takes only a 576-wide latent and its common MLA metadata rejects head
sizes outside {320, 512, 576}. This backend reuses vLLM's MLA scaffolding (`MLAAttention` orchestrates
absorbed decode and expanded prefill; the paged cache, block tables and scheduler are vLLM's) and
supplies:

* decode (`forward_mqa`): absorbed attention over the paged latent cache, vectorized over the batch
  with torch (gather the blocks of every sequence, one masked softmax), no per-token Python loops;
* prefill (`LatentPrefillBackend`): per-request causal SDPA over the expanded K/V in the model dtype;
* metadata that accepts any head size.

It is handed to `MLAAttention(attn_backend=...)` by our model classes, so vLLM's global backend
choice for other models is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.attention.mla_attention import (
    MLACommonBackend,
    MLACommonMetadata,
    MLACommonMetadataBuilder,
)
from vllm.v1.attention.backend import AttentionLayer, MultipleOf
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLAImpl
from vllm.v1.attention.backends.mla.prefill.base import MLAPrefillBackend


@dataclass
class LatentMLAMetadata(MLACommonMetadata):
    def __post_init__(self):  # any latent width is fine here
        pass


class LatentMLAMetadataBuilder(MLACommonMetadataBuilder[LatentMLAMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device, **kwargs):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device, metadata_cls=LatentMLAMetadata, **kwargs)


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


def paged_latent_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float, kv_lora_rank: int) -> torch.Tensor:
    """Absorbed MLA decode, one query token per sequence.

    q [B, H, R + D] (latent query), kv_cache [num_blocks, block_size, R + D], block_table [B, max_blocks],
    seq_lens [B] -> out [B, H, R] = softmax(q . latent * scale) @ c_kv over each sequence's tokens.
    """
    block_size = kv_cache.shape[1]
    max_len = int(seq_lens.max())
    blocks = block_table[:, : (max_len + block_size - 1) // block_size].long()
    latent = kv_cache[blocks].flatten(1, 2)[:, :max_len]  # [B, S, R + D]
    scores = torch.bmm(q, latent.transpose(1, 2)).float() * scale  # [B, H, S]
    pad = torch.arange(max_len, device=q.device)[None, :] >= seq_lens[:, None]
    scores.masked_fill_(pad[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(latent.dtype)
    return torch.bmm(probs, latent[..., :kv_lora_rank])


def triton_latent_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float, kv_lora_rank: int,
                         num_kv_splits: int = 4) -> torch.Tensor:
    """The same as `paged_latent_decode` with vLLM's Triton MLA decode kernel (no head-size list of
    its own): the CUDA path. Runs on CPU tensors under TRITON_INTERPRET=1 for testing."""
    from vllm.v1.attention.ops.triton_decode_attention import decode_attention_fwd

    batch, heads = q.shape[:2]
    out = q.new_zeros(batch, heads, kv_lora_rank)
    lse = q.new_zeros(batch, heads)
    partial = torch.empty(batch, heads, num_kv_splits, kv_lora_rank + 1, dtype=torch.float32, device=q.device)
    cache = kv_cache.unsqueeze(2)  # [blocks, block_size, 1, R + D]
    decode_attention_fwd(q.contiguous(), cache, cache[..., :kv_lora_rank], out, lse, block_table, seq_lens,
                         partial, num_kv_splits, scale, kv_cache.shape[1], is_mla=True)
    return out


class LatentMLAImpl(CPUMLAImpl):
    """vLLM's MLA scaffolding (cache writes, prefill through MLAAttention) with a decode that takes
    any latent width: vectorized torch on CPU, vLLM's Triton MLA decode kernel on CUDA."""

    def forward_mqa(self, q, kv_c_and_k_pe_cache: torch.Tensor, attn_metadata, layer: AttentionLayer):
        decode = attn_metadata.decode
        assert decode is not None
        if isinstance(q, tuple):
            q = torch.cat(q, dim=-1)
        decode_fn = triton_latent_decode if q.is_cuda else paged_latent_decode
        out = decode_fn(q, kv_c_and_k_pe_cache, decode.block_table, decode.seq_lens, self.scale, self.kv_lora_rank)
        return out, None


class LatentPrefillBackend(MLAPrefillBackend):
    """Prefill over the expanded per-head K/V: causal SDPA per request, in the model dtype."""

    @staticmethod
    def get_name() -> str:
        return "TRANSMLA_SDPA"

    @classmethod
    def is_available(cls) -> bool:
        return True

    def supports_out(self) -> bool:
        return True

    def run_prefill_new_tokens(self, q, k, v, return_softmax_lse, out=None, output_scale=None):
        assert output_scale is None and not return_softmax_lse, "chunked-context prefill is not supported"
        starts = self._prefill_metadata.query_start_loc.tolist()
        result = out if out is not None else q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
        for begin, end in zip(starts[:-1], starts[1:]):
            # [T, H, d] -> [H, T, d]
            attn = F.scaled_dot_product_attention(
                q[begin:end].transpose(0, 1), k[begin:end].transpose(0, 1), v[begin:end].transpose(0, 1),
                is_causal=True, scale=self.scale)
            result[begin:end] = attn.transpose(0, 1)
        return result

    def run_prefill_context_chunk(self, chunk, q, k, v, out=None):
        raise NotImplementedError("chunked-context prefill is not supported by the transmla CPU backend")
