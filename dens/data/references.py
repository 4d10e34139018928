"""Per-element reference energies (E0s), label statistics for total energies, and plausibility checks.

A model trained on total energies learns ``E - Σ_atoms E0[Z]`` (the "residual"), which is small and
similar across compositions; the references are stored with the model (``ForceField.element_references``)
and added back to every prediction, so predictions are total energies again.

* :func:`element_references`: E0s fitted by least squares (the default), read from isolated-atom frames
  (one atom, no periodicity: MACE's ``IsolatedAtom`` frames), or given as ``{symbol or Z: eV}``.
* :func:`label_statistics`: mean and std of the residual, force RMS, with guards against degenerate
  values (an exact fit leaves a residual std of ~1e-12, which would blow the normalised targets up).
* :func:`check_labels`: errors or warnings, naming the file and frame, for labels that cannot be right:
  force magnitudes that suggest a wrong unit (meV read as eV), residual per-atom energies far from the
  references, NaN/inf (the readers' validation raises on those first).

Examples
--------
>>> import torch
>>> from dens.data.batch import make_structure
>>> data = [make_structure(torch.rand(n, 3) * 3, [1] * (n - 1) + [8], energy=-14.0 - 2.0 * (n - 1))
...         for n in (2, 3, 4)]
>>> refs, info = element_references(data, "fit")
>>> round(refs[1], 6), round(refs[8], 6), info["method"]
(-2.0, -14.0, 'fit')
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from ase.data import atomic_numbers as _SYMBOL_TO_Z
from ase.data import chemical_symbols

from .dataset import StructureDataset

__all__ = [
    "DEGENERATE_STD",
    "Referenced",
    "check_labels",
    "element_references",
    "label_statistics",
    "reference_energy",
]

logger = logging.getLogger(__name__)

#: Standard deviations below this (eV, or eV/Å for forces) are treated as degenerate.
DEGENERATE_STD = 1e-6


def _items(structures: Iterable[Any]) -> Iterable[tuple[int, Mapping[str, Any]]]:
    for i, s in enumerate(structures):
        if s is not None:
            yield i, s


def _is_isolated_atom(s: Mapping[str, Any]) -> bool:
    pbc = s.get("pbc")
    return int(s["pos"].shape[0]) == 1 and (pbc is None or not bool(np.asarray(pbc).any()))


def reference_energy(refs: Mapping[int, float], atomic_numbers: Any) -> float:
    """``Σ_atoms E0[Z]`` of one structure (0 for elements without a reference)."""
    return float(sum(refs.get(int(z), 0.0) for z in np.asarray(atomic_numbers).reshape(-1)))


def _given(values: Mapping[Any, Any]) -> dict[int, float]:
    refs = {}
    for key, value in values.items():
        z = int(key) if str(key).isdigit() else _SYMBOL_TO_Z.get(str(key))
        if z is None:
            raise ValueError(f"element references: unknown element {key!r} (use symbols like 'H' or numbers)")
        refs[z] = float(value)
    return refs


def element_references(
    structures: Iterable[Any], method: str | Mapping[Any, float] = "fit"
) -> tuple[dict[int, float], dict[str, Any]]:
    """Per-element reference energies (eV) of a dataset.

    Parameters
    ----------
    structures : iterable of structure dicts
        The training set (labels in eV).
    method : {"fit", "isolated", "none"} or mapping
        ``"fit"``: least squares of the total energies on the element counts, written as the mean energy
        per atom plus per-element deviations. Where the counts are linearly dependent (one composition
        only, as MD17, or fewer structures than elements) the elements cannot be told apart: the
        smallest deviations from the mean energy per atom that fit are used, which reproduce the
        energies of the compositions seen and keep unseen compositions near the data's energy per atom;
        a warning says so.
        ``"isolated"``: the energies of one-atom, non-periodic frames (an element without such a frame is
        an error). ``"none"``: no references. A mapping gives them (``{"H": -13.6, "O": -2041.}``).

    Returns
    -------
    refs : dict
        ``{Z: E0}``.
    info : dict
        ``method``, ``elements`` and, for fits, ``rank``, the residual RMS per structure (eV) and
        ``default``: the mean energy per atom, the best guess for elements absent from the data.
    """
    if isinstance(method, Mapping):
        return _given(method), {"method": "given"}
    if method in (None, "none", "null"):
        return {}, {"method": "none"}
    if method == "isolated":
        refs: dict[int, float] = {}
        seen: set[int] = set()
        for _, s in _items(structures):
            z = {int(v) for v in s["atomic_numbers"].reshape(-1).tolist()}
            seen |= z
            if _is_isolated_atom(s) and s.get("energy") is not None:
                refs[z.pop()] = float(s["energy"])
        missing = sorted(seen - set(refs))
        if missing:
            raise ValueError(
                "element references 'isolated': no isolated-atom frame (one atom, pbc False) for "
                f"{', '.join(chemical_symbols[z] for z in missing)}; use 'fit' or give them"
            )
        return refs, {"method": "isolated", "elements": sorted(refs)}
    if method != "fit":
        raise ValueError(f"element references must be 'fit', 'isolated', 'none' or a mapping, got {method!r}")
    rows, energies = [], []
    for _, s in _items(structures):
        if s.get("energy") is None:
            continue
        rows.append(np.bincount(s["atomic_numbers"].reshape(-1).numpy(), minlength=1))
        energies.append(float(s["energy"]))
    if not rows:
        raise ValueError("element references 'fit': the data has no energy labels")
    width = max(len(r) for r in rows)
    counts = np.stack([np.pad(r, (0, width - len(r))) for r in rows]).astype(np.float64)
    elements = np.nonzero(counts.sum(0))[0]
    a, e = counts[:, elements], np.asarray(energies)
    per_atom = float(e.sum() / a.sum())  # the mean energy per atom: the prior of every element
    delta, _, rank, _ = np.linalg.lstsq(a, e - a.sum(1) * per_atom, rcond=None)
    coef = per_atom + delta
    if rank < len(elements):
        logger.warning(
            "element references: the %d structures have only %d independent compositions for %d elements; "
            "the per-element values are not determined (the fit closest to one energy per atom is used, exact "
            "for the compositions seen); give them, or use isolated-atom frames, to predict other compositions",
            len(e), rank, len(elements),
        )  # fmt: skip
    refs = {int(z): float(c) for z, c in zip(elements, coef, strict=True)}
    rms = float(np.sqrt(np.mean((a @ coef - e) ** 2)))
    info = {"method": "fit", "elements": [int(z) for z in elements], "rank": int(rank), "residual_rms": rms}
    return refs, {**info, "default": per_atom}


def label_statistics(
    structures: Iterable[Any], refs: Mapping[int, float] | None = None, free_atoms_only: bool = False
) -> dict[str, float]:
    """Mean and std of the residual energies ``E - Σ E0``, and force statistics, with degenerate guards.

    A std below :data:`DEGENERATE_STD` (an exact reference fit, one structure, or constant labels) is
    replaced, with a warning: the energy std by the force RMS times 1 Å (the energy scale the forces
    imply; 1 eV without forces), the force RMS by the energy std (1 eV/Å without energies).

    Returns
    -------
    dict
        ``energy_mean``, ``energy_std``, ``forces_rms``, ``num_structures``, ``num_atoms``,
        ``energy_per_atom_mean`` (of the residual).
    """
    refs = refs or {}
    e_sum = e_sq = epa_sum = 0.0
    f_sq = 0.0
    n_e = n_f = n_s = n_atoms = 0
    for _, s in _items(structures):
        n_s += 1
        n = int(s["pos"].shape[0])
        n_atoms += n
        if s.get("energy") is not None:
            r = float(s["energy"]) - reference_energy(refs, s["atomic_numbers"])
            e_sum, e_sq, epa_sum, n_e = e_sum + r, e_sq + r * r, epa_sum + r / n, n_e + 1
        if s.get("forces") is not None:
            f = s["forces"].double()
            if free_atoms_only and s.get("fixed") is not None:
                f = f[~s["fixed"].bool()]
            f_sq, n_f = f_sq + float((f**2).sum()), n_f + f.numel()
    mean = e_sum / n_e if n_e else 0.0
    std = math.sqrt(max(e_sq / n_e - mean * mean, 0.0)) if n_e else float("nan")
    rms = math.sqrt(f_sq / n_f) if n_f else float("nan")
    if not (math.isfinite(rms) and rms > DEGENERATE_STD):
        fallback = std if math.isfinite(std) and std > DEGENERATE_STD else 1.0
        if n_f:
            logger.warning("force RMS %.3g eV/Å is degenerate: forces are normalised by %.3g", rms, fallback)
        rms = fallback
    if not (math.isfinite(std) and std > DEGENERATE_STD):
        if n_e:
            logger.warning(
                "the std of the energies (after the references) is %.3g eV, degenerate: using %.3g eV "
                "(the force RMS times 1 Å) for normalisation", std, rms,
            )  # fmt: skip
        std = rms
    return {
        "energy_mean": mean,
        "energy_std": std,
        "forces_rms": rms,
        "energy_per_atom_mean": epa_sum / n_e if n_e else float("nan"),
        "num_structures": n_s,
        "num_atoms": n_atoms,
    }


def check_labels(
    dataset: Any,
    refs: Mapping[int, float] | None = None,
    max_force: float = 100.0,
    max_force_rms: float = 20.0,
    max_residual_per_atom: float = 10.0,
    name: str = "data",
) -> list[str]:
    """Check that energies and forces (eV, eV/Å, after unit conversion) are plausible.

    Raises ``ValueError`` when the force RMS over the whole set exceeds ``max_force_rms`` (no DFT data
    set comes near: a unit error, e.g. meV or kcal/mol read as eV), naming the unit options. Returns
    (and logs) warnings, one per offending frame, naming it (``dataset.describe(i)``), for a force above
    ``max_force`` on one atom or a residual energy per atom ``|E - Σ E0| / n`` above
    ``max_residual_per_atom`` (a frame far from every reference: wrong unit, missing atoms, or another
    functional).

    Returns
    -------
    list of str
        The warnings.
    """
    refs = refs or {}
    describe = getattr(dataset, "describe", lambda i: f"{name}, structure {i}")
    warnings: list[str] = []
    f_sq, n_f = 0.0, 0
    for i, s in _items(dataset):
        where = describe(i)
        forces = s.get("forces")
        if forces is not None and forces.numel():
            norms = forces.double().norm(dim=-1)
            f_sq, n_f = f_sq + float((forces.double() ** 2).sum()), n_f + forces.numel()
            if float(norms.max()) > max_force:
                warnings.append(
                    f"{where}: force of {float(norms.max()):.1f} eV/Å on atom {int(norms.argmax())}"
                )
        if refs and s.get("energy") is not None:
            n = int(s["pos"].shape[0])
            per_atom = (float(s["energy"]) - reference_energy(refs, s["atomic_numbers"])) / n
            if abs(per_atom) > max_residual_per_atom:
                warnings.append(
                    f"{where}: energy {float(s['energy']):.4g} eV is {per_atom:+.3g} eV/atom from the element "
                    f"references"
                )
    if n_f and math.sqrt(f_sq / n_f) > max_force_rms:
        raise ValueError(
            f"{name}: the force RMS is {math.sqrt(f_sq / n_f):.1f} eV/Å, implausible for any DFT data "
            f"(typical: 0.1-3 eV/Å): are the units right? Set the file's unit (--energy-unit / "
            f"data.options.energy_unit: eV, meV, kcal/mol, kJ/mol, Hartree), or data.checks=false to train anyway"
        )
    for w in warnings[:10]:
        logger.warning("implausible label: %s", w)
    if len(warnings) > 10:
        logger.warning("... %d implausible labels in %s in all", len(warnings), name)
    return warnings


class Referenced(StructureDataset):
    """``dataset`` with every energy minus ``Σ_atoms table[Z]`` (the training labels of a model whose
    ``ForceField.element_references`` adds the table back); other datasets sharing the parent are untouched.

    Examples
    --------
    >>> from dens.data.batch import make_structure
    >>> ds = Referenced([make_structure(torch.zeros(2, 3), [1, 8], energy=-16.0)], [0.0, -2.0, 0, 0, 0, 0, 0, 0, -14.0])
    >>> float(ds[0]["energy"])
    0.0
    """

    def __init__(self, dataset: Any, table: Any) -> None:
        super().__init__(validate=False)
        self.dataset = dataset
        self.table = torch.as_tensor(np.asarray(table, dtype=np.float64))
        self.natoms = getattr(dataset, "natoms", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def _get(self, index: int) -> dict[str, Any]:
        return self.dataset[index]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.dataset[index]
        if item is None or item.get("energy") is None:
            return item
        z = item["atomic_numbers"].long()
        if int(z.max()) >= self.table.numel():
            raise ValueError(f"{self.describe(index)}: no reference energy for Z = {int(z.max())}")
        return {**item, "energy": item["energy"].double() - self.table[z].sum()}

    def describe(self, index: int) -> str:
        describe = getattr(self.dataset, "describe", None)
        return describe(index) if describe is not None else f"structure {index}"
