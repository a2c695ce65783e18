"""CPU training: keep freed memory in the process for the next step instead of returning it.

glibc's malloc serves large blocks (above a threshold that grows to at most 32 MiB) with fresh
``mmap`` calls and returns them with ``munmap`` when freed, and it trims the heap's free top back
to the kernel. A training step frees its activations and allocates the same sizes again in the
next one, so the kernel has to map and zero them again, page by page: 30–40 thousand page faults
a step for the ``tiny`` preset with VGG-LPIPS and a PatchGAN at 128², about 5 % of the step on
this project's CPU machine (BENCHMARKS.md, issue 13). With mmap off and the trim threshold at
its maximum, the heap keeps what a step freed and the next step reuses it: no faults after the
first steps. PyTorch's own CPU launcher (``torch.backends.xeon.run_cpu``) gets the same effect by
preloading jemalloc or tcmalloc configured never to release memory.

The cost is that the process holds its peak memory until training ends; :func:`keeping_freed_memory`
then restores glibc's default thresholds and trims the heap. Other C libraries (musl, macOS,
Windows) are left alone. GPU runs do not need it: their activations live in CUDA's caching
allocator.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import platform

# mallopt parameters and glibc's defaults (malloc/malloc.c)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536
KEEP_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest free heap top kept, 2 GiB


def _glibc():
    """glibc as a ctypes library, or None where the C library is another one."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def keep_freed_memory(keep: bool) -> bool:
    """``keep``: serve every block from the heap and never trim it; else glibc's default
    thresholds, and the free heap top returned now. Returns whether glibc took the settings."""
    libc = _glibc()
    if libc is None:
        return False
    mmap_max, trim = (0, KEEP_TRIM_THRESHOLD) if keep else (DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD)
    taken = libc.mallopt(M_MMAP_MAX, mmap_max) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim) == 1
    if not keep:
        libc.malloc_trim(0)
    return taken


@contextlib.contextmanager
def keeping_freed_memory(enabled: bool):
    """``with keeping_freed_memory(on):`` a training run; yields whether it is in effect. On exit
    glibc's default thresholds are set again (the fixed ones: its dynamic mmap threshold, once
    overridden, stays off for the rest of the process) and the kept memory is given back."""
    active = keep_freed_memory(True) if enabled else False
    try:
        yield active
    finally:
        if active:
            keep_freed_memory(False)
