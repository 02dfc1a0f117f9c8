"""Host memory allocator settings for training on the CPU.

PyTorch takes CPU tensor memory from the C library's ``malloc``. With glibc's defaults, the freed
memory of a training step's activations and gradients is handed back to the operating system at
the end of the step (the top of the heap is trimmed, big blocks are unmapped) and taken again in
the next one, where every page of it faults on first touch: tens of thousands of page faults per
step for a CIFAR ResNet at batch 64. What a step costs then depends on how its allocations happen
to interleave; on 2 cores, SoTeacher's step measured 5-6% slower than the standard one with the
defaults and 0.7-0.9% slower with the settings below, which keep freed memory in the process for
the next step (see BENCHMARKS.md, "Throughput").

:func:`tune_cpu_allocator` applies them with ``mallopt``; the ``soteacher`` command does so when
it starts, unless the environment has ``SOTEACHER_MALLOC=default``. In your own training script,
call it once at the start (it is a no-op off glibc). The cost is memory the process keeps after a
peak instead of returning it: at most what the step needs anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_cpu_allocator", "ALLOCATOR_ENV"]

#: Environment variable; ``default`` leaves the C library's allocator settings alone.
ALLOCATOR_ENV = "SOTEACHER_MALLOC"

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

_MIB = 1 << 20


def _glibc_mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        gnu_get_libc_version = libc.gnu_get_libc_version     # present in glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    del gnu_get_libc_version
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def tune_cpu_allocator(trim_threshold_mb: int = 1024, top_pad_mb: int = 64,
                       mmap_threshold_mb: int = 32) -> bool:
    """Keep freed host memory in the process instead of returning it to the OS after each step.

    Sets glibc's ``M_MMAP_THRESHOLD`` (blocks above it get their own mapping, unmapped when freed;
    32 MB is glibc's largest allowed value), ``M_TRIM_THRESHOLD`` (free memory at the top of the
    heap beyond it is returned) and ``M_TOP_PAD`` (extra memory taken with every heap growth).
    Returns True when the settings were applied, False where there is no glibc (macOS, Windows,
    musl) or ``SOTEACHER_MALLOC=default`` is set. Process-wide; call it once, before training.
    """
    if os.environ.get(ALLOCATOR_ENV, "").strip().lower() == "default":
        return False
    for name, value in (("trim_threshold_mb", trim_threshold_mb), ("top_pad_mb", top_pad_mb),
                        ("mmap_threshold_mb", mmap_threshold_mb)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2048:
            raise ValueError(f"{name} must be a whole number of MB in 1..2047, got {value!r}")
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    settings = ((_M_MMAP_THRESHOLD, mmap_threshold_mb), (_M_TRIM_THRESHOLD, trim_threshold_mb),
                (_M_TOP_PAD, top_pad_mb))
    return all([mallopt(param, mb * _MIB) == 1 for param, mb in settings])   # every one applied
