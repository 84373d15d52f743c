"""What this CPU can do fast (bf16 and int8 dot products, from its feature flags) and glibc's memory reuse switch."""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# CPU flags of int8 dot-product instructions: without one, int8 convolutions are emulated and slow.
INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux); None where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return None


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16).

    Without them oneDNN emulates bf16 and runs slower than fp32, so "auto" must not pick it.
    """
    flags = cpu_flags()
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    # No /proc/cpuinfo (macOS, Windows): trust oneDNN's own check where it has one.
    checker = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(checker is not None and checker() and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))


def cpu_has_int8_dot() -> bool:
    """True when the CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    flags = cpu_flags()
    if flags is None:  # no /proc/cpuinfo (macOS, Windows): trust oneDNN's view of the ISA
        return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")
    return bool(flags & INT8_FLAGS)


@functools.cache
def reuse_freed_memory() -> bool:
    """Make glibc keep freed large blocks in the heap for reuse instead of unmapping them.

    By default glibc serves every allocation over 32 MB (at most) with a fresh ``mmap`` and
    returns it on free, so each large activation costs page faults on first touch: measured
    here, copying a 51 MB tensor took 15.5 ms instead of 3 ms, and a 1x1 conv writing one 32 ms
    instead of 17 ms. This raises the mmap and trim thresholds (``mallopt``) once per process:
    the process keeps its peak memory mapped. Returns False where it does not apply (no glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    applied = mallopt(m_mmap_threshold, 1 << 30) == 1 and mallopt(m_trim_threshold, (1 << 31) - 1) == 1
    log.debug("glibc mallopt: keep freed memory for reuse: %s", applied)
    return applied
