"""The distillation loss and a transformers Trainer that uses it.

Being a plain `transformers.Trainer`, the same code runs on one CPU, one GPU, or many under
`accelerate launch` / `torchrun` with DDP, FSDP or DeepSpeed configs; the teacher is a frozen copy on
every process (it is not sharded).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback


def warmup_cosine(warmup: int, total: int):
    """Learning-rate factor per optimizer step: step s < warmup runs at (s + 1) / (warmup + 1) of the peak (no
    step is spent at 0, as transformers' s / warmup would), then a cosine from the peak towards 0."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor,
                      kl_weight: float = 1.0, ce_weight: float = 0.0, temperature: float = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kl_weight * T^2 KL(teacher_T || student_T) + ce_weight * next-token cross-entropy.

    student_logits, teacher_logits [B, S, V]; input_ids [B, S]. The KL is the mean over all B*S
    positions of the forward KL between temperature-T softmaxes (T^2 keeps its gradient scale
    independent of T); the cross-entropy predicts input_ids[:, 1:]. Returns (loss, kl, ce).
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean") * temperature**2
    ce = F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
    return kl_weight * kl + ce_weight * ce, kl, ce


class DistillationTrainer(Trainer):
    """Trainer whose loss is `distillation_loss` against a frozen teacher; logs the KL and CE parts next to
    the loss, and evaluates held-out perplexity (`evaluate.perplexity`) when given an `eval_text`."""

    loss_is_scaled_for_ga = False  # compute_loss returns a mean: let Trainer divide by accumulation steps

    def __init__(self, *args, teacher, kl_weight: float = 1.0, ce_weight: float = 0.0, temperature: float = 1.0,
                 eval_text=None, eval_tokenizer=None, eval_seq_len: int = 256, eval_tokens: int | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.kl_weight, self.ce_weight, self.temperature = kl_weight, ce_weight, temperature
        self.eval_text, self.eval_tokenizer = eval_text, eval_tokenizer
        self.eval_seq_len, self.eval_tokens = eval_seq_len, eval_tokens
        self._parts = {"kl": 0.0, "ce": 0.0, "n": 0}
        self._started = time.perf_counter()

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            warmup = self.args.get_warmup_steps(num_training_steps)
            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, warmup_cosine(warmup, num_training_steps))
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids = inputs["input_ids"]
        if next(self.teacher.parameters()).device != input_ids.device:
            self.teacher.to(input_ids.device)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=input_ids).logits
        outputs = model(input_ids=input_ids)
        loss, kl, ce = distillation_loss(outputs.logits, teacher_logits, input_ids, self.kl_weight,
                                         self.ce_weight, self.temperature)
        if model.training:
            self._parts["kl"] += kl.item()
            self._parts["ce"] += ce.item()
            self._parts["n"] += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._parts["n"]:  # a training log: add the mean parts since the last one
            n = self._parts["n"]
            logs["kl"], logs["ce"] = round(self._parts["kl"] / n, 6), round(self._parts["ce"] / n, 6)
            self._parts = {"kl": 0.0, "ce": 0.0, "n": 0}
        logs["seconds"] = round(time.perf_counter() - self._started, 2)  # wall time of this process so far
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Held-out perplexity of the student on each `eval_text` (windows of `eval_seq_len` + 1 tokens):
        `<prefix>_perplexity` for the first text, and `<prefix>_<file stem>_perplexity` for each when there
        are several."""
        if not self.eval_text:
            return {}
        from pathlib import Path

        from ..evaluate import perplexity

        texts = [self.eval_text] if isinstance(self.eval_text, (str, Path)) else list(self.eval_text)
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        metrics = {}
        try:
            for i, text in enumerate(texts):
                result = perplexity(self.eval_tokenizer, text, seq_len=self.eval_seq_len, max_tokens=self.eval_tokens,
                                    model=model)
                names = ([metric_key_prefix] if i == 0 else []) + ([f"{metric_key_prefix}_{Path(text).stem}"]
                                                                  if len(texts) > 1 else [])
                for name in names:
                    metrics[f"{name}_perplexity"] = round(result["perplexity"], 4)
                    metrics[f"{name}_nll"] = round(result["nll"], 6)
        finally:
            model.train(was_training)
        self.log(metrics)
        return metrics


class EvaluateEvery(TrainerCallback):
    """Held-out evaluation every `every` optimizer steps; `initial` (the metrics before training) goes into
    the log history as step 0, which then travels with every checkpoint."""

    def __init__(self, every: int | None, initial: dict | None = None):
        self.every, self.initial = every, initial

    def on_train_begin(self, args, state, control, **kwargs):
        if self.initial and state.global_step == 0 and not any(h.get("step") == 0 for h in state.log_history):
            state.log_history.append({**self.initial, "step": 0})

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0:
            control.should_evaluate = True
        return control
