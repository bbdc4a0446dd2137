"""A/B of the fused CPU decode kernel: this checkout's `csrc/` against the same files at another git
revision, both compiled with the plugin's compiler and flags and called in turn in one process.

This machine is shared and its speed drifts by tens of percent within minutes, so two separate
`decode_step.py` runs cannot resolve a kernel change of a few percent; alternating the two builds call
by call exposes both to the same moments. Outputs are checked against each other on every shape.

    .venv/bin/python benchmarks/speed/kernel_ab.py --base HEAD~1          # ~1 minute; kernel_ab.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from vllm_transmla.serving import cpu_kernel
from vllm_transmla.serving.latent_math import workspace as _workspace

ROOT = Path(__file__).resolve().parents[2]


def build(sources: list[Path], out: Path) -> ctypes.CDLL:
    compiler = cpu_kernel.compiler()
    if compiler is None:
        raise SystemExit("kernel_ab.py needs a C compiler ($CC, cc or gcc)")
    subprocess.run([compiler, *cpu_kernel.FLAGS, "-o", str(out), *map(str, sources)], check=True)
    return cpu_kernel._declare(ctypes.CDLL(str(out)))


def sources_at(revision: str, into: Path) -> list[Path]:
    """The kernel sources and headers as they were at `revision`, written under `into`."""
    for path in cpu_kernel.SOURCES + cpu_kernel.HEADERS:
        relative = path.relative_to(ROOT).as_posix()
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{relative}"], check=True,
                              capture_output=True).stdout
        (into / path.name).write_bytes(text)
    return [into / path.name for path in cpu_kernel.SOURCES]


def revision(name: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", name], capture_output=True,
                          text=True).stdout.strip()


def decode(lib: ctypes.CDLL, *args) -> torch.Tensor:
    # fused_latent_decode looks its library up through cpu_kernel._library; point it at this build
    cpu_kernel._library = lambda: lib
    return cpu_kernel.fused_latent_decode(*args, _workspace)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare with (e.g. HEAD~1)")
    parser.add_argument("--heads", type=int, nargs="+", default=[16, 8])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 6016])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--block-size", type=int, default=128,
                        help="tokens per cache block (vLLM's CPU default, which the plugin keeps for our models)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("kernel_ab.json")))
    args = parser.parse_args()
    rank, width, block = 512, 576, args.block_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "base").mkdir()
        libs = {"base": build(sources_at(args.base, tmp / "base"), tmp / "base.so"),
                "current": build(cpu_kernel.SOURCES, tmp / "current.so")}
        torch.manual_seed(0)
        for heads in args.heads:
            for context in args.contexts:
                for dtype in (torch.float32, torch.bfloat16):
                    blocks = args.batch * context // block
                    cache = torch.randn(blocks, block, width).to(dtype)
                    table = torch.randperm(blocks).view(args.batch, -1).int()
                    lens = torch.full((args.batch,), context, dtype=torch.int32)
                    q = torch.randn(args.batch, heads, width)
                    call = (q, cache, table, lens, width ** -0.5, rank)
                    outputs = {name: decode(lib, *call) for name, lib in libs.items()}  # also the warm-up
                    torch.testing.assert_close(outputs["current"], outputs["base"], rtol=1e-2, atol=1e-3)
                    times = {name: [] for name in libs}
                    for _ in range(args.rounds):
                        for name, lib in libs.items():
                            start = time.perf_counter()
                            decode(lib, *call)
                            times[name].append(time.perf_counter() - start)
                    flops = 2 * args.batch * context * heads * (width + rank)
                    row = {"heads": heads, "batch": args.batch, "context": context, "cache_dtype": str(dtype)}
                    for name, values in times.items():
                        median = sorted(values)[len(values) // 2]
                        row[f"{name}_ms"] = round(median * 1e3, 3)
                        row[f"{name}_gflops"] = round(flops / median / 1e9, 1)
                    row["base_over_current"] = round(row["base_ms"] / row["current_ms"], 3)
                    rows.append(row)
                    print(row, flush=True)
    result = {"base": f"{args.base} ({revision(args.base)})", "current": revision("HEAD"),
              "threads": torch.get_num_threads(), "rounds": args.rounds, "block_size": block, "runs": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
