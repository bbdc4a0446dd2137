"""GGUF files (llama.cpp's format) as conversion sources: read tensor by tensor with our explicit weight map
and the gguf package's dequantizers, checked against transformers' own GGUF loading."""

from __future__ import annotations

import json
import os

import pytest
import torch

from gguf_files import permute, write_gguf
from vllm_transmla.checkpoint.gguf_file import GGUFCheckpoint, unpermute_rows
from vllm_transmla.cli import main as cli_main
from vllm_transmla.testing.tiny import build_tiny_model

IDS = torch.randint(3, 384, (2, 40), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    src = build_tiny_model("llama-tied", root / "src", num_hidden_layers=2)
    (root / "model").mkdir()
    return write_gguf(src, root / "model" / "tiny.Q4_1.gguf")


def _transformers_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def test_unpermute_inverts_llama_cpp_permutation():
    rows = torch.randn(4 * 32, 8)
    assert torch.equal(unpermute_rows(permute(rows, 4), 4), rows)
    assert not torch.equal(permute(rows, 4), rows)


def test_tensors_equal_transformers_gguf_loading(gguf_file):
    config = _transformers_gguf(gguf_file).config
    ours = GGUFCheckpoint(gguf_file, config.num_attention_heads, config.num_key_value_heads)
    reference = _transformers_gguf(gguf_file).state_dict()
    names = set(ours.names())
    assert names == {n for n in reference if n != "lm_head.weight"} and ours.skipped == []  # tied
    for name in names:
        assert torch.equal(ours.get(name), reference[name]), name
        assert ours.shape(name) == tuple(reference[name].shape)


def test_exact_conversion_of_gguf_equals_transformers_gguf_model(gguf_file, tmp_path):
    dst = tmp_path / "mla"
    assert cli_main(["convert", str(gguf_file), str(dst), "--quiet"]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import vllm_transmla  # noqa: F401

    mla = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    with torch.no_grad():
        ref, got = _transformers_gguf(gguf_file)(IDS).logits, mla(IDS).logits
    assert ref.abs().max() > 1 and (ref - got).abs().max() < 1e-4
    config = json.loads((dst / "config.json").read_text())
    assert config["dtype"] == "float32" and config["transmla"]["source_gguf_file"] == gguf_file.name
    tok = AutoTokenizer.from_pretrained(dst)
    assert tok.chat_template and "m['role']" in tok.chat_template
    text = "In the beginning God created the heaven"
    src_tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert tok(text).input_ids == src_tok(text).input_ids
    assert cli_main(["check", str(dst)]) == 0


def test_compressed_conversion_of_gguf_reads_nothing_beside_it(gguf_file, tmp_path):
    """The tokenizer and config come from the file alone: a stray tokenizer next to it is not read."""
    (gguf_file.parent / "tokenizer_config.json").write_text("{not json")
    try:
        assert cli_main(["convert", str(gguf_file), str(tmp_path / "mla"), "--quiet", "--kv-ratio", "0.5",
                         "--calib-seq-len", "64"]) == 0
    finally:
        os.unlink(gguf_file.parent / "tokenizer_config.json")
    assert cli_main(["check", str(tmp_path / "mla")]) == 0


def test_bad_gguf_files(gguf_file, tmp_path, capsys):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf_file.read_bytes()[: gguf_file.stat().st_size // 2])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + os.urandom(200))
    src = build_tiny_model("llama-tied", tmp_path / "src", num_hidden_layers=2)
    moe = write_gguf(src, tmp_path / "moe.gguf", experts=True)
    for path, pattern in ((truncated, "truncated|not a readable GGUF"), (garbage, "not a readable GGUF"),
                          (moe, "mixture-of-experts GGUF")):
        assert cli_main(["convert", str(path), str(tmp_path / "out"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("transmla: error: ") and __import__("re").search(pattern, err), err
        assert not (tmp_path / "out").exists()
