"""Prefix-cache hits: time to finish requests whose long prompt is already cached but for a few new tokens.

This is what multi-turn chat and shared system prompts do. Each case runs 8 random prompts of
`L + k` tokens one at a time first (vLLM caches their full 16-token blocks), then all 8 again in one
batch, timed: each request then computes only its k uncached tokens (1 <= k <= 16) against L cached
ones, and generates one token. Three engines per case, each in a fresh process:

* original: the GQA/MHA model with vLLM's CPU attention;
* converted, vLLM's split: requests with more than one new token take MLA's prefill path, which
  up-projects every cached token of the request through kv_b (2 R H (d_nope + d_v) FLOPs per cached
  token, whatever k is) before attending;
* converted, ours (the default): requests of up to 16 new tokens take the absorbed decode path as k
  causal one-token rows (2 H (2 R + D) FLOPs per query and cached token), no up-projection.

    python benchmarks/speed/prefix_hit.py                          # MHA pair (16 x 64), L = 1024 and 4096, k = 8
    python benchmarks/speed/prefix_hit.py --original SRC --converted DST --lengths 2048 --new-tokens 4 16

Writes JSON next to itself (or --out).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROMPTS = 8


def run_case(model: Path, length: int, new_tokens: int, env: dict | None) -> dict:
    from vllm_transmla.testing.offline import run_in_subprocess

    rng = random.Random(length + new_tokens)
    prompts = [[rng.randrange(10, 2000) for _ in range(length + new_tokens)] for _ in range(PROMPTS)]
    job = {"model": str(model), "dtype": "float32", "prompts": prompts, "max_tokens": 1, "logprobs": None,
           "max_model_len": length + new_tokens + 16, "solo": list(range(PROMPTS)), "enforce_eager": True,
           "enable_prefix_caching": True}
    result = run_in_subprocess(job, env=env, timeout=3600)
    solo = [result["solo_outputs"][str(i)]["token_ids"] for i in range(PROMPTS)]
    return {"seconds": round(result["generate_seconds"], 3), "prefix_cache_hits": result["prefix_cache_hits"],
            "same_tokens_as_alone": [o["token_ids"] for o in result["outputs"]] == solo}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", help="your own original checkpoint (with --converted)")
    parser.add_argument("--converted", help="its converted checkpoint")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096],
                        help="cached prompt tokens (multiples of 16, vLLM's CPU block size)")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[8], help="uncached tokens, 1-16")
    parser.add_argument("--out", default=str(ROOT / "prefix_hit.json"))
    args = parser.parse_args()
    if any(n % 16 for n in args.lengths) or not all(1 <= k <= 16 for k in args.new_tokens):
        parser.error("--lengths must be multiples of 16 and --new-tokens between 1 and 16")

    engines = [("original", "original", None),
               ("converted, vLLM's prefill path", "converted", {"VLLM_TRANSMLA_SHORT_QUERY_TOKENS": "1"}),
               ("converted, absorbed short queries", "converted", None)]
    results = {"settings": {"lengths": args.lengths, "new_tokens": args.new_tokens, "prompts": PROMPTS}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        if args.original:
            models = {"original": Path(args.original), "converted": Path(args.converted)}
        else:
            sys.path.insert(0, str(ROOT))
            from throughput import build_pair

            models = dict(zip(("original", "converted"), build_pair("mha", Path(tmp))))
        for length in args.lengths:
            for new_tokens in args.new_tokens:
                row = {"cached_tokens": length, "new_tokens": new_tokens}
                for label, model, env in engines:
                    row[label] = run_case(models[model], length, new_tokens, env)
                    print(length, new_tokens, label, row[label], flush=True)
                results["runs"].append(row)
                Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
