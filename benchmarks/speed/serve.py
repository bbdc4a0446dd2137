"""Online serving, converted vs original: `vllm serve` for each model under `vllm bench serve` (random
prompts, fixed concurrency), reporting TTFT, TPOT, ITL and output tokens per second side by side.

Each model is served with the same flags; `--budget fixed` gives both the KV memory that holds
`--fixed-seqs` full sequences of the original (as in speed/throughput.py), `--budget free` the engine's
default. Both take `--max-num-batched-tokens` (256 by default): with chunked prefill a 1,024-token
prompt is prefilled over 4 engine steps while the running requests keep decoding, instead of stalling
them for a whole prefill. The server and the benchmark client are vLLM's own CLIs, so this runs
unchanged on a GPU.

    python benchmarks/speed/serve.py                                   # the MHA-shaped pair
    python benchmarks/speed/serve.py --original SRC --converted DST --input-len 1024 --output-len 256

Writes JSON (vLLM's result files, per model) and a plot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from throughput import PAIRS, build_pair, kv_bytes_per_token  # noqa: E402

from vllm_transmla.testing.processes import free_port, stop_process_group  # noqa: E402

METRICS = ["output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
           "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms"]


def _wait_ready(port: int, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"vllm serve did not come up:\n{log.read_text()[-4000:]}") from None
            time.sleep(2)


def serve_and_bench(model: Path, args, budget: int | None, work: Path, name: str) -> dict:
    """Start `vllm serve model`, run `vllm bench serve` against it, stop the server; vLLM's result dict."""
    bin_dir = Path(sys.executable).parent
    port = free_port()
    log = work / f"{name}-server.log"
    serve = [str(bin_dir / "vllm"), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
             "--dtype", args.dtype, "--gpu-memory-utilization", "0.5",
             "--max-model-len", str(args.input_len + args.output_len), "--max-num-seqs", str(args.max_num_seqs)]
    if budget:
        serve += ["--kv-cache-memory-bytes", str(budget)]
    if args.max_num_batched_tokens:  # the prefill chunk: a smaller one shortens the decode stall a prefill causes
        serve += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    with open(log, "w") as out:
        proc = subprocess.Popen(serve, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(port, proc, log)
        bench = [str(bin_dir / "vllm"), "bench", "serve", "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
                 "--model", str(model), "--tokenizer", str(model), "--dataset-name", "random",
                 "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
                 "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.max_concurrency),
                 "--ignore-eos", "--seed", "0", "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles",
                 "50,99", "--save-result", "--result-dir", str(work), "--result-filename", f"{name}.json",
                 "--disable-tqdm"]
        done = subprocess.run(bench, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"vllm bench serve failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        print(done.stdout[-2500:], flush=True)
        return json.loads((work / f"{name}.json").read_text())
    finally:
        stop_process_group(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="mha", choices=PAIRS)
    parser.add_argument("--original", help="your own original checkpoint (with --converted)")
    parser.add_argument("--converted", help="its converted checkpoint")
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--budget", choices=["fixed", "free"], default="fixed")
    parser.add_argument("--fixed-seqs", type=int, default=2, help="full sequences the original holds (fixed)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=256,
                        help="tokens per engine step, for both models (chunked prefill); 0: vLLM's default")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default=str(Path(__file__).with_name("serve.json")))
    args = parser.parse_args()
    dtype_bytes = 4 if args.dtype in ("float32", "float") else 2

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        original, converted = ((Path(args.original), Path(args.converted)) if args.original
                               else build_pair(args.pair, work))
        length = args.input_len + args.output_len
        budget = (kv_bytes_per_token(original, dtype_bytes) * (length + 128) * args.fixed_seqs
                  if args.budget == "fixed" else None)
        result = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "kv_budget_bytes": budget}
        for kind, model in (("original", original), ("converted", converted)):
            full = serve_and_bench(model, args, budget, work, kind)
            result[kind] = {m: full.get(m) for m in METRICS + ["completed", "duration", "total_output_tokens"]}
            print(kind, json.dumps(result[kind]), flush=True)
        result["converted_over_original"] = {m: round(result["converted"][m] / result["original"][m], 3)
                                             for m in METRICS if result["original"].get(m)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.out).with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("output_throughput", "output tok/s"), ("median_ttft_ms", "median TTFT (ms)"),
              ("median_tpot_ms", "median TPOT (ms)"), ("p99_itl_ms", "p99 ITL (ms)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    for ax, (metric, label) in zip(axes, panels):
        values = [result["original"][metric], result["converted"][metric]]
        ax.bar(["original", "converted"], values, color=["tab:gray", "tab:blue"])
        ax.set_title(label, fontsize=9)
    settings = result["settings"]
    fig.suptitle(f"vllm bench serve: {settings['num_prompts']} prompts, {settings['input_len']} in / "
                 f"{settings['output_len']} out, concurrency {settings['max_concurrency']}, "
                 f"{settings['budget']} KV budget, {settings.get('max_num_batched_tokens') or 'default'} "
                 "tokens a step", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
