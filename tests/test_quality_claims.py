"""The quality benchmark's claims, checked on the reference model at two cache sizes: the baselines are
implemented right (at full budget they are the original model) and ours is below the MHA2MLA-style
baseline (best of its swept rope widths) at 12.5% and 50% of the cache with `--freqfold auto` (the layout
chosen by measured attention error; it picks `select` here). The default layout, FreqFold 2 * head_dim / D,
is set by the real model (benchmarks/quality/results_smollm2.json); on this toy model it loses to
`select` at 12.5% (91.8 against 79.8). The full sweep is benchmarks/quality/run.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))

from baselines import (  # noqa: E402
    activation_aware_low_rank,
    apply_mha2mla,
    apply_per_head_svd,
    calibration_batch,
    low_rank,
)

from vllm_transmla.convert.pipeline import convert  # noqa: E402
from vllm_transmla.demo import heldout_text, reference_model  # noqa: E402
from vllm_transmla.evaluate import perplexity  # noqa: E402

MAX_TOKENS = 4096


def _model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(reference_model(), dtype=torch.float32).eval()


def _ppl(path, model=None):
    return perplexity(path, heldout_text(), max_tokens=MAX_TOKENS, model=model)["perplexity"]


def test_baselines_at_full_budget_are_the_original():
    original = _ppl(reference_model())
    full = 2 * 2 * 32  # 2 KV heads of 32: K and V
    calib = calibration_batch(reference_model(), sequences=4)
    for aware in (False, True):
        svd = _model()
        apply_per_head_svd(svd, full, calib if aware else None)
        mha2mla = _model()
        apply_mha2mla(mha2mla, full, 16, calib, activation_aware=aware)  # every pair roped
        assert abs(_ppl(reference_model(), svd) - original) < 1e-3
        assert abs(_ppl(reference_model(), mha2mla) - original) < 1e-3
    # and compression is not free: a quarter of the budget costs perplexity
    quarter = _model()
    apply_mha2mla(quarter, full // 4, 4, calibration_batch(reference_model(), sequences=4))
    assert _ppl(reference_model(), quarter) > 1.2 * original


def test_activation_aware_truncation_is_the_best_on_its_inputs():
    """W_r minimises |(W - W_r) X|: it equals the truncated SVD of W X mapped back, and beats the plain SVD."""
    torch.manual_seed(0)
    w = torch.randn(12, 20, dtype=torch.float64)
    x = torch.randn(20, 500, dtype=torch.float64) * torch.logspace(-2, 1, 20, dtype=torch.float64)[:, None]
    aware = activation_aware_low_rank(w, 4, x @ x.T)
    u, _, _ = torch.linalg.svd(w @ x, full_matrices=False)
    torch.testing.assert_close(aware, u[:, :4] @ u[:, :4].T @ w)
    assert ((w - aware) @ x).norm() < 0.9 * ((w - low_rank(w, 4)) @ x).norm()


@pytest.mark.parametrize("fraction", [0.125, 0.5])
def test_ours_below_mha2mla(fraction, tmp_path):
    budget = int(fraction * 128)
    calib = calibration_batch(reference_model())
    baseline = []
    for pairs in (1, 2, 4, 8, 16):
        if budget - 4 * pairs >= 1:
            m = _model()
            apply_mha2mla(m, budget, pairs, calib)
            baseline.append(_ppl(reference_model(), m))
    ours = _ppl(convert(reference_model(), tmp_path / "ours", kv_ratio=fraction, freqfold="auto", progress=False))
    assert ours < min(baseline), (ours, baseline)
