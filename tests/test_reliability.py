"""Bad input found by feeding the tools garbage, as a demanding user or an attacker would: each case gets
the one-line `transmla: error: <problem>: <fix>` (exit 2) or, where the input is legal, the right result."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import tree_digest
from vllm_transmla.cli import main as cli_main
from vllm_transmla.testing.tiny import build_tiny_model


@pytest.fixture
def src(tmp_path):
    return build_tiny_model("llama-rope3", tmp_path / "src", num_hidden_layers=2)


def expect_error(capsys, argv: list[str], pattern: str) -> str:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("transmla: error: ") and re.search(pattern, err), err
    return err


def logits(path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    import vllm_transmla  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, 384, (2, 40), generator=torch.Generator().manual_seed(1))


# --- silently wrong results ------------------------------------------------------------------------
def test_yarn_source_compresses_like_its_scaled_twin(tmp_path):
    """YaRN's attention factor s scales cos and sin, so every logit by s^2; a default-rope twin with q x s^2
    is the same function. Compressed, the NoPE part must carry s^2 too: both give the same model."""
    from safetensors.torch import load_file, save_file

    yarn = build_tiny_model("llama-tied", tmp_path / "yarn", rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 1.0, "attention_factor": 2.0,
        "original_max_position_embeddings": 256})
    twin = build_tiny_model("llama-tied", tmp_path / "twin")
    for shard in sorted(twin.glob("*.safetensors")):
        tensors = load_file(shard)
        tensors = {k: v * 4 if k.endswith("q_proj.weight") else v for k, v in tensors.items()}
        save_file(tensors, str(shard), metadata={"format": "pt"})
    assert torch.allclose(logits(yarn, IDS), logits(twin, IDS), atol=1e-5)
    outs = [cli_main(["convert", str(p), str(tmp_path / f"{p.name}-mla"), "--quiet", "--kv-ratio", "0.5"])
            for p in (yarn, twin)]
    assert outs == [0, 0]
    a, b = logits(tmp_path / "yarn-mla", IDS), logits(tmp_path / "twin-mla", IDS)
    assert (a - b).abs().max() < 1e-5 * a.abs().max(), (a - b).abs().max()
    assert (a - logits(yarn, IDS)).abs().max() > 1e-3  # compressed: a lossy model, so the check can fail


def test_old_rotary_buffers_are_dropped_and_the_output_is_valid(src, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    shard = sorted(src.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    for layer in range(2):
        tensors[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.ones(16)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"].update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": shard.name for i in range(2)})
    index.write_text(json.dumps(data))
    for extra in ([], ["--kv-ratio", "0.5"]):
        dst = tmp_path / f"mla{len(extra)}"
        assert cli_main(["convert", str(src), str(dst), "--quiet", *extra]) == 0
        assert cli_main(["check", str(dst)]) == 0, capsys.readouterr().err


def test_config_dtype_is_the_weights_dtype(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    cfg["dtype"] = "int8"
    (src / "config.json").write_text(json.dumps(cfg))
    assert cli_main(["convert", str(src), str(tmp_path / "mla"), "--quiet"]) == 0
    assert json.loads((tmp_path / "mla" / "config.json").read_text())["dtype"] == "float32"
    logits(tmp_path / "mla", IDS)  # transformers loads it


# --- reads outside the checkpoint ------------------------------------------------------------------
_OPENED: list[str] = []
_RECORDING = [False]


def _audit(event, args):
    """Records every file this process opens while a test asks (audit hooks cannot be removed)."""
    if _RECORDING[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


def _point_index_outside(src: Path, target: str) -> None:
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = target
    index.write_text(json.dumps(data))


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
@pytest.mark.parametrize("command", ["convert", "check", "finetune-student", "finetune-teacher", "plugin"])
def test_index_naming_files_outside_is_refused_and_nothing_outside_is_opened(command, target, src, tmp_path,
                                                                            capsys):
    """convert, check, finetune (student and teacher) and the vLLM plugin's checkpoint check."""
    import shutil

    from vllm_transmla.errors import TransMLAError
    from vllm_transmla.serving.plugin import check_local_checkpoint

    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(next(src.glob("model-*.safetensors")).read_bytes())  # a real shard, outside SRC
    data = tmp_path / "train.txt"
    data.write_text("Some words to train on, and more of them. " * 40)
    teacher = tmp_path / "teacher"
    shutil.copytree(src, teacher)
    if command != "convert":
        assert cli_main(["convert", str(src), str(tmp_path / "mla"), "--quiet"]) == 0
        src = tmp_path / "mla"
    _point_index_outside(teacher if command == "finetune-teacher" else src, target)
    args = {"convert": [str(src), str(tmp_path / "out"), "--quiet"], "check": [str(src)]}.get(command) or [
        str(src), "--teacher", str(teacher), "--data", str(data), "--out", str(tmp_path / "out"), "--max-steps", "1"]
    _OPENED.clear()
    _RECORDING[0] = True
    try:
        if command == "plugin":
            with pytest.raises(TransMLAError, match=r"not a file name inside .*fix or re-download"):
                check_local_checkpoint(str(src))
        else:
            expect_error(capsys, [command.split("-")[0], *args], r"not a file name inside .*fix or re-download")
    finally:
        _RECORDING[0] = False
    assert _OPENED, "the audit hook recorded nothing: the check would pass vacuously"
    assert str(outside.resolve()) not in _OPENED and "/etc/passwd" not in _OPENED
    assert not (tmp_path / "out").exists()


def test_symlinked_shards_inside_the_checkpoint_still_work(src, tmp_path):
    """The Hugging Face cache links snapshot files to blobs elsewhere: links in the directory are fine."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in src.glob("model-*.safetensors"):
        target = blobs / shard.name
        shard.rename(target)
        shard.symlink_to(target)
    assert cli_main(["convert", str(src), str(tmp_path / "mla"), "--quiet"]) == 0


# --- one-line errors instead of tracebacks ---------------------------------------------------------
@pytest.mark.parametrize("args,pattern", [
    (["--kv-ratio", "nan"], r"--kv-ratio nan must be in \(0, 1\]"),
    (["--kv-ratio", "inf"], r"--kv-ratio inf must be in \(0, 1\]"),
    (["--kv-ratio=-inf"], r"--kv-ratio -inf must be in \(0, 1\]"),
    (["--kv-ratio", "0.5", "--calib-seq-len", "0"], r"--calib-seq-len 0 must be a positive number of tokens"),
    (["--kv-ratio", "0.5", "--calib-seq-len=-4"], r"--calib-seq-len -4 must be a positive"),
    (["--kv-ratio", "0.5", "--calib-tokens", "0"], r"--calib-tokens 0 must be a positive"),
    (["--kv-ratio", "0.5", "--calib-tokens=-1"], r"--calib-tokens -1 must be a positive"),
    (["--kv-ratio", "0.5", "--freqfold", "0"], r"--freqfold '0' must be a whole number.*at least 1"),
    (["--kv-ratio", "0.5", "--freqfold=-2"], r"--freqfold '-2' must be a whole number.*at least 1"),
    (["--kv-ratio", "0.03"], r"--kv-ratio 0.03 leaves no latent worth caching.*raise it to at least"),
    (["--max-shard-size", "0"], r"size '0' must be at least one byte"),
])
def test_bad_convert_options(args, pattern, src, tmp_path, capsys):
    before = tree_digest(src)
    expect_error(capsys, ["convert", str(src), str(tmp_path / "out"), "--quiet", *args], pattern)
    assert not (tmp_path / "out").exists() and tree_digest(src) == before


@pytest.mark.parametrize("content,pattern", [
    (b"\x00\x01\x02binary" * 100, r"holds NUL bytes at byte 0: it is binary"),
    ("Caf\u00e9 au lait, na\u00efve.\n".encode("latin-1") * 100, r"is not UTF-8 text \(byte 3 cannot"),
])
def test_calibration_text_must_be_utf8(content, pattern, src, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_bytes(content)
    expect_error(capsys, ["convert", str(src), str(tmp_path / "out"), "--quiet", "--kv-ratio", "0.5", "--calib",
                          str(calib)], pattern)


def test_jsonl_text_that_is_not_a_string(src, tmp_path, capsys):
    calib = tmp_path / "calib.jsonl"
    calib.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": 42}) + "\n")
    expect_error(capsys, ["convert", str(src), str(tmp_path / "out"), "--quiet", "--kv-ratio", "0.5", "--calib",
                          str(calib)], r"calib.jsonl line 2 has no \"text\" string field")


@pytest.mark.parametrize("which", ["directory", "/dev/null"])
def test_calibration_and_evaluation_text_must_be_regular_files(which, src, tmp_path, capsys):
    path = tmp_path if which == "directory" else Path("/dev/null")
    kind = "is a directory" if which == "directory" else "is not a regular file"
    expect_error(capsys, ["convert", str(src), str(tmp_path / "out"), "--quiet", "--kv-ratio", "0.5", "--calib",
                          str(path)], kind)
    expect_error(capsys, ["eval", str(src), "--text", str(path)], kind)


def test_huge_one_line_calibration_file_is_read_only_as_far_as_needed(src, tmp_path, monkeypatch):
    """21 MB on one line: the calibration reads a few pieces, not the whole file."""
    from vllm_transmla import text_files

    calib = tmp_path / "one-line.txt"
    words = (Path(__file__).parents[1] / "vllm_transmla" / "data" / "genesis_kjv.txt").read_text().split()
    with open(calib, "w") as f:
        for _ in range(21 * 2**20 // 4000):
            f.write(" ".join(words)[:4000] + " ")
    handed_out = []
    real = text_files._lines

    def counting(path, what):
        for line in real(path, what):
            handed_out.append(len(line))
            yield line

    monkeypatch.setattr(text_files, "_lines", counting)
    assert cli_main(["convert", str(src), str(tmp_path / "mla"), "--quiet", "--kv-ratio", "0.5", "--calib",
                     str(calib), "--calib-tokens", "4096", "--calib-seq-len", "64"]) == 0
    assert sum(handed_out) < 2 * 2**20, sum(handed_out)


# --- converted checkpoints that `check` must refuse or that must load right ------------------------
@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    src = build_tiny_model("llama-rope3", tmp_path_factory.mktemp("reliability") / "src", num_hidden_layers=2)
    dst = src.parent / "mla"
    assert cli_main(["convert", str(src), str(dst), "--quiet", "--kv-ratio", "0.5"]) == 0
    return dst


@pytest.fixture(scope="module")
def compressed_selected(tmp_path_factory):
    """Rope pairs chosen one by one (`--freqfold select`): the config lists each layer's frequencies."""
    src = build_tiny_model("llama-rope3", tmp_path_factory.mktemp("reliability") / "src", num_hidden_layers=2)
    dst = src.parent / "mla"
    assert cli_main(["convert", str(src), str(dst), "--quiet", "--kv-ratio", "0.5", "--freqfold", "select"]) == 0
    return dst


def _copy_with_config(ckpt: Path, out: Path, **changes) -> Path:
    import shutil

    shutil.copytree(ckpt, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(changes)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("change,pattern", [
    (lambda c: {"qk_rope_pair_freqs": [[999] + f[1:] for f in c["qk_rope_pair_freqs"]]},
     r"qk_rope_pair_freqs\[0\] entry 999: a frequency index must be in 0..15"),
    (lambda c: {"qk_rope_pair_freqs": [[-1] + f[1:] for f in c["qk_rope_pair_freqs"]]},
     r"qk_rope_pair_freqs\[0\] entry -1"),
    (lambda c: {"qk_rope_pair_freqs": [f[:-1] for f in c["qk_rope_pair_freqs"]]},
     r"qk_rope_pair_freqs that do not list qk_rope_head_dim / 2 = 16 frequencies"),
    (lambda c: {"qk_rope_num_blocks": 3}, r"qk_rope_num_blocks=3: it must be a positive integer dividing"),
    (lambda c: {"qk_rope_num_blocks": 0}, r"qk_rope_num_blocks=0"),
])
def test_check_refuses_rope_layouts_the_model_cannot_run(change, pattern, compressed_selected, tmp_path, capsys):
    compressed = compressed_selected
    cfg = json.loads((compressed / "config.json").read_text())
    broken = _copy_with_config(compressed, tmp_path / "broken", **change(cfg))
    expect_error(capsys, ["check", str(broken)], pattern)


def test_check_weights_finds_non_finite_tensors(compressed, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan"
    shutil.copytree(compressed, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert cli_main(["check", str(broken)]) == 0  # headers and shapes are fine...
    capsys.readouterr()
    expect_error(capsys, ["check", str(broken), "--weights"], rf"tensor {re.escape(name)} .* holds 1 NaN/Inf")
    assert cli_main(["check", str(compressed), "--weights"]) == 0


def test_plugin_refuses_non_finite_weights_while_loading():
    from vllm_transmla.serving.models import finite_weights

    good = [("a", torch.ones(3)), ("b", torch.arange(3))]
    assert [n for n, _ in finite_weights(good)] == ["a", "b"]
    with pytest.raises(ValueError, match=r"tensor b holds 2 NaN/Inf values.*transmla check --weights"):
        list(finite_weights([("a", torch.ones(3)), ("b", torch.tensor([1.0, float("inf"), float("nan")]))]))


def test_converting_a_converted_checkpoint_says_so(compressed, tmp_path, capsys):
    expect_error(capsys, ["convert", str(compressed), str(tmp_path / "again"), "--quiet"],
                 r"already an MLA model \(LlamaMLAForCausalLM.*convert its original GQA source")


def test_public_converter_checkpoints_load_with_our_classes(tmp_path):
    """transformers alone builds DeepseekV3ForCausalLM for model_type deepseek_v3 (random experts, a fresh
    kv_a_layernorm); `import vllm_transmla` makes it build ours, and real DeepSeek-V3 configs keep theirs."""
    from public_layout import to_public_layout
    from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    for family in ("llama-tied", "mixtral"):
        src = build_tiny_model(family, tmp_path / family / "src")
        ours = tmp_path / family / "ours"
        assert cli_main(["convert", str(src), str(ours), "--quiet", "--kv-ratio", "0.5"]) == 0
        public = to_public_layout(ours, tmp_path / family / "public")
        model = AutoModelForCausalLM.from_pretrained(public, dtype=torch.float32)
        assert type(model).__name__ == json.loads((public / "config.json").read_text())["architectures"][0]
        assert (logits(public, IDS) - logits(ours, IDS)).abs().max() < 1e-4
    real = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=1, num_attention_heads=2, kv_lora_rank=16, q_lora_rank=None,
                            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                            num_experts_per_tok=2, architectures=["DeepseekV3ForCausalLM"])
    assert type(AutoModelForCausalLM.from_config(real)) is DeepseekV3ForCausalLM


def test_remote_code_route_for_tools_that_never_import_us(compressed, tmp_path):
    """`lm_eval --model hf` and plain scripts load with trust_remote_code=True through the checkpoint's
    auto_map, which imports the installed package; the logits are ours."""
    import subprocess

    script = ("import sys, torch; from transformers import AutoModelForCausalLM; "
              "assert 'vllm_transmla' not in sys.modules; "
              f"m = AutoModelForCausalLM.from_pretrained({str(compressed)!r}, trust_remote_code=True, "
              "dtype=torch.float32); "
              f"torch.save(m(torch.tensor({IDS.tolist()})).logits, {str(tmp_path / 'logits.pt')!r})")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), logits(compressed, IDS), atol=1e-6)


# --- info, eval, overwrite -------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["missing", "file"])
def test_info_on_a_missing_path_or_a_file(what, tmp_path, capsys):
    path = tmp_path / "nothing"
    if what == "file":
        path.write_text("{}")
    expect_error(capsys, ["info", str(path)], "does not exist" if what == "missing" else "is not a directory")


def test_eval_sequence_length_checks(src, capsys):
    text = str(Path(__file__).parents[1] / "vllm_transmla" / "data" / "genesis_kjv.txt")
    expect_error(capsys, ["eval", str(src), "--text", text, "--seq-len", "0"], r"--seq-len 0 must be a positive")
    expect_error(capsys, ["eval", str(src), "--text", text, "--seq-len", "300"],
                 r"--seq-len 300 exceeds the model's max_position_embeddings 256.*use --seq-len 256 or less")


def test_overwrite_through_a_link_replaces_where_it_points(src, tmp_path, capsys):
    real = tmp_path / "real"
    assert cli_main(["convert", str(src), str(real), "--quiet"]) == 0
    link = tmp_path / "link"
    link.symlink_to(real)
    (real / "stale.txt").write_text("old")
    assert cli_main(["convert", str(src), str(link), "--quiet", "--overwrite", "--kv-ratio", "0.5"]) == 0
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert not (real / "stale.txt").exists() and json.loads((real / "config.json").read_text())["kv_lora_rank"] == 32
    assert not list(tmp_path.glob(".*transmla-tmp-*"))
    assert "link to" in capsys.readouterr().err


# --- finetune --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def student_and_teacher(compressed):
    return compressed, compressed.parent / "src"


def _finetune_argv(student, teacher, out, *extra):
    text = str(Path(__file__).parents[1] / "vllm_transmla" / "data" / "genesis_kjv.txt")
    return ["finetune", str(student), "--teacher", str(teacher), "--data", text, "--out", str(out), "--quiet",
            "--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--logging-steps", "1", *extra]


@pytest.mark.parametrize("lr", ["inf", "nan", "0", "-1e-3"])
def test_finetune_refuses_a_learning_rate_that_cannot_train(lr, student_and_teacher, tmp_path, capsys):
    student, teacher = student_and_teacher
    out = tmp_path / "tuned"
    expect_error(capsys, _finetune_argv(student, teacher, out, f"--lr={lr}"), rf"--lr {float(lr)} must be")
    assert not out.exists() and not (tmp_path / "tuned.checkpoints").exists()


def test_finetune_that_diverges_writes_nothing(student_and_teacher, tmp_path, capsys):
    student, teacher = student_and_teacher
    out = tmp_path / "tuned"
    expect_error(capsys, _finetune_argv(student, teacher, out, "--lr", "1e30", "--warmup-steps", "0"),
                 r"training diverged: \d+ of \d+ trained tensors hold NaN/Inf.*nothing was written: lower --lr")
    assert not out.exists() and not (tmp_path / "tuned.checkpoints").exists()


def test_finetune_interrupted_before_a_checkpoint_leaves_no_checkpoint_directory(student_and_teacher, tmp_path,
                                                                                 monkeypatch):
    from vllm_transmla.finetune.trainer import DistillationTrainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DistillationTrainer, "train", interrupted)
    student, teacher = student_and_teacher
    assert cli_main(_finetune_argv(student, teacher, tmp_path / "tuned")) == 130
    assert not (tmp_path / "tuned").exists() and not (tmp_path / "tuned.checkpoints").exists()


def test_warmup_never_spends_a_step_at_learning_rate_zero(student_and_teacher, tmp_path):
    from safetensors.torch import load_file

    from vllm_transmla.finetune.trainer import warmup_cosine

    factor = warmup_cosine(1, 10)
    assert factor(0) == 0.5 and factor(1) == 1.0 and 0 < factor(9) < 0.05
    assert [round(warmup_cosine(3, 10)(s), 3) for s in range(3)] == [0.25, 0.5, 0.75]
    student, teacher = student_and_teacher
    out = tmp_path / "tuned"
    argv = _finetune_argv(student, teacher, out, "--warmup-steps", "1", "--lr", "1e-3")
    argv[argv.index("--max-steps") + 1] = "1"
    assert cli_main(argv) == 0
    before = {k: v for f in student.glob("model-*.safetensors") for k, v in load_file(f).items()}
    after = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    changed = [k for k in before if "kv_b_proj" in k and not torch.equal(before[k], after[k])]
    assert changed, "one optimizer step with --warmup-steps 1 left the trained weights as they were"


def test_rope_width_note_names_the_budget_and_the_plan_is_checked_before_calibration():
    """SmolLM2's shape (9 heads x 64, 3 KV heads): at 25% the note says why the rope part is 32 wide, and
    an absurd ratio is refused by the plan, before any calibration runs."""
    from vllm_transmla.convert.geometry import GQAShape
    from vllm_transmla.convert.plan import ConvertOptions, plan_conversion
    from vllm_transmla.errors import TransMLAError

    gqa = GQAShape(hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64)
    plan = plan_conversion(gqa, 30, ConvertOptions(kv_ratio=0.25))
    note = next(n for n in plan.notes if n.startswith("qk_rope_dim set to 32"))
    assert "budget of 96" in note and "head_dim 64" in note, note
    assert any("64 + 32 rope = 96 of the 384" in n for n in plan.notes)
    with pytest.raises(TransMLAError, match="--kv-ratio 0.01 leaves no latent worth caching"):
        plan_conversion(gqa, 30, ConvertOptions(kv_ratio=0.01))


def test_convert_summary_quotes_the_checkpoint_dtype(src, tmp_path, capsys):
    """An fp32 checkpoint's KV bytes per token are fp32 bytes, and the summary says which dtype."""
    assert cli_main(["convert", str(src), str(tmp_path / "mla")]) == 0
    summary = [line for line in capsys.readouterr().out.splitlines() if "KV cache per token" in line]
    assert summary and "KV cache per token (float32)" in summary[-1], summary
