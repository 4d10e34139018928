"""Materials labels: stress (or virial) from ASE files and databases, and the MPtrj JSON converter.

Stress in dens is a per-structure ``[1, 3, 3]`` float64 entry ``"stress"`` of a structure dict, in eV/Å³
with ASE's sign (``(1/V) dE/d strain``: negative under compression), so batches stack it to
``[B, 1, 3, 3]``. Where it is read from, in this order:

1. the attached calculator's ``stress`` (ASE writes it there when reading extxyz/traj/db with a
   ``stress`` label): Voigt ``[6]`` in ASE's order (xx, yy, zz, yz, xz, xy) or ``[3, 3]``;
2. ``atoms.info['stress']``: Voigt ``[6]``, ``[3, 3]`` or flat ``[9]``;
3. ``atoms.info['virial']`` (extxyz as written by many codes, e.g. GAP/MACE/NequIP data): the virial
   ``W = -V sigma`` in eV, ``[3, 3]``, flat ``[9]`` or Voigt ``[6]``.

OMat24 / Alexandria ``.aselmdb`` rows keep stress as an ASE calculator result (Voigt), so
:class:`~dens.data.ase_io.AseLmdbDataset` reads it through 1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ase
import ase.data
import numpy as np
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from ase.units import GPa

__all__ = [
    "MPTRJ_STRESS_FACTOR",
    "convert_mptrj",
    "mptrj_frames",
    "stress_entry",
    "stress_of_atoms",
    "stress_tensor",
]

# MPtrj stores VASP's stress: kBar, positive under compression. 1 kBar = 0.1 GPa; the sign flips.
MPTRJ_STRESS_FACTOR = -0.1 * GPa


def stress_tensor(value: Any, where: str = "stress") -> np.ndarray:
    """A ``[3, 3]`` array from Voigt ``[6]`` (ASE order), ``[3, 3]`` or flat ``[9]`` input.

    Raises
    ------
    ValueError
        For any other shape or non-finite values, naming ``where``.
    """
    arr = np.asarray(value, dtype=np.float64)
    if arr.size == 6:
        xx, yy, zz, yz, xz, xy = arr.reshape(6)
        arr = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    elif arr.size == 9:
        arr = arr.reshape(3, 3)
    else:
        raise ValueError(f"{where}: expected Voigt [6], [3, 3] or [9] values, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{where}: non-finite values")
    return arr


def stress_of_atoms(
    atoms: ase.Atoms,
    energy_factor: float = 1.0,
    length_factor: float = 1.0,
    where: str = "structure",
    key: str | None = None,
) -> np.ndarray | None:
    """The stress (eV/Å³, ASE sign, ``[3, 3]``) of ``atoms`` from its labels, or None without one.

    ``energy_factor`` / ``length_factor`` convert the file's units to eV / Å (see the module docstring for
    where the value is read from). A virial needs a periodic cell with a volume. ``key`` names the stress
    field of ``atoms.info`` (e.g. MACE's ``REF_stress``, Voigt or 3x3, ASE sign); every frame must have it.
    """
    scale = energy_factor / length_factor**3
    if key is not None:
        if atoms.info.get(key) is None:
            raise ValueError(f"{where}: no stress label {key!r} in the frame's info")
        return stress_tensor(atoms.info[key], f"{where}: info[{key!r}]") * scale
    results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
    if results.get("stress") is not None:
        return stress_tensor(results["stress"], f"{where}: calculator stress") * scale
    if atoms.info.get("stress") is not None:
        return stress_tensor(atoms.info["stress"], f"{where}: info['stress']") * scale
    if atoms.info.get("virial") is not None:
        volume = abs(float(np.linalg.det(atoms.cell.array))) * length_factor**3
        if volume < 1e-12:
            raise ValueError(f"{where}: a virial label needs a cell with a volume")
        virial = stress_tensor(atoms.info["virial"], f"{where}: info['virial']") * energy_factor
        return -virial / volume
    return None


def stress_entry(stress: np.ndarray | None) -> dict[str, Any]:
    """``{"stress": [1, 3, 3] float64 tensor}`` for a structure dict, or ``{}``."""
    if stress is None:
        return {}
    return {"stress": torch.as_tensor(np.asarray(stress, dtype=np.float64).reshape(1, 3, 3))}


def _mptrj_atoms(frame: Mapping[str, Any], energy_key: str, where: str) -> ase.Atoms:
    structure = frame["structure"]
    cell = np.asarray(structure["lattice"]["matrix"], dtype=np.float64)
    numbers, positions = [], []
    for k, site in enumerate(structure["sites"]):
        species = site["species"]
        if len(species) != 1 or float(species[0].get("occu", 1.0)) != 1.0:
            raise ValueError(f"{where}: site {k} is disordered ({species}); MPtrj frames are ordered")
        numbers.append(ase.data.atomic_numbers[species[0]["element"]])
        positions.append(site["xyz"] if "xyz" in site else np.asarray(site["abc"]) @ cell)
    atoms = ase.Atoms(numbers=numbers, positions=np.asarray(positions, dtype=np.float64), cell=cell, pbc=True)
    results: dict[str, Any] = {}
    if frame.get(energy_key) is not None:
        results["energy"] = float(frame[energy_key])
    if frame.get("force") is not None:
        results["forces"] = np.asarray(frame["force"], dtype=np.float64)
    if frame.get("stress") is not None:
        results["stress"] = stress_tensor(frame["stress"], f"{where}: stress") * MPTRJ_STRESS_FACTOR
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def mptrj_frames(
    path_or_data: str | Path | Mapping[str, Any], energy_key: str = "uncorrected_total_energy"
) -> Iterator[ase.Atoms]:
    """The frames of the MPtrj JSON (``MPtrj_2022.9_full.json``: ``{mp_id: {frame_id: {...}}}``) as
    ``ase.Atoms`` with a ``SinglePointCalculator`` (eV, eV/Å, eV/Å³ in ASE's sign).

    Parameters
    ----------
    path_or_data : str, Path or dict
        The JSON file or its loaded content.
    energy_key : str
        Which energy to use: ``uncorrected_total_energy`` (the DFT energy, default) or
        ``corrected_total_energy`` (with the Materials Project compatibility corrections). Which one
        fairchem's MPtrj models were trained on is not stated in the material available here.

    Notes
    -----
    Each frame has ``info['sid']`` = the mp id and ``info['fid']`` = the frame id. Sites are read from the
    pymatgen ``Structure`` dict (``lattice.matrix`` rows, ``sites[].species/xyz``) without pymatgen.
    """
    data = path_or_data
    if not isinstance(data, Mapping):
        with open(data) as f:
            data = json.load(f)
    for mp_id, frames in data.items():
        for frame_id, frame in frames.items():
            atoms = _mptrj_atoms(frame, energy_key, f"MPtrj {mp_id}/{frame_id}")
            atoms.info["sid"], atoms.info["fid"] = mp_id, frame_id
            yield atoms


def convert_mptrj(
    json_path: str | Path, out_path: str | Path, energy_key: str = "uncorrected_total_energy"
) -> int:
    """Convert the MPtrj JSON to an ``.aselmdb`` (read by :class:`~dens.data.ase_io.AseLmdbDataset`,
    stress included). Returns the number of frames written."""
    from .ase_io import write_aselmdb

    return write_aselmdb(mptrj_frames(json_path, energy_key), out_path)
