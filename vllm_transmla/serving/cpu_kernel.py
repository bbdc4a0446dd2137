"""The fused CPU kernels: absorbed latent decode (`csrc/latent_decode.c`) and prefill attention
(`csrc/prefill_attention.c`), built with the system C compiler on first use, cached, and called through
ctypes.

Plain C rather than a torch extension: it compiles in about a second (no torch headers, no ninja), and
linking `-fopenmp` after torch is loaded binds it to torch's own libgomp, so it runs on the same
(vLLM-pinned) OpenMP threads as torch. Where it cannot be used (not x86-64 with AVX2/FMA/F16C, no
compiler, `VLLM_TRANSMLA_CPU_KERNEL=0`), `available()` is False and the backend keeps its torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

from .. import envs

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "latent_decode.c", CSRC / "prefill_attention.c"]
HEADERS = [CSRC / "tile_ops.h"]
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ENV_SWITCH = "VLLM_TRANSMLA_CPU_KERNEL"


def cache_dir() -> Path:
    return envs.cache_root() / "kernels"


def _cpu_has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c"))


def _build(compiler: str) -> Path:
    """Compile the kernel once per (source, flags, compiler) into the cache; concurrent builders (tensor
    parallel workers) each write a temporary file and rename it into place."""
    source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256(source + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    target = cache_dir() / f"transmla_kernels-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, *map(str, SOURCES)], capture_output=True, text=True, check=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def compiler() -> str | None:
    """The C compiler the kernels are built with: $CC, else cc, else gcc (None when there is none)."""
    return envs.c_compiler()


@functools.cache
def _library() -> ctypes.CDLL | None:
    if not envs.cpu_kernel_enabled() or not _cpu_has_avx2():
        return None
    compiler_path = compiler()
    if compiler_path is None:
        logger.warning("transmla: no C compiler found; attention runs on the slower torch paths")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler_path)))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        logger.warning("transmla: building the CPU kernels failed (%s); using the torch paths", detail[-500:])
        return None
    return _declare(lib)


# The ctypes signature of each exported kernel function (pointers as void*, so 64-bit addresses pass
# intact); `_check_against_sources` compares them with the C prototypes at load.
SIGNATURES = {
    "latent_decode": (ctypes.c_int, [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]),
    "latent_decode_workspace_floats": (ctypes.c_long, [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                                       ctypes.c_int, ctypes.c_int]),
    "prefill_attention": (ctypes.c_int, [
        ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int,
        ctypes.c_int]),
}
C_TYPES = {"int": ctypes.c_int, "long": ctypes.c_long, "float": ctypes.c_float}


def c_prototypes() -> dict[str, tuple]:
    """(return type, [argument types]) of every non-static function defined in SOURCES, as ctypes types
    (any pointer is c_void_p)."""
    import re

    found = {}
    for source in SOURCES:
        text = re.sub(r"/\*.*?\*/", "", source.read_text(), flags=re.S)
        for ret, name, args in re.findall(r"^(int|long|float|void)\s+(\w+)\(([^)]*)\)\s*\{", text, flags=re.M):
            types = []
            for arg in args.split(","):
                arg = arg.strip()
                types.append(ctypes.c_void_p if "*" in arg else C_TYPES[arg.rsplit(None, 1)[0].split()[-1]])
            found[name] = (C_TYPES.get(ret), types)
    return found


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    prototypes = c_prototypes()
    for name, (restype, argtypes) in SIGNATURES.items():
        if prototypes.get(name) != (restype, argtypes):
            raise RuntimeError(f"transmla: the ctypes signature of {name} does not match its C prototype in "
                               f"serving/csrc ({prototypes.get(name)}): fix cpu_kernel.SIGNATURES")
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


def available() -> bool:
    return _library() is not None


def fused_latent_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float, kv_lora_rank: int, workspace) -> torch.Tensor:
    """`paged_latent_decode` in one fused pass: q [B, H, W], kv_cache [blocks, block_size, W] (fp32, bf16
    or fp16), block_table [B, max_blocks], seq_lens [B] -> [B, H, R] in the cache dtype.

    `workspace(name, numel, dtype, device)` hands out reused buffers (no per-step page faults)."""
    lib = _library()
    assert lib is not None, "the CPU decode kernel is not available here"
    batch, heads, width = q.shape
    padded = -(-width // 8) * 8
    threads = torch.get_num_threads()
    q_in = workspace("kernel_q", batch * heads * padded, torch.float32, q.device).view(batch, heads, padded)
    q_in[..., width:].zero_()
    q_in[..., :width].copy_(q).mul_(scale)
    table = block_table if block_table.dtype == torch.int32 else block_table.int()
    table = table.contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    floats = lib.latent_decode_workspace_floats(batch, lens.data_ptr(), heads, width, kv_lora_rank, threads)
    scratch = workspace("kernel_scratch", floats, torch.float32, q.device)
    out = torch.empty(batch, heads, kv_lora_rank, dtype=torch.float32, device=q.device)
    cache = kv_cache
    assert cache.is_contiguous(), "the paged latent cache must be contiguous"
    status = lib.latent_decode(q_in.data_ptr(), cache.data_ptr(), DTYPE_CODES[cache.dtype], cache.shape[1], width,
                               kv_lora_rank, table.data_ptr(), table.shape[1], lens.data_ptr(), batch, heads,
                               out.data_ptr(), scratch.data_ptr(), threads)
    if status != 0:
        raise RuntimeError(f"transmla CPU decode kernel failed with status {status}")
    return out.to(kv_cache.dtype)


def prefill_supported(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `fused_prefill_attention` takes these inputs (fp32 on CPU, d_v a multiple of 8)."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and v.dtype == torch.float32
            and v.shape[-1] % 8 == 0 and available())


def fused_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                            return_lse: bool, workspace) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`backend.chunked_attention` in one fused pass: q [H, Tq, d_qk], k [H, Tk, d_qk], v [H, Tk, d_v]
    (fp32, any head/token strides) -> out [H, Tq, d_v] and lse [H, Tq] (None unless asked).

    K is copied once, transposed tile by tile, into a workspace [H, Tk / 32 (padded), d_qk, 32]: the
    kernel's score block reads 32 keys of one dimension as 4 vectors from one contiguous tile."""
    lib = _library()
    assert lib is not None, "the CPU kernels are not available here"
    heads, queries, dqk = q.shape
    keys, dv = k.shape[1], v.shape[-1]
    padded = -(-keys // 32) * 32
    key_t = workspace("kernel_key_t", heads * dqk * padded, torch.float32, q.device).view(heads, padded // 32, dqk, 32)
    tiles = key_t.transpose(2, 3)  # [H, tiles, 32, d_qk]: the same memory, key-major
    full, rest = divmod(keys, 32)
    tiles[:, :full].copy_(k[:, :full * 32].unflatten(1, (full, 32)))
    if rest:
        tiles[:, full, :rest].copy_(k[:, full * 32:])
        tiles[:, full, rest:].zero_()
    if q.stride(-1) != 1:
        q = q.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    out = torch.empty(heads, queries, dv, dtype=torch.float32, device=q.device)
    lse = torch.empty(heads, queries, dtype=torch.float32, device=q.device) if return_lse else None
    status = lib.prefill_attention(q.data_ptr(), q.stride(0), q.stride(1), key_t.data_ptr(), key_t.stride(0), padded,
                                   v.data_ptr(), v.stride(0), v.stride(1), out.data_ptr(), out.stride(0), out.stride(1),
                                   lse.data_ptr() if lse is not None else None, heads, queries, keys, dqk, dv,
                                   float(scale), int(causal), torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"transmla CPU prefill kernel failed with status {status}")
    return out, lse
