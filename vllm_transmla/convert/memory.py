"""Keep the converter's resident memory at what it holds.

glibc's malloc raises its mmap threshold each time a large mmapped block is freed, after which blocks
of that size come from the heap and stay resident once freed. A converter that allocates and frees a
layer's worth of tensors per layer then looks - and, for the kernel, is - as large as everything it
ever allocated. Pinning the threshold keeps large tensors in mmapped blocks that go back to the
system when freed. Measured on benchmarks/memory: peak anonymous memory 279 MB -> 214 MB.

The pin cannot be undone (glibc stops adjusting both thresholds once one is set), and left at 1 MiB it
slows whatever runs next in the process: a fine-tune after a conversion in the same process spent two
thirds of its time in the kernel, page-faulting fresh activations (19 s a step against 9). So after
the conversion both thresholds go to the ceilings glibc's own adjustment reaches (32 / 64 MiB).
"""

from __future__ import annotations

import ctypes
import ctypes.util

import contextlib

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
THRESHOLD_BYTES = 1 << 20
RELAXED_MMAP_BYTES, RELAXED_TRIM_BYTES = 32 << 20, 64 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX and 2x it


def _mallopt(param: int, value: int) -> bool:
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        return bool(ctypes.CDLL(name).mallopt(param, value))
    except (OSError, AttributeError):
        return False


def return_large_blocks_to_the_system() -> bool:
    """Pin glibc's mmap threshold at 1 MiB (process-wide); False where the C library is not glibc."""
    return _mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES)


@contextlib.contextmanager
def large_blocks_returned():
    """The 1 MiB pin for the block inside, the relaxed thresholds after it."""
    pinned = return_large_blocks_to_the_system()
    try:
        yield
    finally:
        if pinned:
            _mallopt(M_MMAP_THRESHOLD, RELAXED_MMAP_BYTES)
            _mallopt(M_TRIM_THRESHOLD, RELAXED_TRIM_BYTES)
