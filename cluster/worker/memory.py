"""The C allocator's settings for a training process: keep freed memory for the next step."""

from __future__ import annotations

import ctypes
import platform

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Have this process's C allocator keep the memory a training step frees, for the next step.

    glibc serves every large allocation with a mapping of its own and unmaps it on free, so each step's
    activations, gradients and temporaries would come back as fresh pages that the kernel faults in and
    zeroes, page by page, every step. With large blocks taken from the heap and the heap never trimmed,
    the process keeps its peak footprint instead, which a training worker reaches every step anyway (see
    docs/performance.md for the measurement). On threads other than the main one, glibc's per-thread
    arenas still unmap each heap that falls empty: Ray Train runs the loop on such a thread, so torch's
    Ray processes start with one arena (``MALLOC_ARENA_MAX=1``, in the framework's environment,
    ``cluster.frameworks``). Returns whether the allocator took the settings (False where it is not glibc's).
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
