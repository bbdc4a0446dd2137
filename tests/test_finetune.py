"""`transmla finetune`: distillation lowers the loss, the result is a valid converted checkpoint that
vLLM serves like transformers, and resuming a run continues the same loss curve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import tree_digest
from reference import hf_greedy, run_vllm
from vllm_transmla.checkpoint.safetensors_dir import SafetensorsCheckpoint
from vllm_transmla.convert.pipeline import convert
from vllm_transmla.errors import TransMLAError
from vllm_transmla.finetune.run import FinetuneSettings, finetune
from vllm_transmla.finetune.trainer import distillation_loss
from vllm_transmla.testing.tiny import SAMPLE_TEXT

DATA_DIR = Path(__file__).resolve().parents[1] / "vllm_transmla" / "data"
TRAIN_TEXT = DATA_DIR / SAMPLE_TEXT  # Genesis, 4 KB


def _settings(**overrides) -> FinetuneSettings:
    base = dict(max_steps=6, batch_size=4, seq_len=64, lr=1e-3, warmup_steps=0, save_steps=100, logging_steps=1)
    return FinetuneSettings(**{**base, **overrides})


@pytest.fixture(scope="module")
def student_teacher(tmp_path_factory):
    """The embedded reference model (trained on KJV text) and its conversion to 25% of its KV cache:
    a real quality gap for distillation to close."""
    teacher = DATA_DIR / "reference_model"
    student = convert(teacher, tmp_path_factory.mktemp("finetune") / "student", kv_ratio=0.25, progress=False,
                      calib_tokens=8192)
    return student, teacher


def test_distillation_loss_matches_its_definition():
    """KL(teacher_T || student_T) * T^2 and next-token CE, against sums written out by hand."""
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen) * 2
    ids = torch.randint(0, 11, (2, 5), generator=gen)
    loss, kl, ce = distillation_loss(student, teacher, ids, kl_weight=0.7, ce_weight=0.3, temperature=2.0)
    p_t, log_p_s = torch.softmax(teacher / 2, -1), torch.log_softmax(student / 2, -1)
    want_kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * 4
    logp = torch.log_softmax(student, -1)
    want_ce = -torch.stack([logp[b, t, ids[b, t + 1]] for b in range(2) for t in range(4)]).mean()
    torch.testing.assert_close(kl, want_kl)
    torch.testing.assert_close(ce, want_ce)
    torch.testing.assert_close(loss, 0.7 * want_kl + 0.3 * want_ce)


def _held_out_kl(model_path, teacher_path) -> float:
    """Mean KL(teacher || student) over the first four windows of the training text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    ids = torch.tensor(tok(TRAIN_TEXT.read_text(), add_special_tokens=False).input_ids[:4 * 64]).view(4, 64)
    with torch.no_grad():
        student = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)(ids).logits
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)(ids).logits
    return distillation_loss(student, teacher, ids)[1].item()


@pytest.fixture(scope="module")
def tuned(student_teacher, tmp_path_factory):
    """Six steps on the projections the conversion wrote; checkpoints at step 3 and 6."""
    student, teacher = student_teacher
    out = tmp_path_factory.mktemp("tuned") / "out"
    before = tree_digest(student)
    finetune(student, teacher, [TRAIN_TEXT], out, _settings(save_steps=3), eval_text=TRAIN_TEXT, progress=False,
             keep_checkpoints=True)
    assert tree_digest(student) == before, "finetune changed the student it read"
    return out


def _losses(history, first=1, last=None):
    return {h["step"]: h["loss"] for h in history if "loss" in h and h["step"] >= first
            and (last is None or h["step"] <= last)}


def test_steps_reduce_distillation_loss(student_teacher, tuned):
    student, teacher = student_teacher
    record = json.loads((tuned / "transmla_finetune.json").read_text())
    assert _held_out_kl(tuned, teacher) < 0.7 * _held_out_kl(student, teacher)
    evals = [h["eval_perplexity"] for h in record["log_history"] if "eval_perplexity" in h]
    assert evals[-1] < evals[0]  # step 0 and the end, both logged


def test_result_is_the_student_layout_with_only_the_chosen_weights_changed(student_teacher, tuned):
    student, _ = student_teacher
    assert (tuned / "config.json").read_bytes() == (student / "config.json").read_bytes()
    assert (tuned / "tokenizer.json").read_bytes() == (student / "tokenizer.json").read_bytes()
    before, after = SafetensorsCheckpoint(student), SafetensorsCheckpoint(tuned)
    assert set(before.names()) == set(after.names())
    changed = set()
    for name in before.names():
        a, b = before.get(name), after.get(name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if not torch.equal(a, b):
            changed.add(name)
    projections = ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    expected = {n for n in before.names() if any(f".self_attn.{p}." in n for p in projections)}
    assert changed == expected


def test_resume_continues_the_same_loss_curve(student_teacher, tuned, tmp_path):
    """A run restarted from its step-3 checkpoint logs the same losses for steps 4-6 and ends with the
    same weights as the uninterrupted run."""
    student, teacher = student_teacher
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    shutil.copytree(tuned.parent / "out.checkpoints" / "checkpoint-3", checkpoints / "checkpoint-3")
    with pytest.raises(TransMLAError, match="--resume"):
        finetune(student, teacher, [TRAIN_TEXT], tmp_path / "x", _settings(), checkpoint_dir=checkpoints,
                 progress=False)
    resumed = finetune(student, teacher, [TRAIN_TEXT], tmp_path / "resumed", _settings(save_steps=3),
                       checkpoint_dir=checkpoints, resume=True, progress=False)
    full = _losses(json.loads((tuned / "transmla_finetune.json").read_text())["log_history"])
    again = json.loads((resumed / "transmla_finetune.json").read_text())
    assert again["resumed_from"].endswith("checkpoint-3")
    again_losses = _losses(again["log_history"], first=4)
    assert sorted(again_losses) == [4, 5, 6]
    for step, loss in again_losses.items():
        assert loss == pytest.approx(full[step], rel=1e-4, abs=1e-6), f"step {step}"
    with safe_open(str(next(tuned.glob("*.safetensors"))), "pt") as a, \
            safe_open(str(next(resumed.glob("*.safetensors"))), "pt") as b:
        for name in a.keys():
            torch.testing.assert_close(a.get_tensor(name), b.get_tensor(name), rtol=1e-4, atol=1e-6)


def test_scopes_gradient_checkpointing_and_bf16(student_teacher, tmp_path):
    """`attention` also trains the norms, `all` every weight; gradient checkpointing gives the
    same losses; bf16 mixed precision runs and saves in the student's dtype."""
    student, teacher = student_teacher
    plain = finetune(student, teacher, [TRAIN_TEXT], tmp_path / "a", _settings(train="attention", max_steps=2),
                     progress=False)
    ckpt = finetune(student, teacher, [TRAIN_TEXT], tmp_path / "b",
                    _settings(train="attention", max_steps=2, gradient_checkpointing=True), progress=False)
    records = [json.loads((p / "transmla_finetune.json").read_text()) for p in (plain, ckpt)]
    trained = records[0]["trained_parameters"]
    assert any("o_proj" in n for n in trained) and any("layernorm" in n for n in trained)
    assert not any("mlp" in n or "embed" in n for n in trained)
    for step, loss in _losses(records[0]["log_history"]).items():
        assert loss == pytest.approx(_losses(records[1]["log_history"])[step], rel=1e-4)
    bf16 = finetune(student, teacher, [TRAIN_TEXT], tmp_path / "c", _settings(train="all", max_steps=1,
                    dtype="bfloat16"), progress=False)
    record = json.loads((bf16 / "transmla_finetune.json").read_text())
    assert any("embed_tokens" in n for n in record["trained_parameters"])
    assert (bf16 / "config.json").read_bytes() == (student / "config.json").read_bytes()
    saved, source = SafetensorsCheckpoint(bf16), SafetensorsCheckpoint(student)
    assert all(saved.get(n).dtype == source.get(n).dtype for n in source.names())


@pytest.mark.parametrize("case", ["not-converted", "other-vocab", "out-exists", "no-checkpoint", "no-text"])
def test_bad_finetune_input_is_refused_before_training(case, student_teacher, tiny_sources, tmp_path):
    student, teacher = student_teacher
    kwargs = dict(student=student, teacher=teacher, data=[TRAIN_TEXT], out=tmp_path / "out")
    expected = {"not-converted": "not a converted MLA checkpoint", "other-vocab": "same vocabulary",
                "out-exists": "already exists", "no-checkpoint": "no checkpoint-N", "no-text": "fewer than one window"}
    extra = {}
    if case == "not-converted":
        kwargs["student"] = teacher
    elif case == "other-vocab":
        from vllm_transmla.testing.tiny import build_tiny_model

        kwargs["teacher"] = build_tiny_model("llama-mha", tmp_path / "other", vocab_size=320)
    elif case == "out-exists":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("precious")
    elif case == "no-checkpoint":
        extra["resume"] = True
    elif case == "no-text":
        short = tmp_path / "short.txt"
        short.write_text("In the beginning")
        kwargs["data"] = [short]
    with pytest.raises(TransMLAError, match=expected[case]):
        finetune(**kwargs, settings=_settings(), progress=False, **extra)
    if case == "out-exists":
        assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    else:
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_tuned_checkpoint_serves_in_vllm_like_transformers(tuned, prompts):
    """fp32 greedy tokens of the fine-tuned checkpoint: vLLM (our plugin) equals transformers."""
    reference = hf_greedy(tuned, prompts, 24)
    result = run_vllm({"model": str(tuned), "prompts": [list(p) for p in prompts], "max_tokens": 24,
                       "kv_cache_memory_bytes": 4_000_000})
    assert result["use_mla"]
    for i, (ref, out) in enumerate(zip(reference, result["outputs"])):
        assert out["token_ids"] == ref["token_ids"], f"prompt {i}"


def test_cli_finetune_and_its_errors(student_teacher, tmp_path, capsys):
    from vllm_transmla.cli import main as cli_main

    student, teacher = student_teacher
    out = tmp_path / "cli-out"
    args = ["finetune", str(student), "--teacher", str(teacher), "--data", str(TRAIN_TEXT), "--out", str(out),
            "--max-steps", "2", "--batch-size", "2", "--seq-len", "64", "--logging-steps", "1", "--quiet"]
    assert cli_main(args) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert json.loads((out / "transmla_finetune.json").read_text())["settings"]["max_steps"] == 2
    assert cli_main(args) == 2  # OUT exists now
    err = capsys.readouterr().err.strip()
    assert err.startswith("transmla: error: ") and "already exists" in err and "\n" not in err
    assert not (tmp_path / "cli-out.checkpoints").exists()  # removed once OUT was complete
    assert cli_main([*args[:-1], "--overwrite", "--train", "all", "--max-steps", "1", "--quiet"]) == 0
    record = json.loads((out / "transmla_finetune.json").read_text())
    assert record["settings"]["train"] == "all" and record["settings"]["max_steps"] == 1


def test_qwen3_moe_student_trains_its_latent_path(tiny_sources, tmp_path):
    """A Qwen3-MoE student (per-head q/k norms) fine-tunes: the converted projections, q_head_proj and
    kv_a_key_proj included, change and the distillation loss falls; experts stay the teacher's."""
    teacher = tiny_sources["qwen3-moe"]
    student = convert(teacher, tmp_path / "student", kv_ratio=0.25, calib_seq_len=64, progress=False)
    out = finetune(student, teacher, [TRAIN_TEXT], tmp_path / "tuned", _settings(max_steps=4), progress=False)
    before, after = SafetensorsCheckpoint(student), SafetensorsCheckpoint(out)
    changed = {n for n in before.names() if not torch.equal(before.get(n), after.get(n))}
    layer = "model.layers.1.self_attn."
    assert {layer + "q_head_proj.weight", layer + "kv_a_key_proj.weight", layer + "kv_b_proj.weight"} <= changed
    assert not any(".experts." in n or "norm" in n for n in changed), sorted(changed)
    losses = _losses(json.loads((out / "transmla_finetune.json").read_text())["log_history"])
    assert losses[max(losses)] < losses[min(losses)], losses
