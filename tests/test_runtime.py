"""Process settings (dens.runtime)."""

import subprocess
import sys

import pytest

from dens.runtime import retain_freed_memory
from dens.trainer import TrainerSettings

# Page faults of a training-like step (60k x 256 activations, 61 MB each, forward and backward), the
# fewest of its last three repetitions.
_PROBE = """
import resource, sys, torch
from dens.runtime import retain_freed_memory
if sys.argv[1] == "1":
    assert retain_freed_memory()
w = torch.randn(256, 256, requires_grad=True)
x = torch.randn(60_000, 256)
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    (torch.tanh(x @ w) ** 2).sum().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[-3:]))
"""


def _faults(retain: bool) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, "1" if retain else "0"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_retained_memory_is_reused_without_page_faults():
    """glibc unmaps the step's freed 61 MB blocks, so every step page-faults them back (some 90k pages);
    once retained, the heap settles after a few steps and is reused."""
    default = _faults(retain=False)
    assert default > 40_000
    assert _faults(retain=True) < default / 20


def test_retain_freed_memory_is_idempotent_and_the_trainer_default():
    first = retain_freed_memory()
    assert retain_freed_memory() is first
    assert TrainerSettings().retain_freed_memory is True
