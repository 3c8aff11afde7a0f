"""Keep freed host memory in the process, so that CPU training does not page-fault its way through every step.

PyTorch's CPU allocator has no cache: every tensor is malloc'ed and freed. glibc's malloc serves large blocks with
``mmap`` and trims the top of its heap, so each step's activations and gradients come back as fresh pages that the
kernel must fault in and zero. On this project's 2-core CPU machines a MiniLM-L6 CARL step on AG's News took
110,000-220,000 page faults and FreeLB's 40,000-160,000, every step; with mmap and trimming off, freed blocks are
reused and after the first steps none are taken (``benchmarks/bench_steps.py --release-host-memory`` measures the
difference). PyTorch's CPU tuning guide gets the same with jemalloc or tcmalloc through ``LD_PRELOAD``; this needs
no library. Numbers are unchanged: only where tensors are placed changes. The process keeps its peak footprint
until it exits, which a training or attack job does anyway; ``CARLRAR_HOST_MEMORY=release`` leaves glibc's default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from carlrar.errors import CarlrarError

ENV = "CARLRAR_HOST_MEMORY"
# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
KEEP_UP_TO = 2**31 - 1  # bytes of free heap top kept before trimming (mallopt takes a C int)
TOP_PAD = 64 * 2**20  # extra bytes asked of the kernel each time the heap grows: fewer, larger brk calls


def keep_host_memory(environ: dict[str, str] | None = None) -> bool:
    """Tell glibc's malloc to serve every block from its heap and never give freed memory back to the kernel.

    Returns whether it took effect: False where ``CARLRAR_HOST_MEMORY=release`` or the C library is not glibc.
    Safe to call more than once; call it before the work whose allocations it should cover.
    """
    mode = (environ if environ is not None else os.environ).get(ENV, "keep")
    if mode not in ("keep", "release"):
        raise CarlrarError(f"{ENV}={mode!r}: use keep (the default) or release")
    if mode == "release":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    return all(mallopt(p, v) == 1 for p, v in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_UP_TO), (M_TOP_PAD, TOP_PAD)))
