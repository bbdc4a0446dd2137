"""Offline vLLM jobs in a fresh process each: `python -m vllm_transmla.testing.offline JOB.json OUT.json`.

The demo and the tests run every engine in a subprocess of its own (vLLM's engine processes need a
`__main__` guard, and a fresh process frees the engine's memory for the next one). A job gives the
engine arguments, prompts (token ids) and sampling settings; the result has tokens, top-k logprobs, a
per-request timeline and vLLM's own KV-cache configuration (use_mla, head size, blocks that fit the KV
budget).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    engine_args = dict(model=job["model"], dtype=job.get("dtype", "float32"), seed=0,
                       gpu_memory_utilization=job.get("gpu_memory_utilization", 0.5),
                       max_model_len=job.get("max_model_len", 256),
                       enforce_eager=job.get("enforce_eager", True),
                       tensor_parallel_size=job.get("tp", 1), max_num_seqs=job.get("max_num_seqs", 16),
                       disable_log_stats=False)
    if job.get("kv_cache_memory_bytes"):
        engine_args["kv_cache_memory_bytes"] = job["kv_cache_memory_bytes"]
    for key in ("enable_chunked_prefill", "enable_prefix_caching", "max_num_batched_tokens", "block_size",
                "hf_overrides"):
        if key in job:  # else vLLM's defaults
            engine_args[key] = job[key]
    llm = LLM(**engine_args)
    params = SamplingParams(max_tokens=job.get("max_tokens", 32), temperature=0.0,
                            ignore_eos=job.get("ignore_eos", True), logprobs=job.get("logprobs", 5))
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    if job.get("warmup"):  # one short request first, so timings leave out first-call costs
        llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), use_tqdm=False)
    # "solo": indices of prompts to generate one at a time first (batch-composition checks)
    solo = {str(i): _completions(llm.generate(prompts[i:i + 1], params, use_tqdm=False))[0]
            for i in job.get("solo", [])}
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = {"outputs": _completions(outs), "generate_seconds": time.perf_counter() - start,
              "timeline": _timeline(outs)}
    if solo:
        result["solo_outputs"] = solo
    engine = llm.llm_engine
    model_config = engine.vllm_config.model_config
    cache_config = engine.vllm_config.cache_config
    scheduler_config = engine.vllm_config.scheduler_config
    result.update(
        enable_chunked_prefill=bool(scheduler_config.enable_chunked_prefill),
        enable_prefix_caching=bool(cache_config.enable_prefix_caching),
        max_num_batched_tokens=scheduler_config.max_num_batched_tokens,
        prefix_cache_hits=_counter(llm, "vllm:prefix_cache_hits"),
        use_mla=bool(model_config.use_mla),
        head_size=model_config.get_head_size(),
        num_kv_heads=model_config.get_num_kv_heads(engine.vllm_config.parallel_config),
        num_gpu_blocks=cache_config.num_gpu_blocks,
        block_size=cache_config.block_size,
        num_preemptions=_num_preemptions(llm),
    )
    return result


def _completions(outs) -> list[dict]:
    """Token ids and per-step top-k logprobs of each request's first completion."""
    return [{"token_ids": list(out.outputs[0].token_ids),
             "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in out.outputs[0].logprobs or []]}
            for out in outs]


def _timeline(outs) -> list[dict] | None:
    """Per request, in prompt order: seconds from the first request's queueing to its first scheduling,
    first token and last token, and how often it was preempted (vLLM's own per-request stats). It shows
    how many sequences ran at once over a job, e.g. a straggler decoding alone at the end. None where
    vLLM kept no stats."""
    stats = [out.metrics for out in outs]
    if any(m is None or not m.last_token_ts for m in stats):
        return None
    t0 = min(m.queued_ts for m in stats)
    return [{"scheduled_s": round(m.scheduled_ts - t0, 3), "first_token_s": round(m.first_token_ts - t0, 3),
             "last_token_s": round(m.last_token_ts - t0, 3), "preemptions": m.num_preemptions} for m in stats]


def _num_preemptions(llm) -> int:
    """Requests preempted (KV cache ran out) during the job, from vLLM's own metrics."""
    return _counter(llm, "vllm:num_preemptions")


def _counter(llm, name: str) -> int:
    """One of vLLM's own counters, summed over its label sets."""
    return int(sum(m.value for m in llm.get_metrics() if m.name == name))


def run_in_subprocess(job: dict, env: dict | None = None, timeout: float = 900,
                      engine_process: str = "inline") -> dict:
    """Run `job` in a fresh Python process and return its result; raises with the engine's log tail.

    engine_process "inline" runs vLLM's engine core inside that process (VLLM_ENABLE_V1_MULTIPROCESSING=0);
    "separate" keeps vLLM's default of a process of its own. On a small CPU the separate process imports
    vLLM a second time and competes with the front end's polling: a tiny-model job took 39 s there against
    16 s inline. `vllm serve` always runs it separately (tests/test_vllm_server.py covers that path).
    """
    if engine_process not in ("inline", "separate"):
        raise ValueError(f"engine_process must be 'inline' or 'separate', not {engine_process!r}")
    base = dict(os.environ)
    if engine_process == "inline":
        base["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", "vllm_transmla.testing.offline", str(job_path), str(out_path)],
                              env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"vLLM job failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return json.loads(out_path.read_text())


if __name__ == "__main__":
    job = json.loads(open(sys.argv[1]).read())
    with open(sys.argv[2], "w") as f:
        json.dump(run(job), f)
