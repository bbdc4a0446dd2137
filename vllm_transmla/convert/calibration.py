"""Calibration streamed layer by layer: the original layers run once over the calibration tokens,
keeping only the current layer's input hidden states, so peak memory is about one layer plus the
activations [num_sequences, seq_len, hidden] - a model larger than memory still converts."""

from __future__ import annotations

import importlib
import re
from importlib import resources

import torch

from ..errors import TransMLAError
from ..text_files import iter_documents
from .compress import LayerStats
from .head_norm import normalize_heads
from .plan import Calibration
from .refit import output_moments, refit_moments
from .source import Source

# Proverbs and Mark (King James Version, public domain): never part of the held-out evaluation text.
DEFAULT_CALIBRATION = "kjv_calibration.txt"
# Latents (and the source's head outputs) kept between the value refit, the output refit and the next pass
# (ReplayAttention) up to this size; above it those passes compute them again. SmolLM2 at 25% with 32,768
# tokens keeps 150 MB and converts ~20% faster.
REPLAY_BYTES = 2 * 1024**3


def calibration_tokens(source: Source, calibration: Calibration) -> tuple[torch.Tensor, list[str]]:
    """[num_sequences, seq_len] token ids packed from the calibration texts (read and tokenized only as
    far as `max_tokens` needs), and the texts' names."""
    files = calibration.files
    names = list(files) if files else [f"vllm_transmla/data/{DEFAULT_CALIBRATION}"]
    try:
        tokenizer = source.tokenizer()
    except Exception as err:  # noqa: BLE001  (whatever transformers raises, the tokenizer files are the cause)
        raise TransMLAError(f"cannot load the tokenizer of {source.path} ({str(err).splitlines()[0]}): "
                            f"compressed conversion tokenizes calibration text; add the tokenizer files") from None
    if files:
        texts = iter_documents(files, "calibration file", "--calib")
    else:
        texts = iter([resources.files("vllm_transmla.data").joinpath(DEFAULT_CALIBRATION).read_text()])
    ids: list[int] = []
    for text in texts:
        if text.strip():
            ids += tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) >= max(calibration.max_tokens, calibration.seq_len):
            break
    seq_len = calibration.seq_len
    if len(ids) < seq_len:
        raise TransMLAError(f"calibration text has {len(ids)} tokens, fewer than one sequence of {seq_len}: "
                            f"pass --calib with more text or a smaller --calib-seq-len")
    if calibration.max_tokens < seq_len:
        raise TransMLAError(f"--calib-tokens {calibration.max_tokens} is less than one sequence of --calib-seq-len "
                            f"{seq_len}: raise it or shorten the sequences")
    n = min(len(ids), calibration.max_tokens) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len), names


class LayerByLayer:
    """Runs the source model's decoder layers one at a time over calibration hidden states."""

    def __init__(self, source: Source, tokens: torch.Tensor, batch_size: int = 2):
        spec = source.family.calibration
        module = importlib.import_module(spec["module"])
        self.layer_cls = getattr(module, spec["decoder_layer"])
        self.source, self.batch_size = source, batch_size
        self.config = source.config
        self.config._attn_implementation = "sdpa"
        embed = source.weights.get("model.embed_tokens.weight").float()
        self.hidden = embed[tokens]  # [num_sequences, seq_len, hidden]
        del embed
        rotary = getattr(module, spec["rotary_embedding"])(config=self.config)
        positions = torch.arange(tokens.shape[1])[None]
        self.cos_sin = rotary(self.hidden[:1], positions)
        # cos and sin come scaled by this (YaRN's attention factor; 1 otherwise): logits carry its square
        self.attention_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self._module, self._module_index = None, None

    def module(self, layer: int):
        """The original decoder layer `layer` (fp32), built once and kept until the next layer."""
        if self._module is None or self._module_index != layer:
            self._module = None  # drop the previous layer before building the next
            # Built on the meta device and given the loaded tensors themselves (assign): one copy of the
            # layer in memory, not an initialised module plus the state dict.
            with torch.device("meta"):
                module = self.layer_cls(self.config, layer).eval()
            missing, unexpected = module.load_state_dict(self._layer_state(layer), strict=False, assign=True)
            if missing or unexpected:
                raise TransMLAError(f"layer {layer}: cannot run the original layer for calibration "
                                    f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
            self._module, self._module_index = module, layer
        return self._module

    def attention_inputs(self, layer: int, sequences: int | None = None) -> torch.Tensor:
        """What the attention of `layer` reads: input_layernorm(hidden) [num_sequences, seq_len, hidden]."""
        norm = self.module(layer).input_layernorm
        hidden = self.hidden if sequences is None else self.hidden[:sequences]
        with torch.no_grad():
            return torch.cat([norm(chunk) for chunk in hidden.split(self.batch_size)])

    def source_attention_outputs(self, layer: int, inputs: torch.Tensor) -> torch.Tensor:
        """The source attention's output (after its o_proj) on `inputs` [num_sequences, seq_len, hidden]."""
        attention = self.module(layer).self_attn
        with torch.no_grad():
            return torch.cat([attention(x, position_embeddings=self.position_embeddings(len(x)), attention_mask=None)[0]
                              for x in inputs.split(self.batch_size)])

    def stats(self, layer: int, input_cov: bool = False) -> LayerStats:
        """Keys and values (pre-rope, with bias; keys and queries after their per-head norms where the family
        has them) of `layer` over all calibration tokens, their float64 second moments, the queries' per head,
        and with `input_cov` the attention input's [hidden, hidden].
        Streams over the hidden states a chunk of sequences at a time, so only the keys and values
        [N, n*d] are held in full."""
        fam, w, gqa = self.source.family, self.source.weights, self.source.gqa
        norm = self.module(layer).input_layernorm
        attention = self.module(layer).self_attn

        def heads(x, norm: str):  # statistics of what the latent is built from: the normalized heads (head_norm.py)
            return normalize_heads(x, getattr(attention, norm), gqa.head_dim) if gqa.head_norms else x

        def projection(role):
            base = fam.attn_name(role, layer)
            return w.get(base + ".weight").float(), (w.get(base + ".bias").float() if base + ".bias" in w else None)

        def apply(x, weight_bias):
            out = x @ weight_bias[0].T
            return out + weight_bias[1] if weight_bias[1] is not None else out

        q_proj, k_proj, v_proj = projection("q_proj"), projection("k_proj"), projection("v_proj")
        tokens = self.hidden.shape[0] * self.hidden.shape[1]
        keys, values = torch.empty(tokens, gqa.kv_width), torch.empty(tokens, gqa.kv_width)
        start = 0
        key_cov = torch.zeros(gqa.kv_width, gqa.kv_width, dtype=torch.float64)
        query_cov = torch.zeros(gqa.num_heads, gqa.head_dim, gqa.head_dim, dtype=torch.float64)
        hidden = self.hidden.shape[-1]
        x_cov = torch.zeros(hidden, hidden, dtype=torch.float64) if input_cov else None
        with torch.no_grad():
            for chunk in self.hidden.split(self.batch_size):
                x = norm(chunk).reshape(-1, chunk.shape[-1])
                k = heads(apply(x, k_proj), "k_norm")
                keys[start:start + len(x)] = k
                values[start:start + len(x)] = apply(x, v_proj)
                start += len(x)
                key_cov += k.double().T @ k.double()
                q = heads(apply(x, q_proj), "q_norm").double().view(-1, gqa.num_heads, gqa.head_dim)
                query_cov += torch.einsum("nhd,nhe->hde", q, q)
                if x_cov is not None:
                    x_cov += x.double().T @ x.double()
        return LayerStats(key_cov=key_cov, keys=keys, values=values, query_cov=query_cov, input_cov=x_cov)

    def value_refit_moments(self, layer: int, attention, cos_sin,
                            keep: bool = False) -> tuple[torch.Tensor, torch.Tensor, list | None]:
        """For refit.py: per head, sum z z^T [H, R, R] and sum o z^T [H, d, R] over the calibration tokens,
        z the converted `attention`'s (an hf MLAAttention) attention-weighted latent and o the source
        attention's output (its o_proj input) on the same inputs; cos_sin: `attention`'s rope tables.
        With `keep`, also the (z, o) of every chunk of sequences when they fit in REPLAY_BYTES (else None):
        z does not depend on the value rows the refit changes, so the output refit and the next pass
        (`ReplayAttention`) need not compute it again."""
        gqa = self.source.gqa
        rank = attention.kv_lora_rank
        zz = torch.zeros(gqa.num_heads, rank, rank, dtype=torch.float64)
        oz = torch.zeros(gqa.num_heads, gqa.head_dim, rank, dtype=torch.float64)
        tokens = self.hidden.shape[0] * self.hidden.shape[1]
        fits = tokens * gqa.num_heads * (rank + gqa.head_dim) * 4 <= REPLAY_BYTES
        kept = [] if keep and fits else None
        for z, o in self._latents_and_source_outputs(layer, attention, cos_sin):
            chunk_zz, chunk_oz = refit_moments(z, o)
            zz += chunk_zz
            oz += chunk_oz
            if kept is not None:
                kept.append((z, o))
        return zz, oz, kept

    def output_refit_moments(self, layer: int, attention, cos_sin, kept: list | None) -> tuple[torch.Tensor, ...]:
        """For refit.py's output refit: sum v v^T and sum o v^T [H d, H d] over the calibration tokens, v the
        converted `attention`'s per-head outputs (its value rows as they are now) and o the source's; from
        `kept` (value_refit_moments'), or computed again when it is None."""
        pairs = kept if kept is not None else self._latents_and_source_outputs(layer, attention, cos_sin)
        n = self.source.gqa.num_heads * self.source.gqa.head_dim
        vv = torch.zeros(n, n, dtype=torch.float64)
        ov = torch.zeros(n, n, dtype=torch.float64)
        with torch.no_grad():
            for z, o in pairs:
                chunk_vv, chunk_ov = output_moments(attention.values_from_latent(z), o)
                vv += chunk_vv
                ov += chunk_ov
        return vv, ov

    def _latents_and_source_outputs(self, layer: int, attention, cos_sin):
        """Per chunk of sequences: z [B, T, H, R] (`attention`'s attention-weighted latent) and o [B, T, H, d]
        (the source attention's per-head output, its o_proj input) on the same inputs."""
        gqa = self.source.gqa
        source_attention = self.module(layer).self_attn
        captured = []
        hook = source_attention.o_proj.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
        try:
            with torch.no_grad():
                for chunk in self.hidden.split(self.batch_size):
                    x = self.module(layer).input_layernorm(chunk)
                    captured.clear()
                    source_attention(x, position_embeddings=self.position_embeddings(x.shape[0]), attention_mask=None)
                    o = captured[0].view(*x.shape[:2], gqa.num_heads, gqa.head_dim)
                    tables = tuple(t[:1].expand(x.shape[0], -1, -1) for t in cos_sin)
                    yield attention.latent_attention(*attention.project(x, tables)), o
        finally:
            hook.remove()

    def position_embeddings(self, batch: int):
        return tuple(t.expand(batch, -1, -1) for t in self.cos_sin)

    def advance(self, layer: int, attention: torch.nn.Module | None = None) -> None:
        """Replace the hidden states by the output of `layer`, then drop the layer: the original layer, or
        with `attention` (the converted one) in place of its attention, so that the next layers are
        calibrated on the converted model's own hidden states (sequential calibration, as GPTQ does)."""
        module = self.module(layer)
        if attention is not None:
            module.self_attn = attention
        with torch.no_grad():
            for i in range(0, self.hidden.shape[0], self.batch_size):
                batch = self.hidden[i:i + self.batch_size]
                out = module(batch, attention_mask=None, position_embeddings=self.position_embeddings(batch.shape[0]))
                self.hidden[i:i + self.batch_size] = out[0] if isinstance(out, tuple) else out
        self._module = None

    def _layer_state(self, layer: int) -> dict[str, torch.Tensor]:
        prefix = f"model.layers.{layer}."
        spec = self.source.family.calibration
        state = {}
        for name in self.source.tensor_names():
            if name.startswith(prefix):
                local = name[len(prefix):]
                for old, new in spec.get("rename", {}).items():
                    local = local.replace(old, new)
                state[local] = self.source.weights.get(name).float()
        if spec.get("fused_experts"):
            state = _fuse_experts(state, *spec["fused_experts"])
        return state


def _fuse_experts(state: dict[str, torch.Tensor], gate: str, up: str, down: str) -> dict[str, torch.Tensor]:
    """Per-expert gate / up / down tensors (checkpoint names, e.g. Mixtral's w1 / w3 / w2) -> transformers'
    fused experts.gate_up_proj [E, 2I, H] / down_proj [E, H, I]."""
    names = "|".join(re.escape(n) for n in (gate, up, down))
    pattern = re.compile(rf"^(.*experts)\.(\d+)\.({names})\.weight$")
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    fused = {}
    for name, tensor in state.items():
        m = pattern.match(name)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = tensor
        else:
            fused[name] = tensor
    for base, by_index in experts.items():
        order = sorted(by_index)
        fused[f"{base}.gate_up_proj"] = torch.stack([torch.cat([by_index[e][gate], by_index[e][up]]) for e in order])
        fused[f"{base}.down_proj"] = torch.stack([by_index[e][down] for e in order])
    return fused


class ReplayAttention(torch.nn.Module):
    """Stands in for a converted attention in `LayerByLayer.advance`: returns o_proj(z W_UV) per head from the
    attention-weighted latents z [B, T, H, R] the value refit computed, chunk by chunk in the same order."""

    def __init__(self, latents: list[torch.Tensor], attention):
        super().__init__()
        self.latents, self.attention = list(latents), attention

    def forward(self, hidden_states, **_unused):
        z = self.latents.pop(0)
        if z.shape[:2] != hidden_states.shape[:2]:
            raise RuntimeError("replayed latents out of step with the hidden states")
        return self.attention.o_proj(self.attention.values_from_latent(z).flatten(2)), None
