"""Process settings that speed up CPU training without changing any number.

Two of them concern threads. ``import dens`` (before torch) sets ``OMP_WAIT_POLICY=PASSIVE`` unless the
environment sets it: OpenMP threads that finish a parallel region early then sleep instead of spinning,
so that a step does not collapse when another process (a data worker, another job) holds a core
(:func:`openmp_wait_policy`, ``docs/performance.md``). :func:`training_threads` is the trainer's default
thread count: the usable cores less the data workers, or fewer where fewer are faster: a small model's
step (hundreds of small operations, each a parallel region that wakes and waits for every thread) can be
slower with two sleeping threads than with one, and :class:`ThreadChoice` lets the trainer measure that
on its first steps.

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
import statistics
import sys

import torch

__all__ = [
    "ThreadChoice",
    "native_half_products",
    "openmp_wait_policy",
    "retain_freed_memory",
    "training_threads",
    "usable_cores",
]

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


def native_half_products(dtype: torch.dtype = torch.bfloat16) -> str | None:
    """The instructions with which this CPU multiplies ``dtype`` (bf16 / fp16) matrices, or None.

    CPU autocast (``trainer.amp``) runs the matrix products in half precision. With the instructions (bf16:
    AVX512-BF16, as on AMD Zen 4 and later and Intel Cooper Lake, or AMX on Intel Sapphire Rapids and later;
    fp16: AVX512-FP16 or AMX-FP16, Intel Sapphire Rapids / Granite Rapids) oneDNN multiplies them natively:
    on a 2-core AMD EPYC (Zen 4) an EquiformerV2 ``[2420, 1792] x [1792, 1024]`` product took 21 ms in bf16
    against 49 ms in float32 (``docs/performance.md``). Without them it converts to float32 and back, and
    autocast only costs time.

    Examples
    --------
    >>> native_half_products(torch.bfloat16) in (None, "AMX", "AVX512-BF16")
    True
    """
    cpu = torch.cpu
    if dtype == torch.bfloat16:
        if cpu._is_amx_tile_supported():
            return "AMX"
        return "AVX512-BF16" if cpu._is_avx512_bf16_supported() else None
    if dtype == torch.float16:
        if cpu._is_amx_fp16_supported():
            return "AMX-FP16"
        return "AVX512-FP16" if "avx512_fp16" in _cpu_flags() else None  # torch does not report it
    raise ValueError(f"expected torch.bfloat16 or torch.float16, got {dtype}")


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            line = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


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


class ThreadChoice:
    """The intra-op thread count of a CPU training run, chosen from the run's own step times.

    The first ``warmup`` steps run with ``most`` threads (one-time costs: allocations, caches). The
    following steps cycle through the candidates, ``most`` halved down to 1, until each has ``samples``
    step times. The count with the lowest median is then kept if its median is at least ``margin`` below
    that of ``most`` threads (on a tie, the fewer threads), else ``most``: a few early steps are a noisy
    sample, and on the DeNS demo (2 idle AMD EPYC cores) one thread was 4 % faster in the first steps and
    15 % slower over the run. Every step is a real training step: the choice costs no work, only some
    steps at a slower count.

    Parameters
    ----------
    most : int
        The largest count to try (:func:`training_threads`).
    warmup : int
        Steps before the timing starts.
    samples : int
        Timed steps per candidate.
    margin : float
        How much faster (a fraction of the median step time) fewer threads must be to be chosen.

    Examples
    --------
    >>> choice = ThreadChoice(4, warmup=1, samples=1)
    >>> choice.candidates
    (4, 2, 1)
    >>> for seconds in (9.0, 0.3, 0.2, 0.25):  # the warm-up step, then 4, 2 and 1 threads (2: 33 % faster)
    ...     threads = choice.next_threads()
    ...     chosen = choice.record(threads, seconds)
    >>> chosen, choice.next_threads()
    (2, 2)
    """

    def __init__(self, most: int, warmup: int = 3, samples: int = 5, margin: float = 0.1) -> None:
        if most < 1 or warmup < 0 or samples < 1 or not 0 <= margin < 1:
            raise ValueError(
                f"ThreadChoice: most={most} (>= 1), warmup={warmup} (>= 0), samples={samples} (>= 1), "
                f"margin={margin} (in [0, 1))"
            )
        candidates = [most]
        while candidates[-1] > 1:
            candidates.append(candidates[-1] // 2)
        self.candidates = tuple(candidates)
        self.warmup, self.samples, self.margin = warmup, samples, margin
        self.times: dict[int, list[float]] = {n: [] for n in self.candidates}
        self.chosen: int | None = most if most == 1 else None
        self._steps = 0

    def next_threads(self) -> int:
        """The thread count for the next step."""
        if self.chosen is not None:
            return self.chosen
        timed = self._steps - self.warmup
        return self.candidates[0] if timed < 0 else self.candidates[timed % len(self.candidates)]

    def record(self, threads: int, seconds: float) -> int | None:
        """Record a step that ran with ``threads``; returns the chosen count once it is decided (else None)."""
        self._steps += 1
        if self.chosen is not None or self._steps <= self.warmup:
            return None
        self.times[threads].append(seconds)
        if all(len(t) >= self.samples for t in self.times.values()):
            fastest = min(self.candidates, key=lambda n: (self.median(n), n))
            clearly = self.median(fastest) <= (1 - self.margin) * self.median(self.candidates[0])
            self.chosen = fastest if clearly else self.candidates[0]
            return self.chosen
        return None

    @property
    def decided_after(self) -> int:
        """How many steps the choice takes (with a single candidate it is made before the first)."""
        return self.warmup + self.samples * len(self.candidates) if len(self.candidates) > 1 else 0

    def median(self, threads: int) -> float:
        """The median step time (s) measured with ``threads``."""
        return statistics.median(self.times[threads])


def openmp_wait_policy() -> str:
    """The OpenMP wait policy torch's threads run with: ``OMP_WAIT_POLICY`` as it was when torch loaded
    (``import dens`` sets ``PASSIVE`` when torch is not loaded yet and the variable is unset), else
    ``"unset"`` (libgomp spins about 0.3 ms before sleeping)."""
    return os.environ.get("OMP_WAIT_POLICY", "unset")
