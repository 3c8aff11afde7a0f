"""Whether the device at hand computes bf16 natively, which decides what ``training.precision: auto`` uses.

Why it matters: bf16 autocast is fast only where the hardware has bf16 arithmetic. On a CPU that means the
AVX512-BF16 or AMX instructions (AMD Zen 4, Intel Sapphire Rapids and later; aarch64's BF16 extension); on an
AVX2-only CPU oneDNN emulates bf16 and a training step is several times slower than in fp32
(``benchmarks/bench_cpu_precision.py`` measures both). On CUDA it means compute capability 8.0 (Ampere) or
later, or any ROCm GPU.

Why two checks on a CPU: torch's own test (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) says whether oneDNN has a
bf16 path at all, but it also passes on AVX512 cores without bf16 instructions (Skylake, Cascade Lake), where
that path is emulated. Where the kernel lists the CPU's flags (``/proc/cpuinfo`` on Linux) one of the native
flags must be there too; elsewhere (macOS, Windows) torch's test is all there is.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
# x86: AVX512-BF16 and AMX-BF16 ("flags" lines); aarch64: FEAT_BF16 ("Features" lines)
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo_text: str) -> set[str]:
    """The feature flags of ``/proc/cpuinfo``'s text (x86 ``flags`` and aarch64 ``Features`` lines)."""
    flags: set[str] = set()
    for line in cpuinfo_text.splitlines():
        key, _, values = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(values.split())
    return flags


def cpu_has_native_bf16(
    cpuinfo: Path = CPUINFO, onednn_bf16: Callable[[], bool] = torch.ops.mkldnn._is_mkldnn_bf16_supported
) -> bool:
    """True where bf16 autocast on this CPU runs on bf16 instructions, not emulated (see the module docstring)."""
    if not onednn_bf16():
        return False
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True
    return bool(cpu_flags(text) & NATIVE_BF16_FLAGS)


def bf16_is_native(device: torch.device) -> bool:
    """True where ``device`` computes bf16 natively: a CUDA GPU with bf16 arithmetic, a CPU with bf16 instructions."""
    if device.type == "cuda":
        return torch.version.hip is not None or torch.cuda.get_device_properties(device).major >= 8
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def cpu_capability() -> str:
    """The widest vector instruction set torch's CPU kernels use here (``AVX2``, ``AVX512``, ``DEFAULT``...)."""
    return torch.backends.cpu.get_cpu_capability()
