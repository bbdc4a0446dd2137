"""Write a llama.cpp-style GGUF file from one of the tiny transformers checkpoints, as llama.cpp's converter
does: its names, q/k rows permuted for ggml's rope, Q4_1 / Q8_0 quantized matrices (gguf's quantizers),
F32 norms, the BPE vocabulary and merges, a chat template."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants
from safetensors.torch import load_file

NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
         "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
         "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
         "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
         "mlp.down_proj.weight": "ffn_down.weight"}
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"


def permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k permutation (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def write_gguf(src: Path, out: Path, architecture: str = "llama", matrix_type=GGMLQuantizationType.Q4_1,
               experts: bool = False) -> Path:
    cfg = json.loads((src / "config.json").read_text())
    tensors = {k: v for f in sorted(src.glob("*.safetensors")) for k, v in load_file(f).items()}
    writer = GGUFWriter(str(out), architecture)
    writer.add_name("tiny test model")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_dimension_count(cfg["head_dim"])
    writer.add_key_length(cfg["head_dim"])
    writer.add_value_length(cfg["head_dim"])
    writer.add_vocab_size(cfg["vocab_size"])
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in ("<pad>", "<s>", "</s>") else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    writer.add_pad_token_id(cfg["pad_token_id"])
    writer.add_chat_template(CHAT_TEMPLATE)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for name, t in tensors.items():
        if name == "model.embed_tokens.weight":
            _add(writer, "token_embd.weight", t, GGMLQuantizationType.Q8_0)
        elif name == "model.norm.weight":
            _add(writer, "output_norm.weight", t, GGMLQuantizationType.F32)
        elif name == "lm_head.weight":
            _add(writer, "output.weight", t, GGMLQuantizationType.Q8_0)
        else:
            layer, local = name.split(".", 3)[2], name.split(".", 3)[3]
            if architecture == "llama" and local == "self_attn.q_proj.weight":
                t = permute(t, heads)
            elif architecture == "llama" and local == "self_attn.k_proj.weight":
                t = permute(t, kv_heads)
            kind = GGMLQuantizationType.F32 if t.dim() == 1 else matrix_type
            _add(writer, f"blk.{layer}.{NAMES[local]}", t, kind)
    if experts:  # what a Mixtral GGUF holds: stacked experts
        _add(writer, "blk.0.ffn_gate_exps.weight", torch.zeros(2, 32, 32), GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add(writer, name: str, tensor: torch.Tensor, kind) -> None:
    data = tensor.float().numpy().astype(np.float32)
    if kind == GGMLQuantizationType.F32:
        writer.add_tensor(name, data)
    else:
        writer.add_tensor(name, quants.quantize(data, kind), raw_dtype=kind)
