"""dens: equivariant force fields trained with DeNS (denoising non-equilibrium structures).

Subpackages: :mod:`dens.models` (the SO(3)/SO(2) core and the models), :mod:`dens.data` (datasets,
graphs), :mod:`dens.testing` (equivariance test helpers), :mod:`dens.ops` (scatter operations),
:mod:`dens.runtime` (process settings for fast CPU training), :mod:`dens.distributed` (DDP collectives
and the process group, closed safely at exit).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

# OpenMP threads that finish a parallel region early sleep rather than spin. libgomp reads this once,
# when torch loads, so it is set here, before dens imports torch (an explicit value is kept). Spinning
# made a two-thread training step up to 3x slower than one thread whenever another process held a core;
# the price, on idle cores, is a wake-up per parallel region, which small models feel (docs/performance.md,
# "Shared cores": OMP_WAIT_POLICY=ACTIVE for a small model on a machine of your own).
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if TYPE_CHECKING:
    from .models.potential import ForceField

__version__ = "0.1.0"

__all__ = ["load"]


def load(path: str, device: str = "cpu", use_ema: bool = True) -> ForceField:
    """A :class:`~dens.models.ForceField` from a dens or official checkpoint (EMA weights by default).

    ``dens.load("runs/demo/checkpoints/best.pt").predict(atoms)`` gives the total energy (eV) and forces
    (eV/Å) of an ``ase.Atoms`` (or of a list of them).
    """
    from .evaluate import load_model

    return load_model(path, device=device, use_ema=use_ema)
