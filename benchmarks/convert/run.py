"""How long a conversion of the real model takes on this machine, and its peak memory.

Each case runs `transmla convert` on SmolLM2-135M-Instruct's GGUF file (`transmla fetch`) in a fresh
process and records wall time and that process's peak resident memory (getrusage of the child). The
compressed cases calibrate on the converter's default text (32,768 tokens). Writes JSON.

    python benchmarks/convert/run.py          # ~10 minutes on 2 cores; writes benchmarks/convert/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_transmla.real_model import LICENSE_TEXTS

CASES = {
    "exact": [],
    "compressed 50%": ["--kv-ratio", "0.5"],
    "compressed 25%": ["--kv-ratio", "0.25"],
    "compressed 25%, --freqfold auto": ["--kv-ratio", "0.25", "--freqfold", "auto"],
    "compressed 25%, --freqfold auto --rank-allocation measured": ["--kv-ratio", "0.25", "--freqfold", "auto",
                                                                    "--rank-allocation", "measured"],
    "compressed 25%, --refine-epochs 4": ["--kv-ratio", "0.25", "--refine-epochs", "4"],
    # the calibration budget of the quality comparison with the public converter: 14,848 tokens of license text
    "compressed 50%, license calibration": ["--kv-ratio", "0.5", "--calib", *LICENSE_TEXTS],
    "compressed 25%, license calibration": ["--kv-ratio", "0.25", "--calib", *LICENSE_TEXTS],
}
# Runs one command and prints its peak resident memory (KiB, Linux) as the last line.
PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", help="source checkpoint or GGUF file (default: SmolLM2's GGUF, fetched)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    parser.add_argument("--keep", action="store_true", help="keep the other cases already in --out")
    args = parser.parse_args()
    if args.src:
        src = args.src
    else:
        from vllm_transmla.real_model import fetch_smollm2

        src = str(fetch_smollm2().gguf)
    transmla = str(Path(sys.executable).with_name("transmla"))
    runs = []
    if args.keep and Path(args.out).exists():
        runs = [r for r in json.loads(Path(args.out).read_text())["runs"] if r["case"] not in args.cases]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            argv = [transmla, "convert", src, f"{tmp}/out", "--overwrite", "--quiet", *CASES[name]]
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", PEAK, *argv], capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            shown = [a.replace("/usr/share/common-licenses/", "") for a in CASES[name]]
            runs.append({"case": name, "command": " ".join(["transmla", "convert", "SRC", "DST", *shown]),
                         "seconds": round(seconds, 1), "peak_rss_mb": round(int(done.stdout.split()[-1]) / 1024, 1)})
            print(json.dumps(runs[-1]), flush=True)
            _write(args.out, src, runs, complete=len(runs) == len(CASES))  # after every case: a stop keeps them


def _write(out: str, src: str, runs: list[dict], complete: bool) -> None:
    plain = next((r["seconds"] for r in runs if r["case"] == "compressed 25%"), None)
    for r in runs:
        r["vs_plain_compressed"] = round(r["seconds"] / plain, 2) if plain else None
    machine = {"cpus": os.cpu_count(), "python": platform.python_version()}
    result = {"source": src.replace(str(Path.home()), "~"), "machine": machine, "runs": runs}
    if not complete:
        result["partial"] = "the run stopped before every case was measured"
    Path(out).write_text(json.dumps(result, indent=2) + "\n")

if __name__ == "__main__":
    main()
