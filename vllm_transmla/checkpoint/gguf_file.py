"""Reading a GGUF file (llama.cpp's format) as a Hugging Face checkpoint, one tensor at a time.

An explicit weight map from llama.cpp's names to transformers' (the families whose GGUF layout is the
HF one up to names: llama and mistral under `general.architecture = "llama"`, qwen2), llama.cpp's
row permutation of q/k undone for "llama" (its converter interleaves each head's rotary halves for
ggml's rope), and every tensor dequantized to float32 with the gguf package's own kernels. Tensor bytes
are read with plain file reads at the offsets of the parsed header, so memory holds one tensor at a
time (gguf's reader maps the whole file; pages it touches would stay resident).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..errors import TransMLAError

# llama.cpp tensor name -> transformers name ({i}: the decoder layer)
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
# general.architecture values this reader maps; Mixtral GGUFs ("llama" with ffn_*_exps) are refused.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
PERMUTED_ARCHITECTURES = ("llama",)  # llama.cpp permutes q/k rows only for these


def hf_name(gguf_name: str) -> str | None:
    """transformers' name of a llama.cpp tensor, or None for a tensor with no HF counterpart."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = LAYER_RE.match(gguf_name)
    if m and m.group(2) in LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"
    return None


def unpermute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: per head, rows [x0, y0, x1, y1, ...] -> [x0, x1, ..., y0, y1, ...]
    (rows [heads * head_dim, ...] or a bias [heads * head_dim])."""
    head_dim = rows.shape[0] // heads
    return rows.reshape(heads, head_dim // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def read_architecture(reader) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise TransMLAError(f"{reader.path} has no general.architecture: it is not a llama.cpp model file; "
                            f"pass a GGUF written by llama.cpp's converter")
    return bytes(field.parts[field.data[0]]).decode()


class GGUFCheckpoint:
    """Name -> float32 tensor access over one GGUF file, under transformers' tensor names (read-only)."""

    def __init__(self, path: Path, num_heads: int, num_kv_heads: int, reader=None):
        """`reader`: the file's GGUFReader where the caller has one (parsing a file again costs seconds)."""
        from gguf import GGMLQuantizationType, GGUFReader

        self.path = Path(path)
        try:
            reader = reader or GGUFReader(self.path)
        except Exception as err:  # noqa: BLE001  (any parse failure means a broken download)
            raise TransMLAError(f"{self.path} is not a readable GGUF file ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else 'truncated'}): re-download it") from None
        self.architecture = read_architecture(reader)
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise TransMLAError(f"GGUF architecture {self.architecture!r} is not supported (supported: "
                                f"{', '.join(SUPPORTED_ARCHITECTURES)}): convert the model's safetensors checkpoint")
        if any("_exps." in t.name for t in reader.tensors):
            raise TransMLAError(f"{self.path} is a mixture-of-experts GGUF, which this reader does not map: convert "
                                f"the model's safetensors checkpoint")
        self._heads = {"self_attn.q_proj": num_heads, "self_attn.k_proj": num_kv_heads}
        self._float = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
        self.tensors = {}
        size = self.path.stat().st_size
        for tensor in reader.tensors:
            name = hf_name(tensor.name)
            if name is None:
                continue  # e.g. rope_freqs.weight: transformers computes it from the config
            if tensor.data_offset + tensor.n_bytes > size:
                raise TransMLAError(f"{self.path} is truncated (tensor {tensor.name} ends past the file): "
                                    f"re-download it")
            self.tensors[name] = tensor
        self.skipped = sorted(t.name for t in reader.tensors if hf_name(t.name) is None)

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self.tensors[name].shape))  # GGUF lists dims innermost first

    def non_float_tensor(self) -> tuple[str, str, str] | None:
        return None  # every tensor is dequantized to float32

    def get(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        tensor, shape = self.tensors[name], self.shape(name)
        buffer = bytearray(int(tensor.n_bytes))
        with open(self.path, "rb") as f:
            f.seek(int(tensor.data_offset))
            if f.readinto(buffer) != len(buffer):
                raise TransMLAError(f"cannot read tensor {tensor.name} from {self.path}: re-download it")
        raw = np.frombuffer(buffer, dtype=np.uint8)
        kind = tensor.tensor_type
        if kind in self._float:
            values = raw.view(self._float[kind]).astype(np.float32).reshape(shape)
        else:
            values = dequantize(raw.reshape(*shape[:-1], -1), kind).astype(np.float32, copy=False).reshape(shape)
        out = torch.from_numpy(np.ascontiguousarray(values))
        role = name.rsplit(".", 1)[0].split(".", 3)[-1]  # e.g. self_attn.q_proj
        if self.architecture in PERMUTED_ARCHITECTURES and role in self._heads:
            out = unpermute_rows(out, self._heads[role]).contiguous()
        return out
