"""Energy and force statistics streamed from data (for the normalisers), and energy references.

* :func:`compute_statistics`: energy and force statistics from a dataset, streamed (one structure at a
  time, Welford updates), never loading everything.
* :func:`fit_linear_reference`: per-element energies ``E ≈ Σ_Z c_Z n_Z`` by least squares, accumulated
  as normal equations over a stream; :class:`LinearReference` subtracts them (OC22 ``lin_ref``).
* :class:`SystemReference`: subtracts a per-system reference energy (OC20's ``oc20_ref`` pickle,
  ``{"random<sid>": E_ref}``), which turns total energies into adsorption-referenced ones.

Energy references are dataset transforms: they state explicitly which target is trained on.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "LinearReference",
    "SystemReference",
    "compute_statistics",
    "fit_linear_reference",
    "load_linear_reference",
]

logger = logging.getLogger(__name__)

#: A structure whose force RMS is this many times the median structure's is an outlier in the statistics.
FORCE_OUTLIER_FACTOR = 100.0


class _Welford:
    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.size == 0:
            return
        n_b = x.size
        mean_b = float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        delta = mean_b - self.mean
        tot = self.n + n_b
        self.mean += delta * n_b / tot
        self.m2 += m2_b + delta * delta * self.n * n_b / tot
        self.n = tot

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else float("nan")

    @property
    def std_unbiased(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else float("nan")


def compute_statistics(
    structures: Iterable[Mapping[str, Any] | None],
    free_atoms_only: bool = False,
    outlier_factor: float = FORCE_OUTLIER_FACTOR,
) -> dict[str, Any]:
    """Energy and force statistics of a stream of structures.

    Parameters
    ----------
    structures : iterable of dict
        A dataset or any iterable of structure dicts (``None`` entries are ignored).
    free_atoms_only : bool
        Only count forces of atoms that are not fixed (OC20 trains on free atoms).

    outlier_factor : float
        A structure whose force RMS exceeds this multiple of the median structure's is an outlier (a
        unit mix-up or a broken calculation): it is named in a warning and left out of
        ``forces_rms_robust``. 0 disables the check.

    Returns
    -------
    dict
        ``energy_mean``, ``energy_std`` (population, ``n``), ``energy_std_unbiased`` (``n - 1``, torch's
        ``std()``, the official MD17 normaliser), ``energy_per_atom_mean``, ``energy_per_atom_std``,
        ``forces_mean`` (per component), ``forces_std``, ``forces_rms``, ``forces_rms_robust`` (without
        the outlier structures; equal to ``forces_rms`` when there are none), ``force_outliers`` (their
        indices), ``num_structures``, ``num_atoms``.

    Examples
    --------
    >>> from dens.data.batch import make_structure
    >>> s = [make_structure(torch.zeros(1, 3), [1], energy=e, forces=[[1.0, -1.0, 0.0]]) for e in (1., 3.)]
    >>> st = compute_statistics(s)
    >>> st["energy_mean"], st["energy_std"], round(st["forces_rms"], 4)
    (2.0, 1.0, 0.8165)
    """
    e, epa, f = _Welford(), _Welford(), _Welford()
    f_sq = 0.0
    num_atoms = 0
    num = 0
    frame_sq: list[tuple[int, float, int]] = []  # (index, sum of squares, components) per structure
    for index, s in enumerate(structures):
        if s is None:
            continue
        num += 1
        n = int(s["pos"].shape[0])
        num_atoms += n
        if s.get("energy") is not None:
            val = float(s["energy"])
            e.update(np.array([val]))
            epa.update(np.array([val / n]))
        forces = s.get("forces")
        if forces is not None:
            fr = forces
            if free_atoms_only and s.get("fixed") is not None:
                fr = forces[~s["fixed"].to(torch.bool)]
            arr = fr.detach().to(torch.float64).numpy()
            f.update(arr)
            sq = float((arr**2).sum())
            f_sq += sq
            if arr.size:
                frame_sq.append((index, sq, arr.size))
    outliers, robust = _force_outliers(frame_sq, outlier_factor, structures)
    return {
        "energy_mean": e.mean if e.n else float("nan"),
        "energy_std": e.std,
        "energy_std_unbiased": e.std_unbiased,
        "energy_per_atom_mean": epa.mean if epa.n else float("nan"),
        "energy_per_atom_std": epa.std,
        "forces_mean": f.mean if f.n else float("nan"),
        "forces_std": f.std,
        "forces_rms": math.sqrt(f_sq / f.n) if f.n else float("nan"),
        "forces_rms_robust": robust,
        "force_outliers": outliers,
        "num_structures": num,
        "num_atoms": num_atoms,
    }


def _force_outliers(
    frame_sq: list[tuple[int, float, int]], factor: float, source: Any
) -> tuple[list[int], float]:
    """Indices of the structures whose force RMS exceeds ``factor`` x the median, and the RMS without them."""
    if not frame_sq:
        return [], float("nan")
    rms = np.sqrt(np.array([sq / n for _, sq, n in frame_sq]))
    median = float(np.median(rms))
    bad = (rms > factor * median) if factor > 0 and median > 0 else np.zeros(len(rms), dtype=bool)
    outliers = [frame_sq[k][0] for k in np.nonzero(bad)[0]]
    if outliers:
        describe = getattr(source, "describe", None)
        names = [f"{describe(i) if describe else f'structure {i}'} (force RMS {rms[k]:.4g} eV/Å)"
                 for i, k in zip(outliers, np.nonzero(bad)[0], strict=True)]  # fmt: skip
        logger.warning(
            "%d structure(s) have a force RMS over %g x the median structure's (%.4g eV/Å), left out of the "
            "robust force RMS: %s%s", len(outliers), factor, median, "; ".join(names[:5]),
            " ..." if len(names) > 5 else "",
        )  # fmt: skip
    kept = [(sq, n) for (_, sq, n), b in zip(frame_sq, bad, strict=True) if not b]
    robust = math.sqrt(sum(sq for sq, _ in kept) / sum(n for _, n in kept)) if kept else float("nan")
    return outliers, robust


def fit_linear_reference(
    structures: Iterable[Mapping[str, Any] | None], max_z: int = 100, bias: bool = False
) -> np.ndarray:
    """Per-element reference energies by least squares, streamed.

    Minimises ``Σ_s (E_s - Σ_Z c_Z n_{s,Z} [- b])²`` by accumulating the normal equations. Elements that
    never occur get 0.

    Parameters
    ----------
    structures : iterable of dict
        Structures with energies.
    max_z : int
        Largest atomic number; the result has ``max_z + 1`` entries indexed by Z.
    bias : bool
        Fit a constant too (returned in entry 0, which no element uses).

    Returns
    -------
    numpy.ndarray
        ``coeff`` [max_z + 1], as OC22's ``oc22_linfit_coeffs.npz``.

    Examples
    --------
    >>> from dens.data.batch import make_structure
    >>> s = [make_structure(torch.zeros(2, 3), [1, 8], energy=-5.0), make_structure(torch.zeros(3, 3), [1, 1, 8], energy=-6.0)]
    >>> c = fit_linear_reference(s, max_z=10)
    >>> round(float(c[1]), 6), round(float(c[8]), 6)
    (-1.0, -4.0)
    """
    k = max_z + 1
    ata = np.zeros((k, k))
    atb = np.zeros(k)
    seen = np.zeros(k, dtype=bool)
    for s in structures:
        if s is None or s.get("energy") is None:
            continue
        z = s["atomic_numbers"].numpy()
        if z.max() > max_z:
            raise ValueError(f"atomic number {int(z.max())} exceeds max_z = {max_z}")
        row = np.bincount(z, minlength=k).astype(np.float64)
        if bias:
            row[0] = 1.0
        seen |= row > 0
        ata += np.outer(row, row)
        atb += row * float(s["energy"])
    idx = np.nonzero(seen)[0]
    coeff = np.zeros(k)
    if idx.size:
        sol, *_ = np.linalg.lstsq(ata[np.ix_(idx, idx)], atb[idx], rcond=None)
        coeff[idx] = sol
    return coeff


def load_linear_reference(path: str | Path) -> np.ndarray:
    """Read ``coeff`` from an ``.npz`` (e.g. fairchem's ``oc22_linfit_coeffs.npz``)."""
    with np.load(Path(path)) as f:
        if "coeff" not in f.files:
            raise ValueError(f"{path}: no 'coeff' array (found {f.files})")
        return np.asarray(f["coeff"], dtype=np.float64)


class LinearReference:
    """Transform: ``energy -= Σ_atoms coeff[Z]`` (OC22 ``lin_ref``).

    Parameters
    ----------
    coeff : array-like or str or Path
        Per-element energies indexed by Z, or an ``.npz`` with ``coeff``.

    Examples
    --------
    >>> from dens.data.batch import make_structure
    >>> ref = LinearReference(np.array([0.0, -1.0]))
    >>> float(ref(make_structure(torch.zeros(2, 3), [1, 1], energy=-3.0))["energy"])
    -1.0
    """

    def __init__(self, coeff: Any) -> None:
        if isinstance(coeff, (str, Path)):
            coeff = load_linear_reference(coeff)
        self.coeff = torch.as_tensor(np.asarray(coeff, dtype=np.float64))

    def reference(self, atomic_numbers: Tensor, batch: Tensor | None = None, num_graphs: int = 1) -> Tensor:
        """Reference energy per structure (``[num_graphs]``) for a batch of atoms."""
        per_atom = self.coeff.to(atomic_numbers.device)[atomic_numbers]
        if batch is None:
            return per_atom.sum().reshape(1)
        return torch.zeros(num_graphs, dtype=per_atom.dtype, device=per_atom.device).index_add_(
            0, batch, per_atom
        )

    def __call__(self, s: dict[str, Any]) -> dict[str, Any]:
        if s.get("energy") is None:
            return s
        z = s["atomic_numbers"]
        if int(z.max()) >= self.coeff.numel():
            raise ValueError(f"LinearReference: no coefficient for Z = {int(z.max())}")
        s = dict(s)
        s["energy"] = s["energy"] - self.coeff[z].sum()
        return s


class SystemReference:
    """Transform: ``energy -= reference[sid]`` (OC20 per-system gas-phase + slab references).

    Parameters
    ----------
    references : mapping or str or Path
        ``{sid: E_ref}``; keys may be ints or the official ``"random<sid>"`` strings; a path to the
        official pickle is read.
    sign : float
        ``-1`` subtracts (total → adsorption energy); ``+1`` adds the reference back.
    """

    def __init__(self, references: Mapping[Any, float] | str | Path, sign: float = -1.0) -> None:
        if isinstance(references, (str, Path)):
            with open(references, "rb") as fh:
                references = pickle.load(fh)
        self.refs: dict[str, float] = {}
        for k, v in references.items():
            key = str(k)
            key = key.removeprefix("random")
            self.refs[key] = float(v)
        self.sign = sign

    def __call__(self, s: dict[str, Any]) -> dict[str, Any]:
        if s.get("energy") is None:
            return s
        sid = str(s.get("sid")).removeprefix("random")
        if sid not in self.refs:
            raise ValueError(f"SystemReference: no reference energy for system {s.get('sid')!r}")
        s = dict(s)
        s["energy"] = s["energy"] + self.sign * self.refs[sid]
        return s
