"""glibc's malloc, told to keep the memory a forward pass frees for the next one.

A prompt's pass allocates and frees temporaries of 0.1-30 MB (activations, the GEMMs' packed
panels, attention's scores). By default glibc serves each from a fresh mmap once it is above
its threshold, and gives the top of its heap back to the kernel once 2x that is free there, so
every pass faults its temporaries in again, page by page; in a VM each fault is dear. Raising
both thresholds keeps them: GPT-2-small q8's first 128-token prefill in a process 109 -> 57 ms
(later ones ~50 -> ~47), f32 119 -> 101, bf16 90 -> 81. The cost: up to TRIM bytes of freed
heap stay mapped. Left alone where the environment already sets glibc's malloc tunables, and
off glibc (mallopt is then missing or a no-op).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters
MMAP = 32 << 20    # allocations below this come from the heap (glibc's largest allowed on 64-bit)
TRIM = 256 << 20   # free memory at the heap's top kept up to this

_tuned: bool | None = None


def keep_temporaries() -> bool:
    """Raise glibc's mmap and trim thresholds, once per process. -> whether they are ours."""
    global _tuned
    if _tuned is None:
        _tuned = False
        env = os.environ
        if sys.platform.startswith("linux") and not ("MALLOC_MMAP_THRESHOLD_" in env or "MALLOC_TRIM_THRESHOLD_" in env
                                                     or "glibc.malloc" in env.get("GLIBC_TUNABLES", "")):
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _tuned = bool(mallopt(M_MMAP_THRESHOLD, MMAP)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM))
    return _tuned
