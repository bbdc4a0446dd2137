"""Recovery training on the reference model: how much of the compression's perplexity gap distillation
wins back in a fixed CPU budget.

1. `transmla convert` the embedded reference model to --kv-ratio of its KV cache (default 0.25);
2. `transmla finetune` the result with the original as teacher on the shipped calibration text (KL on
   the logits; the converted projections train), measuring held-out perplexity (KJV books held out of
   the reference model's training) before, every --eval-steps and after;
3. write JSON (settings, the curves, the gap recovered) and a loss / perplexity plot next to this file.

    python benchmarks/finetune/run.py                       # about 15 minutes on a 2-core CPU
    python benchmarks/finetune/run.py --max-steps 40 --out /tmp/f.json

gap recovered = (ppl_compressed - ppl_tuned) / (ppl_compressed - ppl_original).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "vllm_transmla" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DATA / "reference_model"))
    parser.add_argument("--kv-ratio", type=float, default=0.25)
    parser.add_argument("--data", nargs="+", default=[str(DATA / "kjv_calibration.txt")])
    parser.add_argument("--eval-text", default=str(DATA / "kjv_heldout.txt"))
    parser.add_argument("--train", default="mla", choices=["mla", "attention", "all"])
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ce-weight", type=float, default=0.0)
    parser.add_argument("--eval-steps", type=int, default=50)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = parser.parse_args()

    from vllm_transmla.convert.pipeline import convert
    from vllm_transmla.evaluate import perplexity
    from vllm_transmla.finetune.run import FinetuneSettings, finetune

    settings = FinetuneSettings(train=args.train, max_steps=args.max_steps, batch_size=args.batch_size,
                                seq_len=args.seq_len, lr=args.lr, ce_weight=args.ce_weight,
                                eval_steps=args.eval_steps, save_steps=args.max_steps, logging_steps=5)
    with tempfile.TemporaryDirectory() as tmp:
        original = perplexity(args.model, args.eval_text)["perplexity"]
        student = convert(args.model, Path(tmp) / "student", kv_ratio=args.kv_ratio, progress=False)
        start = time.perf_counter()
        tuned = finetune(student, args.model, args.data, Path(tmp) / "tuned", settings, eval_text=args.eval_text)
        minutes = (time.perf_counter() - start) / 60
        record = json.loads((tuned / "transmla_finetune.json").read_text())
        config = json.loads((tuned / "config.json").read_text())
        check = perplexity(tuned, args.eval_text)["perplexity"]  # the saved checkpoint, reloaded
    history = record["log_history"]
    evals = [{"step": h["step"], "seconds": h.get("seconds", 0.0), "perplexity": h["eval_perplexity"]}
             for h in history if "eval_perplexity" in h]
    losses = [{"step": h["step"], "seconds": h.get("seconds"), "loss": h["loss"], "kl": h.get("kl"),
               "ce": h.get("ce")} for h in history if "loss" in h]
    compressed, final = evals[0]["perplexity"], evals[-1]["perplexity"]
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model": args.model, "kv_ratio": args.kv_ratio, "kv_lora_rank": config["kv_lora_rank"],
        "qk_rope_head_dim": config["qk_rope_head_dim"], "data": args.data, "eval_text": args.eval_text,
        "settings": record["settings"], "train_tokens_available": record["train_tokens_available"],
        "perplexity": {"original": round(original, 4), "compressed": compressed, "tuned": final,
                       "tuned_checkpoint_reloaded": round(check, 4)},
        "gap_recovered": round((compressed - final) / (compressed - original), 4),
        "minutes_total": round(minutes, 2), "evals": evals, "losses": losses,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.out).with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("perplexity", "gap_recovered", "minutes_total")}, indent=2))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [x["step"] for x in result["losses"]]
    left.plot(steps, [x["kl"] for x in result["losses"]], label="KL(teacher || student), train batches")
    left.set_xlabel("optimizer step")
    left.set_ylabel("KL per token (nats)")
    left.set_yscale("log")
    left.legend()
    ppl = result["perplexity"]
    right.plot([x["step"] for x in result["evals"]], [x["perplexity"] for x in result["evals"]], "o-",
               label="student (held-out)")
    right.axhline(ppl["original"], color="k", ls="--", label=f"original {ppl['original']:.2f}")
    right.axhline(ppl["compressed"], color="r", ls=":", label=f"compressed {ppl['compressed']:.2f}")
    right.set_xlabel("optimizer step")
    right.set_ylabel("perplexity")
    right.set_title(f"{result['kv_ratio']:.0%} KV cache: {result['gap_recovered']:.0%} of the gap recovered in "
                    f"{result['minutes_total']:.1f} min")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
