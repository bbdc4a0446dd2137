"""Peak memory of a compressed conversion on a random Llama model much larger than the reference model.

Builds the model (in its own process), then converts it in a fresh process (after a warm-up conversion of
a tiny model, so runtime one-off allocations are in the baseline) and measures that process's peak
resident memory (sampled every 10 ms: anonymous and file-backed) above its resident memory before the
conversion. The bound is what the streamed design needs: two decoder layers + the embeddings + the
calibration activations (hidden states, keys and values of all calibration tokens). Output shards are
streamed to disk (not held) and source tensors are read with plain file reads (nothing mapped).
Writes JSON.

    python benchmarks/memory/run.py            # ~2 minutes; writes benchmarks/memory/results.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPE = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024)
CALIB_TOKENS, SEQ_LEN, SHARD = 16384, 256, "64MB"


def build(path: str) -> None:
    from vllm_transmla.testing.tiny import build_tiny_model

    build_tiny_model("llama-tied", path, max_shard_size="256MB", tie_word_embeddings=False, **SHAPE)


def _rss_parts() -> dict:
    """Current anonymous and file-backed resident memory of this process (bytes)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")}


def measure(src: str, dst: str) -> dict:
    import threading
    import time

    import vllm_transmla  # noqa: F401  (imports before the baseline)
    from vllm_transmla.convert.pipeline import convert
    from vllm_transmla.testing.tiny import build_tiny_model

    # Warm-up: a tiny compressed conversion first, so the baseline already holds the runtime's one-off
    # allocations (BLAS / OpenMP buffers, tokenizer) and the peak measures what the conversion holds.
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_model("llama-rope3", f"{tmp}/tiny")
        convert(tiny, f"{tmp}/tiny-mla", kv_ratio=0.25, progress=False, calib_seq_len=64)
    base = _rss_parts()
    peak, done = dict(base), threading.Event()
    peak["total"] = base["total"] = base["RssAnon"] + base["RssFile"]

    def sample():  # anonymous memory is what the conversion holds; file pages are mapped files and
        while not done.is_set():  # libraries paged in on first use, which the kernel may drop
            parts = _rss_parts()
            parts["total"] = parts["RssAnon"] + parts["RssFile"]
            for key, value in parts.items():
                peak[key] = max(peak[key], value)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    convert(src, dst, kv_ratio=0.25, progress=False, calib_tokens=CALIB_TOKENS, calib_seq_len=SEQ_LEN,
            max_shard_size=SHARD)
    done.set()
    sampler.join()
    return {"baseline_rss_bytes": base["total"], "conversion_peak_rss_bytes": peak["total"] - base["total"],
            "conversion_peak_anon_bytes": peak["RssAnon"] - base["RssAnon"],
            "conversion_peak_file_backed_bytes": peak["RssFile"] - base["RssFile"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    parser.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:
        print(json.dumps(measure(*args._measure)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = f"{tmp}/src", f"{tmp}/dst"
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"import run; run.build({src!r})"], check=True)
        out = subprocess.run([sys.executable, __file__, "--_measure", src, dst], check=True, capture_output=True,
                             text=True).stdout
        measured = json.loads(out.strip().splitlines()[-1])
        params = sum(p.stat().st_size for p in Path(src).glob("*.safetensors")) // 4
    h, n_layers = SHAPE["hidden_size"], SHAPE["num_hidden_layers"]
    layer_bytes = (params - 2 * SHAPE["vocab_size"] * h) * 4 // n_layers
    kv_width = SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    bound = {"two_layers": 2 * layer_bytes, "embeddings": 2 * SHAPE["vocab_size"] * h * 4,
             "calibration_activations": CALIB_TOKENS * (h + 2 * kv_width) * 4}
    reference_params = 3_870_000
    result = {"model": {**SHAPE, "parameters": params, "x_reference_model": round(params / reference_params, 1),
                        "fp32_bytes": params * 4},
              "conversion": {"kv_ratio": 0.25, "calibration_tokens": CALIB_TOKENS, "max_shard_size": SHARD},
              **measured, "bound_bytes": {**bound, "total": sum(bound.values())},
              "within_bound_anon": measured["conversion_peak_anon_bytes"] < sum(bound.values()),
              "within_bound_rss": measured["conversion_peak_rss_bytes"] < sum(bound.values()),
              "note": "peaks above a baseline taken after a warm-up conversion of a tiny model (runtime one-off "
                      "allocations excluded); RSS = anonymous + file-backed"}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
