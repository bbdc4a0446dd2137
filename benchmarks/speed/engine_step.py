"""Whole-engine decode step time against the number of running sequences, original vs converted.

For each model of a pair, one vLLM engine (`LLM()`, its engine core inline) prefills N random prompts of
`--context` tokens, then times `--steps` decode steps with all N running (median), for every N in
`--seqs`; no prefill falls in a timed step. A few more steps run under torch's profiler and split the
step into attention (the attention custom op, kernel included), linear layers (oneDNN / GEMM calls),
the absorption matmuls of MLA (`bmm`), the other ops (norms, rope, sampling) and the time outside any
op (Python, vLLM's scheduler).

What it answers: with a KV budget that holds F sequences of the original, the converted model holds
floor(F x bytes_original / bytes_converted) of them (capped at `--max-num-seqs`), and its decode
throughput over the original's is

    (N_converted / step(N_converted)) / (F / step_original(F)),

the ceiling of the fixed-budget gain in `throughput.py` before prefill, preemption and context growth.
With a free budget both hold every sequence and the ratio is step_original(N) / step_converted(N).

    python benchmarks/speed/engine_step.py --pairs gqa mha --context 4096      # ~24 minutes on 2 cores
    python benchmarks/speed/engine_step.py --original SRC --converted DST --context 2048 --seqs 1 2 4 8

Writes JSON and a plot (step time and decode tok/s against running sequences).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the categories of a profiled step, by the names of torch's profiler events (self time)
ATTENTION_OPS = ("attention",)  # vllm::unified_attention_with_output, vllm::unified_mla_attention_with_output
LINEAR_OPS = ("onednn_mm", "aten::mm", "aten::addmm", "aten::linear", "gemm")
ABSORPTION_OPS = ("aten::bmm",)


def worker(job: dict) -> dict:
    """Runs in a fresh process: one engine, every N of job["seqs"] in turn."""
    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model"], dtype=job["dtype"], seed=0, gpu_memory_utilization=job["gpu_memory_utilization"],
              max_model_len=job["context"] + job["steps"] + 64, enforce_eager=True,
              max_num_seqs=job["max_num_seqs"], enable_prefix_caching=False)
    engine = llm.llm_engine
    rng = random.Random(job["context"])
    params = SamplingParams(max_tokens=job["steps"] + 32, temperature=0.0, ignore_eos=True)
    results = {}
    for n in job["seqs"]:
        ids = [f"{n}-{i}" for i in range(n)]
        for rid in ids:
            engine.add_request(rid, {"prompt_token_ids": [rng.randrange(10, 2000) for _ in range(job["context"])]},
                               params)
        started = set()
        while len(started) < n:  # prefill (chunked) until every request has its first token
            started.update(out.request_id for out in engine.step() if out.outputs and out.outputs[0].token_ids)
        for _ in range(3):
            engine.step()
        times = []
        for _ in range(job["steps"]):
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(job["profiled_steps"]):
                engine.step()
            profiled_wall = time.perf_counter() - start
        engine.abort_request(ids)
        while engine.has_unfinished_requests():
            engine.step()
        step_s = statistics.median(times)
        results[str(n)] = {"step_ms": round(step_s * 1e3, 2), "decode_tok_per_s": round(n / step_s, 1),
                           "step_ms_all": [round(t * 1e3, 2) for t in times],
                           "profile_ms_per_step": breakdown(prof, job["profiled_steps"], profiled_wall)}
        print(job["model"], n, results[str(n)]["step_ms"], results[str(n)]["profile_ms_per_step"], flush=True)
    return results


def breakdown(prof, steps: int, wall_s: float) -> dict:
    """Per profiled step (ms): the self CPU time of attention, linear and absorption ops, of every other op,
    and the step's wall time outside any op (Python, the scheduler); the profiler slows a step a little."""
    parts = {"attention": 0.0, "linear": 0.0, "absorption_bmm": 0.0, "other_ops": 0.0}
    for event in prof.key_averages():
        name = event.key.lower()
        part = ("attention" if any(k in name for k in ATTENTION_OPS) else
                "linear" if any(k in name for k in LINEAR_OPS) else
                "absorption_bmm" if any(k in name for k in ABSORPTION_OPS) else "other_ops")
        parts[part] += event.self_cpu_time_total / 1e3
    parts = {k: v / steps for k, v in parts.items()}
    parts["outside_ops"] = wall_s * 1e3 / steps - sum(parts.values())
    parts = {k: round(v, 2) for k, v in parts.items()}
    parts["wall"] = round(wall_s * 1e3 / steps, 2)
    return parts


def run_model(model: Path, seqs: list[int], args) -> dict:
    job = {"model": str(model), "seqs": seqs, "context": args.context, "steps": args.steps,
           "profiled_steps": args.profiled_steps, "dtype": args.dtype, "max_num_seqs": args.max_num_seqs,
           "gpu_memory_utilization": args.gpu_memory_utilization}
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # the engine core in the timed process
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, __file__, "--worker", str(job_path), str(out_path)], env=env,
                              capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"engine run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return json.loads(out_path.read_text())


def held_sequences(fixed_seqs: int, per_token: dict, max_num_seqs: int) -> int:
    """Sequences the converted model holds in the KV bytes of `fixed_seqs` of the original's."""
    return min(max_num_seqs, fixed_seqs * per_token["original"] // per_token["converted"])


def predictions(run: dict, per_token: dict, args) -> list[dict]:
    """Decode tok/s ratio, converted / original, at the sequences each budget lets the two models hold."""
    rows = []
    for fixed in args.fixed_seqs:
        held = held_sequences(fixed, per_token, args.max_num_seqs)
        orig, conv = run["original"][str(fixed)], run["converted"][str(held)]
        rows.append({"budget": f"fixed: {fixed} sequences of the original", "original_seqs": fixed,
                     "converted_seqs": held,
                     "decode_ratio": round(conv["decode_tok_per_s"] / orig["decode_tok_per_s"], 3)})
    for n in args.free_seqs:
        rows.append({"budget": f"free: {n} sequences in both", "original_seqs": n, "converted_seqs": n,
                     "decode_ratio": round(run["converted"][str(n)]["decode_tok_per_s"]
                                           / run["original"][str(n)]["decode_tok_per_s"], 3)})
    return rows


def main() -> None:
    from throughput import PAIRS, machine_state, pairs_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["gqa", "mha"], choices=PAIRS)
    parser.add_argument("--original", help="your own original checkpoint (with --converted)")
    parser.add_argument("--converted", help="its converted checkpoint")
    parser.add_argument("--context", type=int, default=4096, help="prompt tokens of every sequence")
    parser.add_argument("--seqs", type=int, nargs="+", help="running sequences to time (default: 1, 2, 4, 8 "
                        "and what the fixed budgets hold)")
    parser.add_argument("--fixed-seqs", type=int, nargs="+", default=[2, 4],
                        help="fixed budgets, in full sequences of the original (throughput.py uses 2)")
    parser.add_argument("--free-seqs", type=int, nargs="+", default=[8], help="free budget: sequences in both")
    parser.add_argument("--steps", type=int, default=12, help="timed decode steps per N (median reported)")
    parser.add_argument("--profiled-steps", type=int, default=3)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                        help="vLLM's share of accelerator memory (on CPU: of one NUMA node's RAM)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("engine_step.json")))
    args = parser.parse_args()

    results = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, original, converted, per_token in pairs_from_args(args, Path(tmp)):
            wanted = set(args.seqs or [1, 2, 4, 8]) | set(args.fixed_seqs) | set(args.free_seqs)
            wanted |= {held_sequences(f, per_token, args.max_num_seqs) for f in args.fixed_seqs}
            seqs = sorted(n for n in wanted if 0 < n <= args.max_num_seqs)
            row = {"pair": name, "context": args.context, "kv_bytes_per_token": per_token, "seqs": seqs}
            for model_kind, path in (("original", original), ("converted", converted)):
                row[f"machine_before_{model_kind}"] = machine_state()
                row[model_kind] = run_model(path, seqs, args)
            row["machine_after"] = machine_state()
            row["predicted"] = predictions(row, per_token, args)
            print(name, row["predicted"], flush=True)
            results["runs"].append(row)
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    plot(results, Path(args.out).with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(2, len(runs), figsize=(5 * len(runs), 7), squeeze=False)
    for column, run in enumerate(runs):
        for model, style in (("original", "o-"), ("converted", "s-")):
            seqs = run["seqs"]
            axes[0][column].plot(seqs, [run[model][str(n)]["step_ms"] for n in seqs], style, label=model)
            axes[1][column].plot(seqs, [run[model][str(n)]["decode_tok_per_s"] for n in seqs], style, label=model)
        axes[0][column].set_title(f"{run['pair']}, context {run['context']}")
        axes[0][column].set_ylabel("decode step (ms)")
        axes[1][column].set_ylabel("decode tok/s")
        for ax in axes[:, column]:
            ax.set_xlabel("running sequences")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        Path(sys.argv[3]).write_text(json.dumps(worker(json.loads(Path(sys.argv[2]).read_text()))))
    else:
        main()
