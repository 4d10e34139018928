"""Where a benchmark ran: the CPU, its load, the threads and the process settings that change timings.

Every benchmark prints :func:`describe` in its header, so figures from different machines are never
compared by mistake, and :func:`competing_load` reproduces a shared machine (another process holding a
core), where OpenMP's spin-waiting threads used to make dens's two-thread step collapse (#19).
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else None
    return found.group(1).strip() if found else platform.processor() or platform.machine()


def describe(threads: int | str | None = None, malloc: str | None = None) -> dict[str, object]:
    """The machine and settings as a dict: CPU, usable cores, its bf16 matrix instructions (autocast's speed
    depends on them), load average (1 min), threads, malloc mode, OpenMP wait policy, git commit and date."""
    import torch

    from dens.runtime import native_half_products

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_name(),
        "cores": cores,
        "bf16_products": native_half_products(torch.bfloat16) or "none (converted to float32)",
        "load_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "threads": threads,
        "malloc": malloc,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (libgomp: spin, then sleep)"),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def header(info: dict[str, object]) -> str:
    """One line for a benchmark's output."""
    return (
        f"machine: {info['cpu']}, {info['cores']} cores, bf16 products {info.get('bf16_products')}, load "
        f"{info['load_1min']} (1 min) before the run; "
        f"threads {info['threads']}; malloc {info['malloc']}; OMP_WAIT_POLICY {info['omp_wait_policy']}; "
        f"commit {str(info['git_commit'])[:10]}"
    )


def git_commit(root: Path = REPO) -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    except OSError:  # no git
        return None
    return done.stdout.strip() or None


@contextlib.contextmanager
def competing_load(processes: int) -> Iterator[None]:
    """Run ``processes`` busy Python loops (one core each) for the duration of the block."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        if procs:
            time.sleep(0.5)  # let the scheduler place them
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """The ``dens`` package of git ``revision`` in a temporary directory (for same-invocation baselines)."""
    import tarfile
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dens-baseline-") as tmp:
        archive = Path(tmp) / "src.tar"
        subprocess.run(["git", "archive", "-o", str(archive), revision, "dens"], cwd=REPO, check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp)
