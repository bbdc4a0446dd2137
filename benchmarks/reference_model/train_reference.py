"""Train the reference model: a small Llama-architecture GQA model (8 query heads of 32 dims, 2 KV
heads) on the public-domain King James Bible, so compression quality can be measured honestly here.

Text: Debian's `bible-kjv` package (`apt-get install bible-kjv`), dumped with `bible -f Ge1:1-Re22:21`.
The books in HELD_OUT are never trained on; they become the evaluation text
`vllm_transmla/data/kjv_heldout.txt`. Output: a transformers checkpoint (fp32 safetensors + tokenizer)
in `vllm_transmla/data/reference_model/` and `train_log.json` beside it.

    python benchmarks/reference_model/train_reference.py --minutes 30
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "vllm_transmla" / "data" / "reference_model"
HELDOUT_TEXT = ROOT / "vllm_transmla" / "data" / "kjv_heldout.txt"
CALIBRATION_TEXT = ROOT / "vllm_transmla" / "data" / "kjv_calibration.txt"
CALIBRATION_BOOKS = ("Prv", "Mark")  # training books, the default calibration text of `transmla convert`
HELD_OUT = ("Ruth", "Jonah", "Phi", "Jas")  # book abbreviations as `bible` prints them
VOCAB = 2048
SEQ = 256


def kjv_books() -> dict[str, str]:
    """Book abbreviation -> text (one verse per line, references stripped)."""
    raw = subprocess.run(["bible", "-f", "Ge1:1-Re22:21"], capture_output=True, text=True, check=True).stdout
    books: dict[str, list[str]] = {}
    for line in raw.splitlines():
        m = re.match(r"^(\d?[A-Za-z]+)\d+:\d+ (.*)$", line)
        if m:
            books.setdefault(m.group(1), []).append(m.group(2).strip())
    return {book: "\n".join(verses) + "\n" for book, verses in books.items()}


def model_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                       initializer_range=0.02)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq: int = SEQ) -> float:
    model.eval()
    n = (ids.numel() - 1) // seq
    total, count = 0.0, 0
    for i in range(n):
        chunk = ids[i * seq:(i + 1) * seq + 1][None]
        logits = model(chunk[:, :-1]).logits
        total += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        count += seq
    model.train()
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-clock training budget")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import LlamaForCausalLM

    from vllm_transmla.testing.tiny import train_bpe_tokenizer

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    books = kjv_books()
    train_text = "".join(t for b, t in books.items() if b not in HELD_OUT)
    heldout = "".join(books[b] for b in HELD_OUT)
    HELDOUT_TEXT.write_text(heldout)
    CALIBRATION_TEXT.write_text("".join(books[b] for b in CALIBRATION_BOOKS))
    tokenizer = train_bpe_tokenizer(train_text.splitlines(), VOCAB)
    train_ids = torch.tensor(tokenizer(train_text, add_special_tokens=False).input_ids)
    eval_ids = torch.tensor(tokenizer(heldout, add_special_tokens=False).input_ids)
    print(f"train tokens {train_ids.numel()}, held-out tokens {eval_ids.numel()}", flush=True)

    model = LlamaForCausalLM(model_config(len(tokenizer)))
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget, start, step, log = args.minutes * 60, time.time(), 0, []
    warmup = 50
    while True:
        elapsed = time.time() - start
        if elapsed > budget:
            break
        progress = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, train_ids.numel() - SEQ - 1, (args.batch,))
        batch = torch.stack([train_ids[s:s + SEQ + 1] for s in starts.tolist()])
        # fp32: on this CPU bf16 autocast makes a training step 25x slower (1.05 s -> 26 s at batch 16).
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            log.append({"step": step, "seconds": round(time.time() - start, 1), "loss": round(loss.item(), 4),
                        "lr": lr})
            print(log[-1], flush=True)
    ppl = perplexity(model, eval_ids[: 64 * SEQ + 1])
    print(f"steps {step}, held-out perplexity {ppl:.3f}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(OUT)
    tokenizer.save_pretrained(OUT)
    (OUT / "train_log.json").write_text(json.dumps({
        "steps": step, "batch": args.batch, "seq_len": SEQ, "minutes": args.minutes, "lr": args.lr,
        "train_tokens_available": int(train_ids.numel()), "tokens_seen": step * args.batch * SEQ,
        "heldout_books": HELD_OUT, "heldout_perplexity_first_16k_tokens": ppl, "log": log}, indent=1))


if __name__ == "__main__":
    main()
