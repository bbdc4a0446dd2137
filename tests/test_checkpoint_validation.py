"""A broken converted checkpoint is refused by our validation - by `transmla check` and by the vLLM
plugin before vLLM builds anything - with one line naming the problem and the fix."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_transmla.cli import main as cli_main
from vllm_transmla.convert.pipeline import convert
from vllm_transmla.errors import TransMLAError
from vllm_transmla.validate import validate_converted_checkpoint


@pytest.fixture(scope="module")
def converted(tiny_sources, tmp_path_factory) -> Path:
    """A compressed conversion (latent 32 + rope 32) of the tiny llama3-rope model."""
    return convert(tiny_sources["llama-rope3"], tmp_path_factory.mktemp("valid") / "mla", kv_ratio=0.5,
                   progress=False, calib_seq_len=64)


def _edit_config(path: Path, drop=(), **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    for key in drop:
        cfg.pop(key)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensor(path: Path, name: str, new) -> None:
    """Rewrite the shard holding `name` with `new(tensor)` in its place (None drops it, index included)."""
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = path / index["weight_map"][name]
    tensors = load_file(shard)
    replacement = new(tensors.pop(name))
    if replacement is None:
        del index["weight_map"][name]
        index_path.write_text(json.dumps(index))
    else:
        tensors[name] = replacement
    save_file(tensors, str(shard), metadata={"format": "pt"})


KV_B = "model.layers.1.self_attn.kv_b_proj.weight"
CASES = {
    "missing attention tensor": (lambda p: _edit_tensor(p, KV_B, lambda t: None),
                                 r"no tensor model\.layers\.1\.self_attn\.kv_b_proj\.weight.*incomplete"),
    "mis-shaped attention tensor": (lambda p: _edit_tensor(p, KV_B, lambda t: t[:, :-1].clone()),
                                    r"kv_b_proj\.weight .* has shape \[\d+, 31\] but config\.json implies \[\d+, 32\]"),
    "missing lm_head": (lambda p: _edit_tensor(p, "lm_head.weight", lambda t: None), r"no tensor lm_head\.weight"),
    "config without kv_lora_rank": (lambda p: _edit_config(p, drop=["kv_lora_rank"]),
                                    r"lacks kv_lora_rank.*default would build the wrong model"),
    "config without qk_rope_head_dim": (lambda p: _edit_config(p, drop=["qk_rope_head_dim"]),
                                        r"lacks qk_rope_head_dim"),
    "config rank contradicts tensors": (lambda p: _edit_config(p, kv_lora_rank=48),
                                        r"has shape .* but config\.json implies .*different conversions"),
    "unknown model_type": (lambda p: _edit_config(p, model_type="llama_mla_v2"),
                           r"model_type 'llama_mla_v2'.*does not serve.*expects model_type 'llama_mla'"),
    "odd rope dim in config": (lambda p: _edit_config(p, qk_rope_head_dim=31), r"qk_rope_head_dim=31.*even"),
    "per-layer ranks of the wrong length": (lambda p: _edit_config(p, kv_lora_ranks=[32]),
                                            r"kv_lora_ranks \[32\] for 2 layers"),
    "config not JSON": (lambda p: (p / "config.json").write_text("{oops"), r"not valid JSON"),
    "truncated shard": (lambda p: os.truncate(sorted(p.glob("*.safetensors"))[0], 100), r"truncated"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_checkpoint_is_refused(case, converted, tmp_path, capsys):
    broken = shutil.copytree(converted, tmp_path / "broken")
    validate_converted_checkpoint(broken)  # the intact copy passes
    break_it, pattern = CASES[case]
    break_it(broken)
    with pytest.raises(TransMLAError) as err:
        validate_converted_checkpoint(broken)
    assert re.search(pattern, str(err.value)), err.value
    assert cli_main(["check", str(broken)]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("transmla: error: ") and "\n" not in line, line


def test_valid_checkpoints_pass(converted, capsys):
    assert cli_main(["check", str(converted)]) == 0
    assert "valid converted checkpoint" in capsys.readouterr().out


VLLM_CASES = {
    "mis-shaped tensor": (lambda p: _edit_tensor(p, KV_B, lambda t: torch.zeros(t.shape[0], t.shape[1] + 1)),
                          r"kv_b_proj\.weight .* has shape \[\d+, 33\] but config\.json implies \[\d+, 32\]"),
    "unknown model_type": (lambda p: _edit_config(p, model_type="llama_mla_v2"),
                           r"model_type 'llama_mla_v2'.*does not serve"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(VLLM_CASES))
def test_vllm_plugin_refuses_before_building_the_model(case, converted, tmp_path):
    """vLLM with our plugin stops at config parsing with our message: no model is built, no weight read."""
    from reference import run_vllm

    broken = shutil.copytree(converted, tmp_path / "broken")
    break_it, pattern = VLLM_CASES[case]
    break_it(broken)
    with pytest.raises(RuntimeError) as err:
        run_vllm({"model": str(broken), "prompts": [[1, 2, 3]], "max_tokens": 2})
    log = str(err.value)
    assert re.search(pattern, log), log
    assert "Loading weights" not in log and "Loading safetensors" not in log
