"""Process settings that speed up CPU training without changing any number.

Two of them concern threads. ``import dens`` (before torch) sets ``OMP_WAIT_POLICY=PASSIVE`` unless the
environment sets it: OpenMP threads that finish a parallel region early then sleep instead of spinning,
so that a step does not collapse when another process (a data worker, another job) holds a core
(:func:`openmp_wait_policy`, ``docs/performance.md``). :func:`training_threads` is the trainer's default
thread count: the usable cores less the data workers.

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
import os
import sys

import torch

__all__ = ["openmp_wait_policy", "retain_freed_memory", "training_threads", "usable_cores"]

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


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a Slurm or container limit)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def training_threads(num_workers: int = 0) -> int:
    """Intra-op threads for a training process with ``num_workers`` data workers.

    The usable cores less one per worker (each worker runs one thread; more threads than cores make
    every parallel region wait for a descheduled thread), at most torch's current count (which
    ``OMP_NUM_THREADS`` or ``torch.set_num_threads`` may have lowered), at least 1.

    Examples
    --------
    >>> training_threads(num_workers=10**6)
    1
    """
    return max(1, min(torch.get_num_threads(), usable_cores() - num_workers))


def openmp_wait_policy() -> str:
    """The OpenMP wait policy torch's threads run with: ``OMP_WAIT_POLICY`` as it was when torch loaded
    (``import dens`` sets ``PASSIVE`` when torch is not loaded yet and the variable is unset), else
    ``"unset"`` (libgomp spins about 0.3 ms before sleeping)."""
    return os.environ.get("OMP_WAIT_POLICY", "unset")
