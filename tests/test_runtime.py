"""Process settings (dens.runtime). The probes run in subprocesses: the settings are process-wide."""

import subprocess
import sys
from pathlib import Path

import pytest

from dens.runtime import ThreadChoice, retain_freed_memory
from dens.trainer import TrainerSettings

# Page faults of a training-like step (60k x 256 activations, 61 MB each, forward and backward), the
# fewest of its last three repetitions; "skip" where glibc refuses the settings.
_PROBE = """
import resource, sys, torch
from dens.runtime import retain_freed_memory
if sys.argv[1] == "1" and not retain_freed_memory():
    print("skip")
    raise SystemExit
w = torch.randn(256, 256, requires_grad=True)
x = torch.randn(60_000, 256)
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    (torch.tanh(x @ w) ** 2).sum().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[-3:]))
"""


def _run(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[-1]


def _huge_pages_always() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[always]" in path.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
@pytest.mark.skipif(_huge_pages_always(), reason="2 MB pages: too few faults to tell the settings apart")
def test_retained_memory_is_reused_without_page_faults():
    """glibc unmaps the step's freed 61 MB blocks, so every step page-faults them back (some 90k pages);
    once retained, the heap settles after a few steps and is reused."""
    retained = _run(_PROBE, "1")
    if retained == "skip":
        pytest.skip("this C library refuses the malloc settings")
    default = int(_run(_PROBE, "0"))
    assert default > 40_000
    assert int(retained) < default / 20


def test_retain_freed_memory_keeps_its_first_settings():
    code = "from dens.runtime import retain_freed_memory as r; a = r(); print(a, r(1 << 20) is a)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    applied, again = done.stdout.split()
    assert again == "True"
    if sys.platform.startswith("linux") and applied == "False":
        pytest.skip("this C library refuses the malloc settings")


@pytest.mark.parametrize("max_block", [0, -1, 1 << 31, 4 << 30])
def test_retain_freed_memory_rejects_block_sizes_outside_int(max_block):
    with pytest.raises(ValueError, match="max_block"):
        retain_freed_memory(max_block)


def test_trainer_retains_freed_memory_by_default():
    assert TrainerSettings().retain_freed_memory is True


def _wait_policy(code: str, **env: str) -> str:
    """``OMP_WAIT_POLICY`` as a fresh interpreter sees it after ``code``."""
    import os

    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    probe = code + "; import os; print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          env={**base, **env})  # fmt: skip
    return done.stdout.strip()


def test_importing_dens_first_makes_openmp_threads_sleep_not_spin():
    assert _wait_policy("import dens, torch") == "PASSIVE"
    assert _wait_policy("import dens.train") == "PASSIVE"  # the trainer's entry point
    assert _wait_policy("import dens", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"  # the user's choice stays
    # libgomp has read the environment once torch is loaded: dens leaves it alone then
    assert _wait_policy("import torch, dens") == "unset"


def test_training_threads_leave_a_core_per_data_worker(monkeypatch):
    import torch

    from dens import runtime

    monkeypatch.setattr(runtime, "usable_cores", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert [runtime.training_threads(w) for w in (0, 1, 3, 7, 8, 20)] == [8, 7, 5, 1, 1, 1]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # OMP_NUM_THREADS=2: never more
    assert runtime.training_threads(0) == 2


def test_trainer_threads_are_validated():
    from dens.losses import DeNSSettings
    from dens.settings import ConfigError, check_settings
    from dens.trainer import OptimSettings

    with pytest.raises(ConfigError, match=r"trainer\.threads=0"):
        check_settings(OptimSettings(), DeNSSettings(), TrainerSettings(threads=0))


def test_thread_choice_times_every_candidate_and_keeps_the_fastest():
    choice = ThreadChoice(6, warmup=2, samples=2, margin=0.1)
    assert choice.candidates == (6, 3, 1)
    cost = {6: 0.30, 3: 0.20, 1: 0.25}  # step seconds per thread count
    used = []
    for _ in range(2 + 3 * 2):
        threads = choice.next_threads()
        used.append(threads)
        decided = choice.record(threads, 10.0 if len(used) <= 2 else cost[threads])
    assert used == [6, 6, 6, 3, 1, 6, 3, 1]  # warm-up with the most, then in turn
    assert decided == choice.chosen == 3 and choice.next_threads() == 3
    assert choice.times == {6: [0.30, 0.30], 3: [0.20, 0.20], 1: [0.25, 0.25]}  # warm-up not timed
    assert choice.record(3, 99.0) is None and choice.chosen == 3  # decided once


def test_thread_choice_keeps_the_most_threads_unless_fewer_are_clearly_faster():
    for margin, cost_of_one, chosen in ((0.0, 0.1, 1), (0.1, 0.095, 2), (0.1, 0.089, 1)):
        choice = ThreadChoice(2, warmup=0, samples=1, margin=margin)
        choice.record(choice.next_threads(), 0.1)
        assert choice.record(choice.next_threads(), cost_of_one) == chosen, (margin, cost_of_one)
    single = ThreadChoice(1)
    assert single.candidates == (1,) and single.chosen == 1 and single.record(1, 1.0) is None
    with pytest.raises(ValueError, match="most=0"):
        ThreadChoice(0)
    with pytest.raises(ValueError, match="margin=1"):
        ThreadChoice(2, margin=1.0)


def test_native_half_products_agree_with_the_cpu_flags():
    import torch

    from dens.runtime import native_half_products

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    assert (native_half_products(torch.bfloat16) is not None) == bool({"avx512_bf16", "amx_bf16"} & flags)
    assert (native_half_products(torch.float16) is not None) == bool({"avx512_fp16", "amx_fp16"} & flags)
    with pytest.raises(ValueError, match=r"bfloat16 or torch\.float16"):
        native_half_products(torch.float32)
