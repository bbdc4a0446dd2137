"""Recovery training: how much of the compression's perplexity gap distillation wins back in a fixed CPU budget.

1. `transmla convert` the model to --kv-ratio of its KV cache (the converter's defaults);
2. `transmla finetune` the result with the original as teacher (KL on the logits; the converted
   projections train) on --data, measuring held-out perplexity on every --eval-text before, every
   --eval-steps and after;
3. write JSON (settings, the curves, the gap recovered per text) and a loss / perplexity plot.

    python benchmarks/finetune/run.py          # the reference model at 25% (~12 minutes on 2 cores)
    python benchmarks/finetune/run.py --real   # SmolLM2-135M-Instruct at 25% (~15 minutes), trained on the
                                               # shipped KJV calibration text (Proverbs, Mark), Debian's
                                               # license texts and the Devil's Dictionary D-Z; held out:
                                               # other KJV books and the Devil's Dictionary A-C
    python benchmarks/finetune/run.py --real --out-of-genre   # the same without D-Z: the Devil's
                                               # Dictionary is a genre the training never saw

gap recovered = (ppl_compressed - ppl_tuned) / (ppl_compressed - ppl_original), and the same on log
perplexity (nll), per held-out text.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "vllm_transmla" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct (fetched) instead of the "
                        "reference model")
    parser.add_argument("--out-of-genre", action="store_true", help="with --real: train on KJV and licenses only, "
                        "so the Devil's Dictionary is a genre the training never saw")
    parser.add_argument("--model")
    parser.add_argument("--kv-ratio", type=float, default=0.25)
    parser.add_argument("--data", nargs="+")
    parser.add_argument("--calib", nargs="+", help="calibration files of the conversion (default: the converter's)")
    parser.add_argument("--output-refit", action=argparse.BooleanOptionalAction, default=None,
                        help="convert with the o_proj refit (default: without it for --real, where it measured a "
                             "slower recovery; with it for the reference model)")
    parser.add_argument("--eval-text", nargs="+")
    parser.add_argument("--train", default="mla", choices=["mla", "attention", "all"])
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--ce-weight", type=float, default=0.0)
    parser.add_argument("--eval-steps", type=int)
    parser.add_argument("--eval-tokens", type=int, help="held-out tokens per evaluation (default: all)")
    parser.add_argument("--out")
    args = parser.parse_args()
    defaults = real_defaults(not args.out_of_genre) if args.real else reference_defaults()
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    result = run(args)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.out).with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("perplexity", "gap_recovered", "log_gap_recovered", "minutes_total")},
                     indent=2))


def reference_defaults() -> dict:
    return {"model": str(DATA / "reference_model"), "data": [str(DATA / "kjv_calibration.txt")],
            "eval_text": [str(DATA / "kjv_heldout.txt")], "calib": None, "max_steps": 600, "batch_size": 8, "lr": 2e-3,
            "eval_steps": 50, "output_refit": True, "out": str(Path(__file__).with_name("results.json"))}


def real_defaults(in_genre: bool) -> dict:
    from vllm_transmla.real_model import LICENSE_TEXTS, fetch_smollm2

    data = [str(DATA / "kjv_calibration.txt"), *LICENSE_TEXTS]
    if in_genre:  # the rest of the Devil's Dictionary (D-Z; A-C is held out), as KJV trains on other books
        data.append(str(Path(__file__).with_name("data") / "devils_dictionary_d_to_z.txt"))
    return {"model": str(fetch_smollm2().hf), "data": data,
            "eval_text": [str(DATA / "kjv_heldout.txt"), str(DATA / "devils_dictionary_heldout.txt")],
            "calib": list(LICENSE_TEXTS), "output_refit": False, "max_steps": 60, "batch_size": 4, "lr": None,
            "eval_steps": 20, "eval_tokens": 4096,
            "out": str(Path(__file__).with_name(f"results_smollm2{'' if in_genre else '_kjv_licenses'}.json"))}


def run(args) -> dict:
    from vllm_transmla.convert.pipeline import convert
    from vllm_transmla.evaluate import perplexity
    from vllm_transmla.finetune.run import FinetuneSettings, finetune

    fields = dict(train=args.train, max_steps=args.max_steps, batch_size=args.batch_size, seq_len=args.seq_len,
                  ce_weight=args.ce_weight, eval_steps=args.eval_steps, eval_tokens=args.eval_tokens,
                  save_steps=args.max_steps, logging_steps=5)
    if args.lr is not None:
        fields["lr"] = args.lr
    settings = FinetuneSettings(**fields)
    names = [Path(t).stem for t in args.eval_text]
    with tempfile.TemporaryDirectory() as tmp:
        original = {Path(t).stem: perplexity(args.model, t, max_tokens=args.eval_tokens)["perplexity"]
                    for t in args.eval_text}
        student = convert(args.model, Path(tmp) / "student", kv_ratio=args.kv_ratio, calib=args.calib,
                          output_refit=args.output_refit, progress=False)
        start, cpu_start = time.perf_counter(), time.process_time()
        tuned = finetune(student, args.model, args.data, Path(tmp) / "tuned", settings, eval_text=args.eval_text)
        minutes = (time.perf_counter() - start) / 60
        cpu_minutes = (time.process_time() - cpu_start) / 60  # summed over this process's threads
        record = json.loads((tuned / "transmla_finetune.json").read_text())
        config = json.loads((tuned / "config.json").read_text())
    history = record["log_history"]
    key = (lambda n: f"eval_{n}_perplexity") if len(names) > 1 else (lambda n: "eval_perplexity")
    evals = [{"step": h["step"], "seconds": h.get("seconds", 0.0), **{n: h[key(n)] for n in names}}
             for h in history if key(names[0]) in h]
    losses = [{"step": h["step"], "seconds": h.get("seconds"), "loss": h["loss"], "kl": h.get("kl"),
               "ce": h.get("ce")} for h in history if "loss" in h]
    compressed, final = evals[0], evals[-1]
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model": args.model, "kv_ratio": args.kv_ratio, "kv_lora_rank": config["kv_lora_rank"],
        "qk_rope_head_dim": config["qk_rope_head_dim"], "output_refit": args.output_refit, "calib": args.calib,
        "data": args.data,
        "eval_text": args.eval_text,
        "settings": record["settings"], "train_tokens_available": record["train_tokens_available"],
        "perplexity": {n: {"original": round(original[n], 4), "compressed": compressed[n], "tuned": final[n]}
                       for n in names},
        "gap_recovered": {n: round((compressed[n] - final[n]) / (compressed[n] - original[n]), 4) for n in names},
        "log_gap_recovered": {n: round(math.log(compressed[n] / final[n]) / math.log(compressed[n] / original[n]), 4)
                              for n in names},
        "minutes_total": round(minutes, 2), "cpu_minutes_total": round(cpu_minutes, 2),
        "evals": evals, "losses": losses,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["perplexity"])
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(5.5 * (1 + len(names)), 4))
    steps = [x["step"] for x in result["losses"]]
    axes[0].plot(steps, [x["kl"] for x in result["losses"]], label="KL(teacher || student), train batches")
    axes[0].set_xlabel("optimizer step")
    axes[0].set_ylabel("KL per token (nats)")
    axes[0].set_yscale("log")
    axes[0].legend()
    for ax, name in zip(axes[1:], names):
        ppl = result["perplexity"][name]
        ax.plot([x["step"] for x in result["evals"]], [x[name] for x in result["evals"]], "o-", label="student")
        ax.axhline(ppl["original"], color="k", ls="--", label=f"original {ppl['original']:.2f}")
        ax.axhline(ppl["compressed"], color="r", ls=":", label=f"compressed {ppl['compressed']:.2f}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(f"{name}: {result['log_gap_recovered'][name]:.0%} of the log-perplexity gap in "
                     f"{result['minutes_total']:.0f} min")
        ax.legend()
    fig.suptitle(f"{_model_name(result['model'])} at {result['kv_ratio']:.0%} of its KV cache")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _model_name(path: str) -> str:
    """The checkpoint's directory name (the fetched real model's is <cache>/smollm2-135m-instruct/hf)."""
    return Path(path).parent.name if Path(path).name == "hf" else Path(path).name


if __name__ == "__main__":
    main()
