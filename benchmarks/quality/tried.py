"""Changes to the compressed conversion that were measured on SmolLM2 at 25% of the cache and not kept.

Each variant patches one step of the converter for this process only (the shipped code is unchanged), converts
SmolLM2 with the defaults and the license calibration of `run.py --real`, and prints held-out perplexity on
both texts (JSON lines). The README's "Tried and not kept" gives the numbers.

* values-averaged-mean / -mean-raw-ratio / -per-head / -mix: the joint PCA over attention-averaged values
  z_h(m) = sum_n p_h(m, n) v(n) (the source's attention weights) instead of the per-token values - the
  exact objective of a value error given the attention weights. `mean`: z averaged over the query heads of
  each KV head, K/V balance from z; `mean-raw-ratio`: the same, balance from the per-token values;
  `per-head`: every query head's z its own sample; `mix`: half per-head z, half per-token values (by trace);
* keys-centred: the NoPE keys centred before the PCA (a constant key error shifts every logit of a query
  equally, which the softmax ignores);
* nope-scale S: the converted model's NoPE query rows multiplied by S (is the attention too flat after
  the truncation?), measured on the first 4,096 tokens of each text;
* refine-original-targets / refine-drift-targets: `--refine-epochs 4` whose targets are the source
  attention's output on the original model's hidden states rather than on the converted model's (inputs
  unchanged: asymmetric calibration, as GPTAQ does); `drift` also subtracts the residual drift h - h_orig;
* refine-fisher / refine-fisher-per-token: `--refine-epochs 4` with the squared error of each attention
  output dim weighted by the diagonal empirical Fisher of the original model's calibration loss with
  respect to that output (squared gradients, averaged over tokens, or per token);
* refine-settings LR BATCH EPOCHS: `--refine-epochs EPOCHS` at learning rate LR, BATCH sequences a step;
* refine-layer-output: `--refine-epochs 4` with the decoder layer's output as the objective instead of the
  attention's (the converted attention trained through the source layer's MLP against the source layer's
  output on the same hidden states).

    python benchmarks/quality/tried.py values-averaged-mean     # ~4 min each on 2 cores
    python benchmarks/quality/tried.py nope-scale 1.0 1.1 1.25
    python benchmarks/quality/tried.py refine-layer-output      # ~8 min
    python benchmarks/quality/tried.py refine-settings 1e-4 1 4  # ~10 min
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import DATA, perplexities  # noqa: E402

import vllm_transmla.convert.calibration as calibration  # noqa: E402
import vllm_transmla.convert.compress as compress  # noqa: E402
import vllm_transmla.convert.layers as layers  # noqa: E402

TEXTS = [str(DATA / "kjv_heldout.txt"), str(DATA / "devils_dictionary_heldout.txt")]
AVERAGED = {"values-averaged-mean", "values-averaged-mean-raw-ratio", "values-averaged-per-head",
            "values-averaged-mix"}


def averaged_values(runner, layer: int, values: torch.Tensor) -> torch.Tensor:
    """[G, N, n*d]: for the i-th query head of every KV head group (G = heads per group), the values averaged
    with that head's source attention weights (Llama layout, no per-head norms)."""
    fam, w, gqa = runner.source.family, runner.source.weights, runner.source.gqa
    module = importlib.import_module(fam.calibration["module"])
    norm = runner.module(layer).input_layernorm
    q_w = w.get(fam.attn_name("q_proj", layer) + ".weight").float()
    k_w = w.get(fam.attn_name("k_proj", layer) + ".weight").float()
    heads, n, d = gqa.num_heads, gqa.num_kv_heads, gqa.head_dim
    group = heads // n
    seq = runner.hidden.shape[1]
    out = torch.empty(group, *values.shape)
    cos, sin = runner.cos_sin
    mask = torch.full((seq, seq), float("-inf")).triu(1)
    start = 0
    with torch.no_grad():
        for chunk in runner.hidden.split(runner.batch_size):
            b = chunk.shape[0]
            x = norm(chunk)
            q = (x @ q_w.T).view(b, seq, heads, d).transpose(1, 2)
            k = (x @ k_w.T).view(b, seq, n, d).transpose(1, 2)
            q, k = module.apply_rotary_pos_emb(q, k, cos.expand(b, -1, -1), sin.expand(b, -1, -1))
            p = torch.softmax(q @ k.repeat_interleave(group, dim=1).transpose(-1, -2) * d ** -0.5 + mask, dim=-1)
            v = values[start:start + b * seq].view(b, seq, n, d)
            z = torch.zeros(group, b, seq, n, d)
            for h in range(heads):
                g, i = divmod(h, group)
                z[i, :, :, g] = p[:, h] @ v[:, :, g]
            out[:, start:start + b * seq] = z.reshape(group, b * seq, n * d)
            start += b * seq
    return out


def patch(variant: str) -> None:
    original_stats, original_analyse = calibration.LayerByLayer.stats, compress.analyse_layer

    def stats(self, layer, input_cov=False):
        st = original_stats(self, layer, input_cov)
        st.averaged = averaged_values(self, layer, st.values)
        return st

    def analyse(gqa, rope_dim, freqfold, st, o_weight=None):
        if variant == "values-averaged-mean":
            raw, st.values = st.values, st.averaged.mean(0)
            basis = original_analyse(gqa, rope_dim, freqfold, st, o_weight)
            st.values = raw
            return basis
        basis = original_analyse(gqa, rope_dim, freqfold, st, o_weight)
        f64 = torch.float64
        keys = st.keys.to(f64) @ (basis.rotation[rope_dim:].T @ basis.key_weight)
        if variant == "keys-centred":
            keys = keys - keys.mean(0)
        if variant == "values-averaged-mean-raw-ratio":
            samples = [st.averaged.mean(0)]
        elif variant in ("values-averaged-per-head", "values-averaged-mix"):
            samples = list(st.averaged)
        else:  # keys-centred
            samples = [st.values]

        def covariance(value_samples):
            cov = 0
            for v in value_samples:
                joint = torch.cat([keys / basis.ratio, v.to(f64) @ basis.value_weight], dim=-1)
                cov = cov + joint.T @ joint / len(value_samples)
            return cov

        cov = covariance(samples)
        if variant == "values-averaged-mix":
            raw = covariance([st.values])
            cov = 0.5 * cov * raw.trace() / cov.trace() + 0.5 * raw
        values, vectors = torch.linalg.eigh(cov)
        order = values.argsort(descending=True)
        return compress.LayerBasis(basis.plan, basis.rotation, basis.pair_freqs, basis.key_weight, basis.value_weight,
                                   basis.ratio, values[order].clamp_min(0), vectors[:, order])

    if variant in AVERAGED:
        calibration.LayerByLayer.stats = stats
    compress.analyse_layer = analyse


class ThroughLayer(torch.nn.Module):
    """hidden [B, T, hidden] -> the decoder layer's update (output - hidden) with `attention` in place of its
    own; the layer's norms and MLP are not registered, so refinement trains the attention alone."""

    def __init__(self, attention, decoder_layer):
        super().__init__()
        self.attention = attention
        self.__dict__["decoder_layer"] = decoder_layer

    def forward(self, hidden, **_unused):
        layer = self.decoder_layer
        mid = hidden + self.attention(layer.input_layernorm(hidden))[0]
        return mid + layer.mlp(layer.post_attention_layernorm(mid)) - hidden, None


def refine_layer_output(self, layer: int, converted, kept, dtype) -> dict:
    from vllm_transmla.convert.local_refine import refine_attention, refined_parameters

    runner = self.runner
    module = runner.module(layer)  # still the source's attention: the targets
    for p in module.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        outputs = []
        for h in runner.hidden.split(runner.batch_size):
            out = module(h, attention_mask=None, position_embeddings=runner.position_embeddings(len(h)))
            outputs.append((out[0] if isinstance(out, tuple) else out) - h)
    inputs = runner.hidden.clone()
    result = refine_attention(ThroughLayer(converted, module), inputs, torch.cat(outputs), self.plan.refine_epochs,
                              seed=layer)
    self.refine_errors.append((result.before, result.after))
    return {name: p.detach().to(dtype) for name, p in refined_parameters(converted.attention).items()}


def nope_scales(dst: Path, scales: list[float]) -> None:
    from transformers import AutoModelForCausalLM

    cfg = json.loads((dst / "config.json").read_text())
    d, rope, heads = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["num_attention_heads"]
    for s in scales:
        model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.view(heads, d + rope, -1)[:, :d] *= s
        print(json.dumps({"variant": "nope-scale", "scale": s,
                          "perplexity": perplexities(dst, TEXTS, model, max_tokens=4096)}), flush=True)


def track_original_hidden() -> None:
    """LayerByLayer also carries the original model's hidden states [N, T, hidden] beside the converted ones:
    each advance first runs the source layer (its own attention) on them."""
    init, advance = calibration.LayerByLayer.__init__, calibration.LayerByLayer.advance

    def patched_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.original_hidden = self.hidden.clone()

    def patched_advance(self, layer, attention=None):
        module = self.module(layer)
        with torch.no_grad():
            for i in range(0, self.original_hidden.shape[0], self.batch_size):
                batch = self.original_hidden[i:i + self.batch_size]
                out = module(batch, attention_mask=None, position_embeddings=self.position_embeddings(len(batch)))
                self.original_hidden[i:i + self.batch_size] = out[0] if isinstance(out, tuple) else out
        advance(self, layer, attention)

    calibration.LayerByLayer.__init__, calibration.LayerByLayer.advance = patched_init, patched_advance


def refine_original_targets(drift: bool):
    """_refine whose targets are the source attention's output on the original model's hidden states (inputs
    stay the converted model's: asymmetric, as GPTAQ calibrates quantised layers); with `drift` also minus
    the residual drift h - h_orig, so that the residual stream after the attention matches the original's."""
    from vllm_transmla.convert.local_refine import refine_attention, refined_parameters

    def _refine(self, layer: int, converted, kept, dtype) -> dict:
        runner = self.runner
        inputs = runner.attention_inputs(layer)
        norm = runner.module(layer).input_layernorm
        with torch.no_grad():
            original_inputs = torch.cat([norm(h) for h in runner.original_hidden.split(runner.batch_size)])
        targets = runner.source_attention_outputs(layer, original_inputs)
        if drift:
            targets = targets + runner.original_hidden - runner.hidden
        result = refine_attention(converted, inputs, targets, self.plan.refine_epochs, seed=layer)
        self.refine_errors.append((result.before, result.after))
        return {name: p.detach().to(dtype) for name, p in refined_parameters(converted.attention).items()}

    return _refine


def attention_output_fisher(model_path, tokens: torch.Tensor, per_token: bool) -> list[torch.Tensor]:
    """Per layer, the squared gradient of the original model's next-token loss on the calibration `tokens`
    [N, T] with respect to the attention's output: [hidden] averaged over the tokens, or with `per_token`
    [N, T, hidden] (float16); each scaled to mean 1."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    layers_ = model.model.layers
    grads: list[list[torch.Tensor]] = [[] for _ in layers_]

    def hook(index):
        def capture(_module, _args, output):
            output[0].register_hook(lambda g: grads[index].append(g.detach().pow(2)))
        return capture

    handles = [layer.self_attn.register_forward_hook(hook(i)) for i, layer in enumerate(layers_)]
    try:
        for batch in tokens.split(2):
            embeds = model.model.embed_tokens(batch).requires_grad_(True)
            logits = model(inputs_embeds=embeds).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    out = []
    for g in grads:
        g = torch.cat(g)  # [N, T, hidden]
        g = g / g.mean()
        out.append(g.half() if per_token else g.mean(dim=(0, 1)))
    return out


class Weighted(torch.nn.Module):
    """attention(x) * sqrt(w): the weights ride in the input's last `hidden` dims (per token or broadcast)."""

    def __init__(self, attention, hidden: int):
        super().__init__()
        self.attention, self.hidden = attention, hidden

    def forward(self, x):
        x, w = x[..., :self.hidden], x[..., self.hidden:]
        return self.attention(x)[0] * w, None


def refine_fisher(per_token: bool):
    """_refine whose error is weighted by the downstream loss' diagonal Fisher of the attention output."""
    from vllm_transmla.convert.local_refine import refine_attention, refined_parameters

    init = layers.CompressedLayers.__init__

    def patched_init(self, source, plan, tokens):
        init(self, source, plan, tokens)
        self.fisher = attention_output_fisher(source.path, tokens, per_token)

    def _refine(self, layer: int, converted, kept, dtype) -> dict:
        runner = self.runner
        inputs = runner.attention_inputs(layer)
        with torch.no_grad():
            o_proj = runner.module(layer).self_attn.o_proj
            targets = torch.cat([o_proj(o.flatten(2)) for _, o in kept])
        root = self.fisher[layer].float().sqrt().expand_as(targets)
        weighted = Weighted(converted, inputs.shape[-1])
        result = refine_attention(weighted, torch.cat([inputs, root], dim=-1), targets * root,
                                  self.plan.refine_epochs, seed=layer)
        self.refine_errors.append((result.before, result.after))
        return {name: p.detach().to(dtype) for name, p in refined_parameters(converted.attention).items()}

    layers.CompressedLayers.__init__, layers.CompressedLayers._refine = patched_init, _refine


def main() -> None:
    from vllm_transmla.convert.pipeline import convert
    from vllm_transmla.real_model import LICENSE_TEXTS, fetch_smollm2

    variant, scales = sys.argv[1], [float(a) for a in sys.argv[2:]]
    options = {}
    if variant == "refine-layer-output":
        layers.CompressedLayers._refine = refine_layer_output
        options["refine_epochs"] = 4
    elif variant == "refine-settings":  # lr, sequences per step, epochs
        import vllm_transmla.convert.local_refine as local_refine

        local_refine.refine_attention.__defaults__ = (scales[0], int(scales[1]), 0)
        options["refine_epochs"] = int(scales[2])
    elif variant in ("refine-fisher", "refine-fisher-per-token"):
        refine_fisher(per_token=variant == "refine-fisher-per-token")
        options["refine_epochs"] = 4
    elif variant in ("refine-original-targets", "refine-drift-targets"):
        track_original_hidden()
        layers.CompressedLayers._refine = refine_original_targets(drift=variant == "refine-drift-targets")
        options["refine_epochs"] = 4
    elif variant != "nope-scale":
        patch(variant)
    with tempfile.TemporaryDirectory() as tmp:
        dst = convert(str(fetch_smollm2().hf), Path(tmp) / "mla", kv_ratio=0.25, calib=list(LICENSE_TEXTS),
                      progress=False, **options)
        if variant == "nope-scale":
            nope_scales(dst, scales or [1.0, 1.1, 1.25])
        else:
            print(json.dumps({"variant": variant, "args": sys.argv[2:], "perplexity": perplexities(dst, TEXTS)}),
                  flush=True)


if __name__ == "__main__":
    main()
