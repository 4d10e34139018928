"""Process settings (dens.runtime). The probes run in subprocesses: the settings are process-wide."""

import subprocess
import sys
from pathlib import Path

import pytest

from dens.runtime import retain_freed_memory
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
