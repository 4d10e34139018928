"""Relaxing positions and cell together with ASE (``FrechetCellFilter`` + FIRE) and a dens calculator.

The Matbench Discovery protocol is the default: FIRE on ``FrechetCellFilter(atoms)`` until the largest
force (and stress, scaled by the filter) is below ``fmax = 0.02 eV/Å``, for at most 500 steps.

:mod:`dens.relax` relaxes batches of structures at fixed cells with its own batched L-BFGS; cell degrees
of freedom do not fit it (its state is per-atom positions only, and a cell step needs the filter's
deformation-gradient coordinates and stress per structure), so cell relaxations go through ASE, one
structure at a time.

Examples
--------
>>> from ase.build import bulk
>>> from ase.calculators.emt import EMT
>>> atoms = bulk("Cu", "fcc", a=3.7, cubic=True)
>>> result = relax_cell(atoms, EMT())
>>> result["converged"], round(result["volume"] / 4, 2)
(True, 11.56)
"""

from __future__ import annotations

from typing import Any

import ase
import numpy as np
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE

__all__ = ["MATBENCH_DISCOVERY", "relax_cell"]

# Matbench Discovery's relaxation protocol (the settings its leaderboard models use)
MATBENCH_DISCOVERY: dict[str, Any] = {"fmax": 0.02, "steps": 500}


def relax_cell(
    atoms: ase.Atoms,
    calculator: Any,
    fmax: float = MATBENCH_DISCOVERY["fmax"],
    steps: int = MATBENCH_DISCOVERY["steps"],
    trajectory: str | None = None,
) -> dict[str, Any]:
    """Relax ``atoms`` (positions and cell, in place) with ``calculator``.

    Parameters
    ----------
    atoms : ase.Atoms
        A periodic structure; it is modified.
    calculator : ase Calculator
        E.g. a :class:`~dens.calculator.DeNSCalculator` of a model with stress.
    fmax, steps : float, int
        Convergence threshold (eV/Å) and step limit (Matbench Discovery: 0.02, 500).
    trajectory : str, optional
        An ASE trajectory file to write.

    Returns
    -------
    dict
        ``converged``, ``steps``, ``energy`` (eV), ``volume`` (Å³), ``cell`` ``[3, 3]``, ``stress``
        (Voigt, eV/Å³) and ``max_force`` (eV/Å) of the final structure.
    """
    if not np.asarray(atoms.pbc).all():
        raise ValueError("relax_cell needs a structure periodic along all three axes")
    atoms.calc = calculator
    optimizer = FIRE(FrechetCellFilter(atoms), logfile=None, trajectory=trajectory)
    converged = bool(optimizer.run(fmax=fmax, steps=steps))
    return {
        "converged": converged,
        "steps": int(optimizer.nsteps),
        "energy": float(atoms.get_potential_energy()),
        "volume": float(atoms.get_volume()),
        "cell": np.array(atoms.cell.array),
        "stress": atoms.get_stress(),
        "max_force": float(np.linalg.norm(atoms.get_forces(), axis=1).max()),
    }
