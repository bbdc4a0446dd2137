"""`transmla finetune`: distil a converted (compressed) checkpoint toward its source model.

The student trains with transformers' Trainer (checkpoints every `save_steps` in the checkpoint
directory, resumable); the result is written like a conversion: into a temporary directory beside
OUT, renamed at the end, with the student's config.json, tokenizer and tensor layout unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import __version__
from ..checkpoint.atomic import atomic_directory, check_destination, copy_side_files
from ..checkpoint.config_json import read_raw_config
from ..checkpoint.safetensors_dir import TORCH_DTYPES, SafetensorsCheckpoint
from ..errors import TransMLAError
from ..text_files import check_text_file
from ..hf.configuration import MLA_CONFIG_CLASSES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RECORD_NAME = "transmla_finetune.json"


@dataclass
class FinetuneSettings:
    """Everything `transmla finetune` takes besides the paths (see the CLI's help for each)."""
    train: str = "mla"
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    temperature: float = 1.0
    max_steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 2e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    save_steps: int = 100
    save_total_limit: int = 2
    logging_steps: int = 10
    eval_steps: int | None = None
    eval_tokens: int | None = None
    seed: int = 0


def _check_numbers(s: FinetuneSettings) -> None:
    """Every numeric setting finite and in range, before anything is loaded or created."""
    finite = {"lr": s.lr, "weight_decay": s.weight_decay, "kl_weight": s.kl_weight, "ce_weight": s.ce_weight,
              "temperature": s.temperature}
    for key, value in finite.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TransMLAError(f"--{key.replace('_', '-')} {value} must be a finite number")
    if s.lr <= 0:
        raise TransMLAError(f"--lr {s.lr} must be > 0: the peak learning rate, e.g. 1e-4")
    if s.weight_decay < 0:
        raise TransMLAError(f"--weight-decay {s.weight_decay} must be >= 0")
    if s.warmup_steps < 0:
        raise TransMLAError(f"--warmup-steps {s.warmup_steps} must be >= 0")
    if s.kl_weight < 0 or s.ce_weight < 0 or s.kl_weight + s.ce_weight == 0:
        raise TransMLAError("--kl-weight and --ce-weight must be >= 0 and not both 0")
    if s.temperature <= 0:
        raise TransMLAError(f"--temperature must be > 0 (got {s.temperature})")


def _check_finite(model, trained: list[str], step: int) -> None:
    """Training must not have produced NaN/Inf weights: refuse to write them."""
    params = dict(model.named_parameters())
    bad = [name for name in trained if name in params and not torch.isfinite(params[name]).all()]
    if bad:
        raise TransMLAError(f"training diverged: {len(bad)} of {len(trained)} trained tensors hold NaN/Inf after step "
                            f"{step} (e.g. {bad[0]}); nothing was written: lower --lr or add --warmup-steps")


@contextlib.contextmanager
def _removed_on_failure(checkpoint_dir: Path, created: bool):
    """A failed run leaves no checkpoint directory it created, unless it holds resumable checkpoints of
    healthy weights (an interrupted run); a diverged run's checkpoints go too."""
    try:
        yield
    except BaseException as err:
        diverged = isinstance(err, TransMLAError)
        if created and (diverged or not _checkpoints_in(checkpoint_dir)):
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        raise


def default_checkpoint_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.checkpoints"


def _check_student(student: Path) -> dict:
    config = read_raw_config(student, what="student", expected="a checkpoint made by `transmla convert`")
    if config.get("model_type") not in MLA_CONFIG_CLASSES:
        raise TransMLAError(f"student {student} has model_type {config.get('model_type')!r}, not a converted MLA "
                            f"checkpoint ({', '.join(MLA_CONFIG_CLASSES)}): convert it first with "
                            f"`transmla convert SRC {student}-mla --kv-ratio ...`")
    from ..validate import validate_converted_checkpoint

    validate_converted_checkpoint(student)  # shard names inside it, every attention tensor's shape
    return config


def _check_teacher(teacher: Path, student_config: dict) -> None:
    config = read_raw_config(teacher, what="teacher", expected="the source checkpoint the student was converted from")
    if config.get("vocab_size") != student_config.get("vocab_size"):
        raise TransMLAError(f"teacher {teacher} has vocab_size {config.get('vocab_size')} but the student has "
                            f"{student_config.get('vocab_size')}: distillation needs the same vocabulary; pass the "
                            f"model the student was converted from")
    SafetensorsCheckpoint(teacher)  # the index names only shards inside the teacher's directory


def _check_same_tokenizer(student_tok, teacher_tok, sample: str, teacher: Path) -> None:
    probe = sample[:2000]
    if student_tok(probe, add_special_tokens=False).input_ids != teacher_tok(probe, add_special_tokens=False).input_ids:
        raise TransMLAError(f"the tokenizers of the student and of teacher {teacher} split the training text "
                            f"differently: pass the model the student was converted from as --teacher")


def _checkpoints_in(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _resume_point(checkpoint_dir: Path, resume: bool) -> Path | None:
    found = _checkpoints_in(checkpoint_dir)
    if resume and not found:
        raise TransMLAError(f"--resume: no checkpoint-N directory in {checkpoint_dir}: run without --resume to "
                            f"start, or pass the --checkpoint-dir of the run to continue")
    if found and not resume:
        raise TransMLAError(f"{checkpoint_dir} holds checkpoints of an earlier run ({found[-1].name}): pass "
                            f"--resume to continue it, or choose another --checkpoint-dir (or remove it)")
    return found[-1] if found else None


def _load(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    import vllm_transmla  # noqa: F401  (our checkpoints' classes)

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def _student_dtype(student: Path) -> torch.dtype:
    """The dtype of the student's attention weights, which the result is saved in."""
    ckpt = SafetensorsCheckpoint(student)
    name = next((n for n in ckpt.names() if n.endswith("kv_b_proj.weight")), ckpt.names()[0])
    return TORCH_DTYPES[ckpt.headers[ckpt.weight_map[name]][name]["dtype"]]


def _check_layout(result: Path, student: Path) -> None:
    """The saved tensors have exactly the student's names, shapes and dtypes (a valid converted checkpoint)."""
    a, b = SafetensorsCheckpoint(student), SafetensorsCheckpoint(result)
    if set(a.names()) != set(b.names()):
        missing, extra = sorted(set(a.names()) - set(b.names())), sorted(set(b.names()) - set(a.names()))
        raise TransMLAError(f"internal error: the saved model's tensors differ from the student's (missing "
                            f"{missing[:3]}, extra {extra[:3]}); nothing was written - please report it")
    for name in a.names():
        ha, hb = a.headers[a.weight_map[name]][name], b.headers[b.weight_map[name]][name]
        if (ha["shape"], ha["dtype"]) != (hb["shape"], hb["dtype"]):
            raise TransMLAError(f"internal error: tensor {name} was saved as {hb['dtype']}{hb['shape']}, not "
                                f"{ha['dtype']}{ha['shape']}; nothing was written - please report it")


def finetune(student: str | Path, teacher: str | Path, data: list[str | Path], out: str | Path,
             settings: FinetuneSettings | None = None, eval_text=None,
             checkpoint_dir: str | Path | None = None, resume: bool = False, overwrite: bool = False,
             max_shard_size: str = "2GB", progress: bool = True, keep_checkpoints: bool = False) -> Path:
    """Distil `student` (a converted checkpoint) toward `teacher` on the text files `data`; writes OUT.
    `eval_text`: held-out text file(s), measured before, every `eval_steps` and after training.

    Returns OUT. Training state goes to `checkpoint_dir` (default OUT.checkpoints beside OUT); it is removed
    once OUT is complete unless `keep_checkpoints`.
    """
    from transformers import AutoTokenizer, set_seed

    from .data import packed_dataset, read_documents
    from .trainable import select_trainable
    from .trainer import DistillationTrainer, EvaluateEvery

    s = settings or FinetuneSettings()
    student, teacher = Path(student), Path(teacher)
    out, eval_text = _check_inputs(student, teacher, Path(out), s, eval_text, overwrite)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir(out)
    resume_from = _resume_point(checkpoint_dir, resume)
    created = not checkpoint_dir.exists()  # by this run (transformers creates it with the Trainer)

    tokenizer = AutoTokenizer.from_pretrained(student)
    docs = read_documents(data)
    _check_same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(teacher), "\n".join(docs), teacher)
    dataset = packed_dataset(tokenizer, docs, s.seq_len)
    set_seed(s.seed)
    # Weights stay fp32 (bf16 runs under autocast, as mixed precision should); the teacher is only read.
    model = _load(student, torch.float32)
    teacher_model = _load(teacher, DTYPES[s.dtype])
    trained = select_trainable(model, s.train)
    with _removed_on_failure(checkpoint_dir, created):
        trainer = DistillationTrainer(
            model=model, args=_training_arguments(s, checkpoint_dir, progress), train_dataset=dataset,
            teacher=teacher_model, kl_weight=s.kl_weight, ce_weight=s.ce_weight, temperature=s.temperature,
            eval_text=eval_text, eval_tokenizer=str(student), eval_seq_len=min(256, s.seq_len),
            eval_tokens=s.eval_tokens)
        if eval_text is not None:  # held-out perplexity before training (step 0), every eval_steps, at the end
            initial = trainer.evaluate() if resume_from is None else None
            trainer.add_callback(EvaluateEvery(s.eval_steps, initial))
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        _check_finite(model, trained, trainer.state.global_step)
    record = {"transmla_version": __version__, "student": str(student), "teacher": str(teacher),
              "data": [str(d) for d in data], "eval_text": eval_text, "settings": asdict(s),
              "trained_parameters": trained, "train_tokens_available": len(dataset) * s.seq_len,
              "final_eval": _final_eval(trainer) if eval_text is not None else {},
              "resumed_from": str(resume_from) if resume_from else None}
    _write_output(trainer, student, out, record, overwrite, max_shard_size)
    if trainer.is_world_process_zero() and not keep_checkpoints:  # OUT is complete: the state did its job
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return out


def _check_inputs(student: Path, teacher: Path, out: Path, s: FinetuneSettings, eval_text, overwrite: bool):
    """Every setting and path checked before anything loads; returns OUT (resolved through a link) and the
    evaluation texts as a list (or None)."""
    from .trainable import SCOPES

    if s.train not in SCOPES:
        raise TransMLAError(f"--train {s.train!r} is not one of {', '.join(SCOPES)}")
    if s.dtype not in DTYPES:
        raise TransMLAError(f"--dtype {s.dtype!r} is not one of {', '.join(DTYPES)}")
    for key in ("max_steps", "batch_size", "grad_accum", "seq_len", "save_steps", "logging_steps"):
        if getattr(s, key) < 1:
            raise TransMLAError(f"--{key.replace('_', '-')} must be at least 1 (got {getattr(s, key)})")
    _check_numbers(s)
    student_config = _check_student(student)
    _check_teacher(teacher, student_config)
    if student.resolve() == out.resolve() or teacher.resolve() == out.resolve():
        raise TransMLAError(f"--out {out} is the student or the teacher: choose a new directory")
    out = check_destination(student, out, overwrite)
    texts = [eval_text] if isinstance(eval_text, (str, Path)) else list(eval_text or [])
    for text in texts:
        check_text_file(Path(text), "evaluation text", "--eval-text")
    max_positions = student_config.get("max_position_embeddings")
    if max_positions and s.seq_len > max_positions:
        raise TransMLAError(f"--seq-len {s.seq_len} exceeds the model's max_position_embeddings {max_positions}")
    return out, ([str(t) for t in texts] or None)


def _training_arguments(s: FinetuneSettings, checkpoint_dir: Path, progress: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(checkpoint_dir), max_steps=s.max_steps, per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum, learning_rate=s.lr, warmup_steps=s.warmup_steps,
        weight_decay=s.weight_decay, lr_scheduler_type="cosine", bf16=s.dtype == "bfloat16",
        use_cpu=s.dtype == "bfloat16" and not torch.cuda.is_available(),  # transformers asks for bf16 on CPU
        gradient_checkpointing=s.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if s.gradient_checkpointing else None,
        save_strategy="steps", save_steps=s.save_steps, save_total_limit=s.save_total_limit,
        logging_strategy="steps", logging_steps=s.logging_steps, logging_first_step=True,
        eval_strategy="no", report_to=[], seed=s.seed, data_seed=s.seed, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(), disable_tqdm=not progress, remove_unused_columns=False)


def _final_eval(trainer) -> dict:
    """The held-out metrics after the last step (measured then, or now)."""
    done = [h for h in trainer.state.log_history if "eval_perplexity" in h]
    if done and done[-1]["step"] == trainer.state.global_step:
        return {k: v for k, v in done[-1].items() if k.startswith("eval_")}
    return trainer.evaluate()


def _write_output(trainer, student: Path, out: Path, record: dict, overwrite: bool, max_shard_size) -> None:
    """OUT, atomically, in the student's dtype, layout and config. trainer.save_model gathers sharded (FSDP /
    DeepSpeed) weights, so every process takes part; the main process writes."""
    staging = out.parent / f".{out.name}.transmla-staging"  # outside atomic_directory's clean-up glob
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return
    try:
        with atomic_directory(out, overwrite) as tmp:
            _load(staging, _student_dtype(student)).save_pretrained(tmp, max_shard_size=max_shard_size)
            shutil.copy2(student / "config.json", tmp / "config.json")  # the student's config, byte for byte
            copy_side_files(student, tmp)
            _check_layout(tmp, student)
            record = {**record, "log_history": trainer.state.log_history}
            (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
