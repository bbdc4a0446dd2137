"""Conversion is reproducible: the same inputs and settings give bit-identical files, whatever the
destination is called."""

from __future__ import annotations

import pytest

from conftest import tree_digest
from vllm_transmla.convert.pipeline import convert


@pytest.mark.parametrize("settings", [{}, {"kv_ratio": 0.5, "calib_seq_len": 64},
                                      {"kv_ratio": 0.25, "freqfold": "auto", "rank_allocation": "measured",
                                       "calib_seq_len": 64}], ids=["exact", "compressed", "per-layer-auto"])
def test_same_inputs_give_identical_files(settings, tiny_sources, tmp_path):
    first = convert(tiny_sources["llama-rope3"], tmp_path / "first", progress=False, **settings)
    second = convert(tiny_sources["llama-rope3"], tmp_path / "second", progress=False, **settings)
    digests = tree_digest(first), tree_digest(second)
    assert digests[0] == digests[1]
    assert any(name.endswith(".safetensors") for name in digests[0])
