"""Gradient refinement of each converted attention (`--refine-epochs`, convert/local_refine.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from vllm_transmla.cli import main as cli_main
from vllm_transmla.convert import calibration
from vllm_transmla.convert.local_refine import refine_attention
from vllm_transmla.convert.pipeline import convert
from vllm_transmla.errors import TransMLAError
from vllm_transmla.evaluate import perplexity

REFERENCE = "vllm_transmla/data/reference_model"
HELD_OUT = "vllm_transmla/data/kjv_heldout.txt"


class LowRankAttention(torch.nn.Module):
    """A stand-in attention: x -> x A^T B^T (rank r), called as attention(x) -> (y, None)."""

    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.a = torch.nn.Linear(hidden, rank, bias=False)
        self.b = torch.nn.Linear(rank, hidden, bias=False)
        self.norm = torch.nn.LayerNorm(hidden)  # 1-D weights: not trained

    def forward(self, x, **_unused):
        return self.b(self.a(x)), None


def test_refinement_lowers_the_error_toward_the_best_low_rank_fit_and_keeps_the_best():
    """On a problem with a known optimum (a rank-r map; the truncated SVD of the targets), refinement from a poor
    start lowers the error well below where it started and not below the optimum; 1-D weights stay; with a
    learning rate that diverges the weights seen at the start (the best) are kept, never worse."""
    torch.manual_seed(0)
    hidden, rank = 16, 4
    inputs = torch.randn(8, 32, hidden)
    target_map = torch.randn(hidden, hidden) / hidden**0.5
    targets = inputs @ target_map.T
    # the targets lie in the span of the inputs, so the best rank-r map gives their truncated SVD (Eckart-Young)
    singular = torch.linalg.svdvals(targets.reshape(-1, hidden))
    optimum = float(singular[rank:].pow(2).sum() / singular.pow(2).sum())
    attention = LowRankAttention(hidden, rank)
    norm_before = attention.norm.weight.clone()
    result = refine_attention(attention, inputs, targets, epochs=60, lr=3e-2)
    assert result.after < 0.7 * result.before, result
    assert optimum - 1e-4 <= result.after < 1.5 * optimum, (result, optimum)
    assert torch.equal(attention.norm.weight, norm_before)
    start = [p.clone() for p in (attention.a.weight, attention.b.weight)]
    diverged = refine_attention(attention, inputs, targets, epochs=2, lr=1e3)
    assert diverged.after == diverged.before
    assert all(torch.equal(p, q) for p, q in zip(start, (attention.a.weight, attention.b.weight)))


def test_refined_conversion_writes_the_trained_weights_and_lowers_held_out_perplexity(tmp_path, capsys, monkeypatch):
    """On the reference model at 25% of the cache, `refine_epochs` lowers every layer's calibration error
    (recorded in the provenance), changes the written projections, and the written checkpoint has a lower
    held-out perplexity than the closed form's; the targets taken from the value refit's kept head outputs
    give the same weights as the source attention run again; exact mode (through the CLI) and negative epochs
    are refused."""
    plain = convert(REFERENCE, tmp_path / "plain", kv_ratio=0.25, progress=False)
    refined = convert(REFERENCE, tmp_path / "refined", kv_ratio=0.25, refine_epochs=3, progress=False)
    provenance = json.loads((refined / "config.json").read_text())["transmla"]
    assert provenance["refine_epochs"] == 3
    errors = provenance["refine_error"]
    assert len(errors["before"]) == len(errors["after"]) == 4  # the reference model's layers
    assert all(a < b for a, b in zip(errors["after"], errors["before"])), errors
    assert "refine_epochs" not in json.loads((plain / "config.json").read_text())["transmla"]
    plain_w, refined_w = (load_file(next(d.glob("*.safetensors"))) for d in (plain, refined))
    assert plain_w.keys() == refined_w.keys()
    for name in ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
        key = f"model.layers.1.self_attn.{name}.weight"
        assert refined_w[key].dtype == plain_w[key].dtype and not torch.equal(refined_w[key], plain_w[key]), key
    monkeypatch.setattr(calibration, "REPLAY_BYTES", 0)  # the targets from the source attention, not the replay
    recomputed = load_file(next(convert(REFERENCE, tmp_path / "recomputed", kv_ratio=0.25, refine_epochs=3,
                                        progress=False).glob("*.safetensors")))
    for name, tensor in refined_w.items():
        torch.testing.assert_close(recomputed[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    ppl = {d.name: perplexity(d, HELD_OUT, max_tokens=4096)["perplexity"] for d in (plain, refined)}
    assert ppl["refined"] < ppl["plain"], ppl
    AutoModelForCausalLM.from_pretrained(refined)  # loads as an ordinary converted checkpoint
    assert cli_main(["convert", REFERENCE, str(tmp_path / "exact"), "--quiet", "--refine-epochs", "2"]) == 2
    assert "--refine-epochs applies to compressed conversions" in capsys.readouterr().err
    assert not (tmp_path / "exact").exists()
    with pytest.raises(TransMLAError, match="--refine-epochs -1"):
        convert(REFERENCE, tmp_path / "bad", kv_ratio=0.25, refine_epochs=-1, progress=False)
