"""MD17 and revised MD17: ``.npz`` and extended XYZ, converted to eV and Å, with the paper's split.

* Original MD17 ``.npz`` (sGDML): ``R`` [F,N,3] (Å), ``z`` [N], ``E`` [F,1] (kcal/mol), ``F`` [F,N,3]
  (kcal/mol/Å).
* Revised MD17 ``.npz``: ``coords``, ``nuclear_charges``, ``energies``, ``forces`` (same units).
* Extended XYZ: units are not stated in the file, so ``energy_unit`` must say them; the MD17 default is
  kcal/mol (pass ``energy_unit="eV"`` or ``"meV"`` for files written in those units).

The paper's split (Equiformer / TorchMD-Net): ``np.random.default_rng(1).permutation(n)``; 950 train,
50 validation, the rest test. :func:`md17_splits` returns it and can record it to ``splits.npz``.

Molecules are not periodic: ``cell`` is zero and ``pbc`` False. The graph rule of the paper is all pairs
within 5 Å inside a molecule, no neighbour cap (:func:`dens.data.radius_graph_pbc` with
``max_neighbors=None``).

Examples
--------
>>> import numpy as np, tempfile, os
>>> f = os.path.join(tempfile.mkdtemp(), "toy.npz")
>>> np.savez(f, R=np.zeros((3, 2, 3)) + np.arange(2)[None, :, None], z=np.array([1, 1]),
...          E=np.ones((3, 1)), F=np.zeros((3, 2, 3)))
>>> ds = MD17Dataset(f)
>>> round(float(ds[0]["energy"]), 6)  # 1 kcal/mol in eV
0.043364
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .ase_io import read_ase_file
from .batch import make_structure
from .dataset import InMemoryDataset, Subset, energy_factor, length_factor, random_split_indices, save_split

__all__ = ["MD17_MOLECULES", "MD17Dataset", "md17_splits", "read_md17_npz", "read_md17_xyz"]

logger = logging.getLogger(__name__)

#: MD17 molecules of the paper and their file names at quantum-machine.org (``md17_<name>.npz``).
MD17_MOLECULES: dict[str, str] = {
    "aspirin": "md17_aspirin.npz",
    "benzene": "md17_benzene2017.npz",
    "ethanol": "md17_ethanol.npz",
    "malonaldehyde": "md17_malonaldehyde.npz",
    "naphthalene": "md17_naphthalene.npz",
    "salicylic_acid": "md17_salicylic.npz",
    "toluene": "md17_toluene.npz",
    "uracil": "md17_uracil.npz",
}

_LAYOUTS = {
    "md17": ("R", "z", "E", "F"),
    "rmd17": ("coords", "nuclear_charges", "energies", "forces"),
}


def read_md17_npz(
    path: str | Path,
    energy_unit: str = "kcal/mol",
    length_unit: str = "Å",
    dtype: torch.dtype = torch.float32,
) -> list[dict[str, Any]]:
    """Read an MD17 or rMD17 ``.npz`` into structure dicts in eV and Å.

    Parameters
    ----------
    path : str or Path
        The file.
    energy_unit : str
        Unit of ``E``/``energies`` (forces: per length unit). MD17 and rMD17 are kcal/mol.
    length_unit : str
        Unit of positions (Å).
    dtype : torch.dtype
        Float dtype of positions and forces (energies are float64).

    Returns
    -------
    list of dict
        ``sid`` is the file stem, ``fid`` the frame index.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"MD17 file not found: {p}. Get it with `python -m dens.data.download md17 --molecule <name>`"
        )
    ef, lf = energy_factor(energy_unit), length_factor(length_unit)
    with np.load(p, allow_pickle=False) as f:
        keys = set(f.files)
        layout = next((name for name, ks in _LAYOUTS.items() if set(ks) <= keys), None)
        if layout is None:
            raise ValueError(
                f"{p}: not an MD17 file: expected keys {_LAYOUTS['md17']} (MD17) or {_LAYOUTS['rmd17']} "
                f"(rMD17), found {sorted(keys)}"
            )
        rk, zk, ek, fk = _LAYOUTS[layout]
        R, z, E, F = (np.asarray(f[k]) for k in (rk, zk, ek, fk))
    if R.ndim != 3 or R.shape[2] != 3:
        raise ValueError(f"{p}: '{rk}' must be [frames, atoms, 3], got {R.shape}")
    nf, na = R.shape[:2]
    E = E.reshape(-1)
    if z.reshape(-1).shape[0] != na:
        raise ValueError(f"{p}: '{zk}' has {z.size} entries but '{rk}' has {na} atoms")
    if E.shape[0] != nf or F.shape != R.shape:
        raise ValueError(
            f"{p}: mismatched array lengths: '{rk}' {R.shape}, '{ek}' {E.shape}, '{fk}' {F.shape}"
        )
    if not np.isfinite(E).all():
        bad = int(np.nonzero(~np.isfinite(E))[0][0])
        raise ValueError(f"{p}: frame {bad}: energy is not finite")
    if not np.isfinite(F).all():
        bad = int(np.nonzero(~np.isfinite(F).all(axis=(1, 2)))[0][0])
        raise ValueError(f"{p}: frame {bad}: forces contain NaN or infinite values")
    z = z.reshape(-1).astype(np.int64)
    return [
        make_structure(
            pos=R[i] * lf,
            atomic_numbers=z,
            energy=float(E[i]) * ef,
            forces=F[i] * (ef / lf),
            sid=p.stem,
            fid=i,
            dtype=dtype,
        )
        for i in range(nf)
    ]


def read_md17_xyz(
    path: str | Path, energy_unit: str = "kcal/mol", dtype: torch.dtype = torch.float32
) -> list[dict[str, Any]]:
    """Read MD17 frames from extended XYZ (units given by ``energy_unit``; positions in Å)."""
    return read_ase_file(path, ":", energy_unit, "Å", dtype)


class MD17Dataset(InMemoryDataset):
    """One MD17 / rMD17 molecule from ``.npz`` or extended XYZ, in eV and Å.

    Parameters
    ----------
    path : str or Path
        ``.npz`` or ``.xyz``/``.extxyz`` file.
    energy_unit : str
        Unit stored in the file (default kcal/mol, the unit of MD17 and rMD17).
    dtype : torch.dtype
        Float dtype.
    **kwargs
        See :class:`~dens.data.dataset.StructureDataset`.
    """

    def __init__(
        self,
        path: str | Path,
        energy_unit: str = "kcal/mol",
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> None:
        p = Path(path)
        if p.suffix == ".npz":
            structures = read_md17_npz(p, energy_unit, dtype=dtype)
        else:
            structures = read_md17_xyz(p, energy_unit, dtype)
        super().__init__(structures, source=str(p), **kwargs)
        self.path = p
        self.energy_unit = energy_unit

    def describe(self, index: int) -> str:
        return f"{self.path}, frame {index}"


def md17_splits(
    dataset: Any,
    train: int = 950,
    val: int = 50,
    test: int | None = None,
    seed: int = 1,
    record: str | Path | None = None,
) -> dict[str, Subset]:
    """The paper's MD17 split of ``dataset``: seeded permutation, 950 / 50 / rest.

    Parameters
    ----------
    dataset : Dataset
        One molecule.
    train, val, test : int
        Sizes (``test=None``: the rest).
    seed : int
        Permutation seed (1 in the official scripts).
    record : str or Path, optional
        Write the indices to this ``.npz`` (keys ``train``, ``val``, ``test``, ``seed``).

    Returns
    -------
    dict
        ``{"train", "val", "test"}`` subsets; ``subset.indices`` are the recorded indices.
    """
    split = random_split_indices(len(dataset), (train, val, test), seed)
    if record is not None:
        save_split(record, split)
        logger.info("MD17 split (seed %d) recorded in %s", seed, record)
    return {k: Subset(dataset, split[k]) for k in ("train", "val", "test")}
