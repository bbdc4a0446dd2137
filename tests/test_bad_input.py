"""Bad input: a one-line error naming the problem and the fix; SRC untouched; no DST, no temporaries."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tree_digest
from vllm_transmla.cli import main as cli_main
from vllm_transmla.convert import layers, pipeline
from vllm_transmla.testing.tiny import build_tiny_model


@pytest.fixture
def src(tmp_path):
    return build_tiny_model("llama-rope3", tmp_path / "src", num_hidden_layers=3)


def _edit_config(path: Path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _run_cli_expect_error(src: Path, dst: Path, capsys, *extra) -> str:
    before = tree_digest(src)
    assert cli_main(["convert", str(src), str(dst), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("transmla: error: ") and "\n" not in err, err
    assert tree_digest(src) == before, "the source was modified"
    assert not dst.exists() or extra == (), "a partial destination was left"
    assert not list(dst.parent.glob(f".{dst.name}.transmla-tmp-*")), "a temporary directory was left"
    return err


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("model-*.safetensors"))


CASES = {
    "unsupported architecture": (lambda s: _edit_config(s, architectures=["GPT2LMHeadModel"], model_type="gpt2"),
                                 r"unsupported architecture.*supported are.*LlamaForCausalLM"),
    "qwen3 config, no q/k norms": (lambda s: _edit_config(s, architectures=["Qwen3ForCausalLM"], model_type="qwen3"),
                                   r"q_norm.weight is missing.*incomplete or the config is wrong"),
    "missing shard": (lambda s: _shards(s)[1].unlink(), r"missing shard model-00002.*download the complete"),
    "truncated shard": (lambda s: os.truncate(_shards(s)[0], _shards(s)[0].stat().st_size - 100),
                        r"truncated or corrupt.*re-download"),
    "corrupt header": (lambda s: _shards(s)[0].write_bytes(b"\xff" * 8 + _shards(s)[0].read_bytes()[8:]),
                       r"corrupt or truncated.*re-download"),
    "garbage header json": (lambda s: _shards(s)[0].write_bytes(
        (20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 10), r"corrupt.*unreadable header"),
    "config contradicts weights": (lambda s: _edit_config(s, num_key_value_heads=4),
                                   r"config.json contradicts the weights.*k_proj.*num_key_value_heads=4"),
    "bias flag contradicts weights": (lambda s: _edit_config(s, attention_bias=True),
                                      r"q_proj.bias is absent but the config implies a bias"),
    "too few layers in config": (lambda s: _edit_config(s, num_hidden_layers=2), r"more layers than num_hidden_layers"),
    "too many layers in config": (lambda s: _edit_config(s, num_hidden_layers=4), r"layers.3.*missing"),
    "no config": (lambda s: (s / "config.json").unlink(), r"no config.json"),
    "config not json": (lambda s: (s / "config.json").write_text("{oops"), r"not valid JSON"),
    "only pytorch bin weights": (lambda s: [p.rename(p.with_suffix(".bin")) for p in _shards(s)]
                                 + [(s / "model.safetensors.index.json").unlink()],
                                 r"no safetensors.*safe_serialization"),
    "index lists absent tensor": (lambda s: (s / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {**json.loads((s / "model.safetensors.index.json").read_text())["weight_map"],
                        "model.extra.weight": _shards(s)[0].name}})), r"index and the shards are from different"),
    "unsupported rope type": (lambda s: _edit_config(s, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                              "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}), r"rope.*longrope.*not supported"),
}


def _int_weights(src: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    shard = _shards(src)[0]
    tensors = load_file(shard)
    save_file({k: (v * 100).to(torch.int32) for k, v in tensors.items()}, str(shard), metadata={"format": "pt"})


CASES["integer (quantized) weights"] = (_int_weights, r"dtype I32.*dequantize")
CASES["index not JSON"] = (lambda s: (s / "model.safetensors.index.json").write_text("{not json"),
                           r"model.safetensors.index.json is corrupt.*download it again")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_source(case, src, tmp_path, capsys):
    break_it, pattern = CASES[case]
    break_it(src)
    err = _run_cli_expect_error(src, tmp_path / "out", capsys)
    import re
    assert re.search(pattern, err), err


def test_destination_exists(src, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    err = _run_cli_expect_error(src, dst, capsys, )
    assert "already exists" in err and "--overwrite" in err
    assert (dst / "keep.txt").read_text() == "precious"


def test_overwrite_replaces_only_when_complete(src, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    assert cli_main(["convert", str(src), str(dst), "--quiet", "--overwrite"]) == 0
    assert not (dst / "old.txt").exists() and (dst / "config.json").exists()
    assert not list(tmp_path.glob(".out.transmla-tmp-*"))


def test_destination_inside_source(src, capsys):
    err = _run_cli_expect_error(src, src / "mla", capsys)
    assert "inside the source" in err


def test_interrupt_midway_leaves_nothing(src, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    before = tree_digest(src)
    real = layers.ExactLayers.convert

    def interrupted(self, layer):
        if layer == 2:
            raise KeyboardInterrupt
        return real(self, layer)

    monkeypatch.setattr(layers.ExactLayers, "convert", interrupted)
    assert cli_main(["convert", str(src), str(dst), "--quiet"]) == 130
    assert not dst.exists() and not list(tmp_path.glob(".out.transmla-tmp-*"))
    assert tree_digest(src) == before


def test_disk_full_leaves_nothing(src, tmp_path, monkeypatch, capsys):
    """A full disk (simulated: the shard writer raises ENOSPC) gives a clear error and no DST."""
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline.ShardWriter, "flush", full)
    err = _run_cli_expect_error(src, tmp_path / "out", capsys)
    assert "no space left" in err and "free space" in err


def _spawn_convert(src: Path, dst: Path) -> subprocess.Popen:
    env = {**os.environ, "TRANSMLA_DEBUG_LAYER_DELAY": "1.0"}
    # SIGINT back to its default in the child: a test run started in the background by a non-interactive
    # shell (`cmd &`) inherits SIGINT ignored, and Python then leaves it ignored (no KeyboardInterrupt).
    return subprocess.Popen([sys.executable, "-m", "vllm_transmla.cli", "convert", str(src), str(dst), "--quiet"],
                            env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_temporary(dst: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not list(dst.parent.glob(f".{dst.name}.transmla-tmp-*")):
        assert proc.poll() is None and time.time() < deadline, "conversion ended before it could be interrupted"
        time.sleep(0.05)
    time.sleep(0.3)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_midway_leaves_nothing(sig, src, tmp_path):
    dst = tmp_path / "out"
    before = tree_digest(src)
    proc = _spawn_convert(src, dst)
    _wait_for_temporary(dst, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "was not created" in err
    assert not dst.exists() and not list(tmp_path.glob(".out.transmla-tmp-*"))
    assert tree_digest(src) == before


def test_sigkill_temporary_is_cleaned_next_time(src, tmp_path, capsys):
    dst = tmp_path / "out"
    proc = _spawn_convert(src, dst)
    _wait_for_temporary(dst, proc)
    proc.kill()
    proc.wait()
    assert not dst.exists()
    assert list(tmp_path.glob(".out.transmla-tmp-*"))  # SIGKILL cannot be caught: the temporary stays...
    assert cli_main(["convert", str(src), str(dst), "--quiet"]) == 0
    assert "left by an interrupted conversion" in capsys.readouterr().err  # ...and is reported and removed
    assert not list(tmp_path.glob(".out.transmla-tmp-*")) and (dst / "config.json").exists()
    shutil.rmtree(dst)


# Options out of range: (extra CLI arguments, error pattern). The tiny source has 2 KV heads of 32:
# 128 cached values per token, of which 64 are keys that rotate.
OPTION_CASES = {
    "latent rank above the cache": (["--kv-lora-rank", "500"], r"--kv-lora-rank 500 is out of range.*1\.\.96"),
    "latent rank zero": (["--kv-lora-rank", "0"], r"--kv-lora-rank 0 is out of range"),
    "odd rope dim": (["--qk-rope-dim", "7"], r"--qk-rope-dim 7 must be a positive even number"),
    "rope dim above the rotating keys": (["--qk-rope-dim", "66"], r"above num_kv_heads \* head_dim = 64.*at most 64"),
    "kv ratio above 1": (["--kv-ratio", "1.5"], r"--kv-ratio 1.5 must be in \(0, 1\]"),
    "kv ratio with no room for a latent": (["--kv-ratio", "0.01"], r"leaves no latent"),
    "exact mode with a rank": (["--mode", "exact", "--kv-lora-rank", "32"], r"need --mode compressed"),
    "freqfold not a number": (["--freqfold", "two"], r"--freqfold 'two' must be a whole number"),
    "empty calibration text": (["--kv-ratio", "0.5", "--calib", "{empty}"], r"0 tokens, fewer than one sequence"),
    "too-short calibration text": (["--kv-ratio", "0.5", "--calib", "{short}"], r"fewer than one sequence.*more text"),
    "missing calibration file": (["--kv-ratio", "0.5", "--calib", "{missing}"], r"does not exist: pass --calib"),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_bad_option(case, src, tmp_path, capsys):
    import re

    args, pattern = OPTION_CASES[case]
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("In the beginning God created")
    files = {"empty": tmp_path / "empty.txt", "short": tmp_path / "short.txt", "missing": tmp_path / "none.txt"}
    args = [a.format(**files) for a in args]
    dst = tmp_path / "out"
    before = tree_digest(src)
    assert cli_main(["convert", str(src), str(dst), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("transmla: error: ") and re.search(pattern, err), err
    assert not dst.exists() and not list(tmp_path.glob(".out.transmla-tmp-*")) and tree_digest(src) == before


def test_destination_not_writable(src, tmp_path, monkeypatch, capsys):
    """A read-only parent directory (simulated: these tests may run as root, who can write anywhere)."""
    real_access = os.access
    parent = tmp_path / "ro"
    parent.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == parent else real_access(p, mode))
    err = _run_cli_expect_error(src, parent / "out", capsys)
    assert "cannot write to" in err and "writable destination" in err
