"""ASE-readable files (extxyz, traj, json, ...) and the ASE-database LMDB format (``.aselmdb``).

Labels are taken from the attached calculator (``SinglePointCalculator``, as ASE creates when reading
extxyz/traj with energies) or from ``atoms.info['energy']`` / ``atoms.arrays['forces']``; ``energy_key`` /
``forces_key`` name other fields (MACE-style ``REF_energy`` / ``REF_forces``), which are also read
when a frame has no label under the standard names. ``fixed`` comes
from ``FixAtoms`` constraints, a ``fixed`` array, or the inverse of an extxyz ``move_mask``; ``sid`` and
``fid`` from ``atoms.info`` (fairchem ``.aselmdb`` rows keep them in ``data`` / ``key_value_pairs``).

Stress (or virial) labels become a per-structure ``stress`` entry (eV/Å³, ASE's sign): see
:mod:`dens.data.materials`.

Extended XYZ does not state its units: ``energy_unit`` (default ``"eV"``) and ``length_unit`` (default
``"Å"``) say what the file holds; forces are in energy unit per length unit.

``.aselmdb`` (fairchem's ``LMDBDatabase``): one LMDB file (``subdir=False``), keys are the row ids as ASCII
integers plus ``nextid``, ``metadata`` and ``deleted_ids``; every value is zlib-compressed JSON of an ASE
``AtomsRow`` dict (numbers, positions, cell, pbc, energy, forces, constraints, ...).

Examples
--------
>>> from ase.build import molecule
>>> atoms = molecule("H2O")
>>> s = atoms_to_structure(atoms)
>>> s["atomic_numbers"].tolist(), s["energy"] is None
([8, 1, 1], True)
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ase
import ase.constraints
import ase.io
import lmdb
import numpy as np
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from ase.db.row import AtomsRow

from .batch import make_structure
from .dataset import CorruptEntryError, InMemoryDataset, StructureDataset, energy_factor, length_factor
from .lmdb import close_lmdb_envs, find_lmdb_files, open_lmdb_env
from .materials import stress_entry, stress_of_atoms, stress_tensor

try:  # orjson is what fairchem writes with; json reads the same text
    import orjson as _orjson
except ImportError:  # pragma: no cover - optional
    _orjson = None

__all__ = [
    "AseDataset",
    "AseLmdbDataset",
    "atoms_to_structure",
    "read_ase_file",
    "structure_to_atoms",
    "write_aselmdb",
]

logger = logging.getLogger(__name__)

_RESERVED_KEYS = {b"nextid", b"metadata", b"deleted_ids"}


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


#: Label names read when a frame has none under the standard names (MACE's ``REF_`` convention).
FALLBACK_KEYS: dict[str, tuple[str, ...]] = {"energy": ("REF_energy",), "forces": ("REF_forces",)}


def _label(atoms: ase.Atoms, results: dict[str, Any], kind: str, key: str | None, where: str) -> Any:
    """A label from ``key`` (info / arrays / calculator results), or the standard name, or a fallback."""
    store = atoms.info if kind == "energy" else atoms.arrays
    if key is not None and key != kind:
        if key in store:
            return store[key]
        if key in results:
            return results[key]
        raise ValueError(
            f"{where}: no {kind} under the key {key!r} (info keys: {sorted(atoms.info)}, "
            f"array keys: {sorted(atoms.arrays)})"
        )
    if kind in results:
        return results[kind]
    if kind in store:
        return store[kind]
    return next((store[k] for k in FALLBACK_KEYS[kind] if k in store), None)


def atoms_to_structure(
    atoms: ase.Atoms,
    energy_unit: str = "eV",
    length_unit: str = "Å",
    dtype: torch.dtype = torch.float32,
    sid: Any = None,
    fid: Any = None,
    energy_key: str | None = None,
    forces_key: str | None = None,
    where: str = "structure",
    stress_key: str | None = None,
) -> dict[str, Any]:
    """Convert an ``ase.Atoms`` (with optional calculator results) into a structure dict.

    Parameters
    ----------
    atoms : ase.Atoms
        The structure.
    energy_unit, length_unit : str
        Units of the stored energy, forces and positions (see :data:`dens.data.ENERGY_UNITS`).
    dtype : torch.dtype
        Float dtype of positions, cell and forces.
    sid, fid : optional
        Ids used when ``atoms.info`` has none.
    energy_key, forces_key : str, optional
        Field names of the labels in ``atoms.info`` / ``atoms.arrays`` (e.g. ``REF_energy``); a frame
        without them raises ``ValueError`` naming ``where``.
    where : str
        Where the frame comes from, for messages.
    stress_key : str, optional
        Field of the stress label in ``atoms.info`` (e.g. ``REF_stress``); default: the calculator's
        stress, then ``info['stress']``, then ``info['virial']`` (:func:`dens.data.materials.stress_of_atoms`).

    Returns
    -------
    dict
    """
    ef = energy_factor(energy_unit)
    lf = length_factor(length_unit)
    calc = atoms.calc
    results = getattr(calc, "results", {}) if calc is not None else {}
    energy = _label(atoms, results, "energy", energy_key, where)
    forces = _label(atoms, results, "forces", forces_key, where)
    n = len(atoms)
    fixed = np.zeros(n, dtype=bool)
    for c in atoms.constraints:
        if isinstance(c, ase.constraints.FixAtoms):
            fixed[c.index] = True
    if "fixed" in atoms.arrays:
        fixed |= atoms.arrays["fixed"].astype(bool).reshape(n)
    if "move_mask" in atoms.arrays:
        fixed |= ~atoms.arrays["move_mask"].astype(bool).reshape(n)
    info = atoms.info
    cell = np.asarray(atoms.cell.array, dtype=np.float64) * lf
    return make_structure(
        pos=np.asarray(atoms.positions, dtype=np.float64) * lf,
        atomic_numbers=atoms.numbers,
        cell=cell,
        pbc=np.asarray(atoms.pbc, dtype=bool),
        tags=atoms.get_tags(),
        fixed=fixed,
        energy=None if energy is None else float(energy) * ef,
        forces=None if forces is None else np.asarray(forces, dtype=np.float64) * (ef / lf),
        sid=_first(info.get("sid"), sid),
        fid=_first(info.get("fid"), fid),
        dtype=dtype,
        **stress_entry(stress_of_atoms(atoms, ef, lf, where=where, key=stress_key)),
    )


def structure_to_atoms(s: dict[str, Any]) -> ase.Atoms:
    """The inverse of :func:`atoms_to_structure` (eV, Å; labels in a ``SinglePointCalculator``).

    Examples
    --------
    >>> from ase.build import molecule
    >>> structure_to_atoms(atoms_to_structure(molecule("CO"))).get_chemical_formula()
    'CO'
    """
    atoms = ase.Atoms(
        numbers=s["atomic_numbers"].numpy(),
        positions=s["pos"].detach().double().numpy(),
        cell=s["cell"].reshape(3, 3).double().numpy(),
        pbc=s["pbc"].reshape(3).numpy(),
        tags=s["tags"].numpy(),
    )
    fixed = s["fixed"].numpy().astype(bool)
    if fixed.any():
        atoms.set_constraint(ase.constraints.FixAtoms(indices=np.nonzero(fixed)[0]))
    if s.get("sid") is not None:
        atoms.info["sid"] = s["sid"]
    if s.get("fid") is not None:
        atoms.info["fid"] = s["fid"]
    results = {}
    if s.get("energy") is not None:
        results["energy"] = float(s["energy"])
    if s.get("forces") is not None:
        results["forces"] = s["forces"].detach().double().numpy()
    if s.get("stress") is not None:
        results["stress"] = stress_tensor(s["stress"].detach().double().numpy())
    if results:
        atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def read_ase_file(
    path: str | Path,
    index: str | int = ":",
    energy_unit: str = "eV",
    length_unit: str = "Å",
    dtype: torch.dtype = torch.float32,
    format: str | None = None,
    energy_key: str | None = None,
    forces_key: str | None = None,
    stress_key: str | None = None,
) -> list[dict[str, Any]]:
    """Read every frame of an ASE-readable file as structure dicts (eV, Å).

    Frames without ``sid``/``fid`` in ``atoms.info`` get ``sid`` = the file stem and ``fid`` = frame index.

    Parameters
    ----------
    path : str or Path
        The file.
    index : str or int
        ASE frame selection.
    energy_unit, length_unit : str
        Units stored in the file.
    dtype : torch.dtype
        Float dtype.
    format : str, optional
        ASE format name (guessed from the file otherwise).
    energy_key, forces_key, stress_key : str, optional
        Label field names (see :func:`atoms_to_structure`).

    Returns
    -------
    list of dict
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"file not found: {p}")
    energy_factor(energy_unit)  # fail early on unknown units
    length_factor(length_unit)
    try:
        frames = ase.io.read(str(p), index=index, format=format)
    except Exception as err:
        raise ValueError(f"{p}: ASE cannot read this file ({type(err).__name__}: {err})") from err
    if isinstance(frames, ase.Atoms):
        frames = [frames]
    return [
        atoms_to_structure(
            a,
            energy_unit,
            length_unit,
            dtype,
            sid=p.stem,
            fid=i,
            energy_key=energy_key,
            forces_key=forces_key,
            where=f"{p}, frame {i}",
            stress_key=stress_key,
        )
        for i, a in enumerate(frames)
    ]


class AseDataset(InMemoryDataset):
    """Any ASE-readable file, read into memory.

    Parameters
    ----------
    path : str or Path
        The file (extxyz, traj, json, ...).
    energy_unit, length_unit : str
        Units of the file (extxyz does not state them). Default eV and Å.
    dtype : torch.dtype
        Float dtype.
    format : str, optional
        ASE format name.
    energy_key, forces_key, stress_key : str, optional
        Label field names (e.g. ``REF_energy`` / ``REF_forces`` / ``REF_stress``).
    **kwargs
        See :class:`~dens.data.dataset.StructureDataset`.
    """

    def __init__(
        self,
        path: str | Path,
        energy_unit: str = "eV",
        length_unit: str = "Å",
        dtype: torch.dtype = torch.float32,
        format: str | None = None,
        energy_key: str | None = None,
        forces_key: str | None = None,
        stress_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        structures = read_ase_file(
            path, ":", energy_unit, length_unit, dtype, format, energy_key, forces_key, stress_key
        )
        super().__init__(structures, source=str(path), **kwargs)
        self.path = Path(path)
        self.energy_unit = energy_unit

    def describe(self, index: int) -> str:
        return f"{self.path}, frame {index}"


def _json_loads(b: bytes) -> Any:
    return _orjson.loads(b) if _orjson is not None else json.loads(b)


def _json_dumps(obj: Any) -> bytes:
    if _orjson is not None:
        return _orjson.dumps(obj, option=_orjson.OPT_SERIALIZE_NUMPY)

    def default(o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
        raise TypeError(f"cannot serialise {type(o).__name__}")

    return json.dumps(obj, default=default).encode()


def _row_to_atoms(dct: dict[str, Any]) -> tuple[ase.Atoms, dict[str, Any]]:
    for key in ("numbers", "positions", "cell", "pbc", "forces", "tags", "momenta", "initial_magmoms"):
        if key in dct and dct[key] is not None:
            dct[key] = np.asarray(dct[key])
    row = AtomsRow(dct)
    atoms = row.toatoms()
    extra = {**dct.get("key_value_pairs", {}), **(dct.get("data") or {})}
    return atoms, extra


class AseLmdbDataset(StructureDataset):
    """fairchem ``.aselmdb`` files (one file or a folder of them), read lazily.

    Parameters
    ----------
    path : str or Path
        An ``.aselmdb`` file or a folder of them.
    energy_unit, length_unit : str
        Units stored (default eV, Å).
    dtype : torch.dtype
        Float dtype.
    **kwargs
        See :class:`~dens.data.dataset.StructureDataset`.
    """

    def __init__(
        self,
        path: str | Path,
        energy_unit: str = "eV",
        length_unit: str = "Å",
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.path = Path(path)
        self.files = find_lmdb_files(self.path, suffix=".aselmdb")
        self.energy_unit, self.length_unit, self.dtype = energy_unit, length_unit, dtype
        energy_factor(energy_unit)
        length_factor(length_unit)
        self._ids: list[list[bytes]] = []
        for f in self.files:
            env = open_lmdb_env(f)
            with env.begin() as txn:
                keys = [k for k in txn.cursor().iternext(values=False) if k not in _RESERVED_KEYS]
            self._ids.append(sorted(keys, key=lambda k: int(k) if k.isdigit() else -1))
        self._cum = np.cumsum([len(k) for k in self._ids]).tolist()
        self.natoms = None
        meta = (self.path if self.path.is_dir() else self.path.parent) / "metadata.npz"
        if meta.is_file():
            with np.load(meta) as m:
                if "natoms" in m.files and len(m["natoms"]) == len(self):
                    self.natoms = np.asarray(m["natoms"], dtype=np.int64)

    def __len__(self) -> int:
        return self._cum[-1] if self._cum else 0

    def _locate(self, index: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self._cum, index, side="right"))
        return shard, index - (self._cum[shard - 1] if shard else 0)

    def describe(self, index: int) -> str:
        shard, local = self._locate(index)
        return f"{self.files[shard]}, row {local} (id {self._ids[shard][local].decode()})"

    def _get(self, index: int) -> dict[str, Any]:
        shard, local = self._locate(index)
        key = self._ids[shard][local]
        with open_lmdb_env(self.files[shard]).begin() as txn:
            blob = txn.get(key)
        try:
            dct = _json_loads(zlib.decompress(blob))
            atoms, extra = _row_to_atoms(dct)
        except Exception as err:
            raise CorruptEntryError(
                f"{self.describe(index)}: cannot decode the row ({type(err).__name__}: {err})"
            ) from err
        return atoms_to_structure(
            atoms,
            self.energy_unit,
            self.length_unit,
            self.dtype,
            sid=_first(extra.get("sid"), int(key) if key.isdigit() else key.decode()),
            fid=_first(extra.get("fid"), 0),
        )


def write_aselmdb(frames: Iterable[ase.Atoms], path: str | Path) -> int:
    """Write ``ase.Atoms`` to an ``.aselmdb`` file in fairchem's layout (ids from 1).

    ``atoms.info['sid']`` / ``['fid']`` are stored in the row's ``data``.

    Returns
    -------
    int
        Number of rows written.
    """
    p = Path(path)
    close_lmdb_envs(p)
    if p.exists():
        raise FileExistsError(f"{p} exists")
    env = lmdb.open(str(p), subdir=False, map_size=1 << 36, meminit=False, map_async=True, lock=False)
    n = 0
    try:
        with env.begin(write=True) as txn:
            for idx, atoms in enumerate(frames, start=1):
                row = AtomsRow(atoms)
                dct = {
                    k: row[k]
                    for k in row.__dict__
                    if not k.startswith("_") and k not in row._keys and k != "id"
                }
                dct["cell"] = np.asarray(dct["cell"])
                dct["mtime"] = dct.get("ctime", 0.0)
                dct["user"] = os.getenv("USER", "dens")
                constraints = row.get("constraints")
                if constraints:
                    dct["constraints"] = [c.todict() for c in constraints]
                data = {k: atoms.info[k] for k in ("sid", "fid") if k in atoms.info}
                if data:
                    dct["data"] = data
                txn.put(str(idx).encode("ascii"), zlib.compress(_json_dumps(dct)))
                n = idx
            txn.put(b"nextid", zlib.compress(_json_dumps(n + 1)))
    finally:
        env.sync()
        env.close()
    return n
