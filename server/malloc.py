"""glibc malloc tuned for a server that keeps and frees blocks of hundreds of KB to tens of MB.

glibc serves an allocation from its heap below `M_MMAP_THRESHOLD` and with its own `mmap` above
it, and by default it raises that threshold to the size of any mmapped chunk it frees (up to
32 MB). After the RAM cache evicts its first 1.7 MB block, every later block buffer of that size
or less comes from the heap, where freed holes are rarely returned to the system: the process
grows past what it holds. Measured with the paper-scale bank and a full 6 GiB cache
(docs/results.md, "Paper scale"): anonymous memory beyond the cache's bytes was 1.54 GB with
the default and 1.28 GB with the threshold fixed at 128 KiB, the 1.16 GB of a fresh server plus
0.12 GB. `mallopt(M_MMAP_THRESHOLD, ...)` fixes it and turns the adjustment off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD = 128 * 1024  # glibc's own default, kept fixed


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (no dynamic raise); False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    if not ok:
        log.warning("mallopt(M_MMAP_THRESHOLD, %d) failed; memory may fragment", threshold)
    return ok
