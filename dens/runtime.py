"""Process settings that speed up CPU training without changing any number.

Training allocates and frees the same large tensors (tens of MB: per-edge features of every block) at
every step. glibc's malloc serves blocks above a threshold (at most 32 MB by default) with a fresh
``mmap`` and returns them to the system on ``free``, so the first write to every page of every such
tensor is a page fault that the kernel must zero-fill. On the 2-core machines of this project that made a
60 MB ``clone`` take 16 ms instead of 5 ms, and an EquiformerV2 OC20-2M training step 1.7x slower (README,
*Performance*). :func:`retain_freed_memory` makes malloc serve such blocks from its heap and keep freed
memory for reuse, which is what CUDA's caching allocator does for GPU memory: after a few steps the heap
holds the step's working set and the steps stop page-faulting (``tests/test_runtime.py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["retain_freed_memory"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_M_MMAP_THRESHOLD = -3
_applied = False


def retain_freed_memory(max_block: int = 1 << 30) -> bool:
    """Keep freed CPU memory in the process for reuse instead of unmapping it (glibc only).

    Sets glibc's ``M_MMAP_THRESHOLD`` to ``max_block`` bytes (blocks up to that size come from the heap;
    older glibc caps it at 32 MB, and then ``M_MMAP_MAX = 0`` serves every block from the heap
    instead) and ``M_TRIM_THRESHOLD`` to twice that (free memory is not handed back below it). It affects
    the whole process, from the call on, and only speed and resident memory: the resident size stays near
    its peak after large tensors are freed. The first successful call's settings stay. The trainer calls
    it when it trains on the CPU (``trainer.retain_freed_memory``).

    Parameters
    ----------
    max_block : int
        Largest block, in bytes, served from the heap (below 2 GiB).

    Returns
    -------
    bool
        True if glibc accepted the settings; False elsewhere (macOS, Windows, musl), where nothing
        changes.

    Examples
    --------
    >>> retain_freed_memory() in (True, False)
    True
    """
    global _applied
    if not 0 < max_block < 2**31:
        raise ValueError(f"max_block must be between 1 byte and 2 GiB, got {max_block}")
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    heap_only = mallopt(_M_MMAP_THRESHOLD, max_block) == 1 or mallopt(_M_MMAP_MAX, 0) == 1
    _applied = heap_only and mallopt(_M_TRIM_THRESHOLD, min(2 * max_block, 2**31 - 1)) == 1
    if not _applied:
        logger.info("glibc refused the malloc settings; freed memory is unmapped as usual")
    return _applied
