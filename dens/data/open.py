"""``open_dataset``: one entry point for every supported format.

==========================================  ==========================================================
path                                        reader
==========================================  ==========================================================
``*.lmdb`` file, or folder of ``*.lmdb``    :class:`~dens.data.lmdb.LmdbDataset` (OC20/OC22 S2EF, IS2RE)
``*.aselmdb`` file, or folder of them       :class:`~dens.data.ase_io.AseLmdbDataset`
``*.npz`` (MD17 / rMD17 keys)               :class:`~dens.data.md17.MD17Dataset` (kcal/mol by default)
``*.pkl`` / ``*.pickle`` (list of records)  :class:`PickleDataset` (pickled PyG ``Data`` or dicts)
anything else                               :class:`~dens.data.ase_io.AseDataset` (extxyz, traj, json..)
==========================================  ==========================================================

Common options: ``dtype``, ``transforms``, ``on_error`` (``"raise"`` / ``"skip"``), ``validate``,
``max_force`` (drop frames with a larger force norm, count logged), ``linear_reference`` (per-element
coefficients or an ``.npz``), ``system_reference`` (``{sid: E_ref}`` or the OC20 pickle). Format options:
``energy_key`` (LMDB, pickles, ASE files), ``forces_key`` (ASE files), ``energy_unit`` / ``length_unit``
(files that do not state their units; MD17 ``.npz`` default kcal/mol, everything else eV), ``format`` (ASE
format name).

Examples
--------
>>> open_dataset("/nonexistent/oc20")
Traceback (most recent call last):
...
FileNotFoundError: no dataset at /nonexistent/oc20 ...
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from .ase_io import AseDataset, AseLmdbDataset
from .dataset import InMemoryDataset, StructureDataset, filter_max_force
from .lmdb import LmdbDataset, structure_from_record
from .md17 import MD17Dataset
from .normalize import LinearReference, SystemReference
from .pyg_pickle import loads, record_mapping

__all__ = ["LABEL_OPTIONS", "PickleDataset", "open_dataset"]

#: Reader options that say where a file keeps its labels and in which unit (command-line ``--energy-key`` ...).
LABEL_OPTIONS = ("energy_unit", "energy_key", "forces_key", "stress_key")

_HOW_TO_GET = (
    "Download the public files with `python -m dens.data.download {oc20,oc22,md17} ...`, convert other "
    "formats with `python -m dens.data.convert`, or use the bundled demo set (`dens.data.demo_dataset()`)."
)


class PickleDataset(InMemoryDataset):
    """A pickled list of records (PyG ``Data`` in either layout, or dicts), e.g. ``oc22_pickle16_train.pkl``.

    Parameters
    ----------
    path : str or Path
        The pickle (trusted input: pickles can run code).
    energy_key : str, optional
        Record field used as ``energy``.
    dtype : torch.dtype
        Float dtype.
    **kwargs
        See :class:`~dens.data.dataset.StructureDataset`.
    """

    def __init__(
        self,
        path: str | Path,
        energy_key: str | None = None,
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> None:
        p = Path(path)
        try:
            obj = loads(p.read_bytes())
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise ValueError(f"{p}: not a readable pickle ({type(err).__name__}: {err})") from err
        records = obj if isinstance(obj, list) else [obj]
        structures = [
            structure_from_record(record_mapping(r), f"{p}, record {i}", dtype, energy_key)
            for i, r in enumerate(records)
        ]
        super().__init__(structures, source=str(p), **kwargs)
        self.path = p


def _kind(p: Path) -> str:
    if p.is_dir():
        if any(p.glob("*.aselmdb")):
            return "aselmdb"
        if any(p.glob("*.lmdb")):
            return "lmdb"
        raise FileNotFoundError(f"the folder {p} holds no '*.lmdb' or '*.aselmdb' files. {_HOW_TO_GET}")
    suffix = p.suffix.lower()
    if suffix == ".lmdb":
        return "lmdb"
    if suffix == ".aselmdb":
        return "aselmdb"
    if suffix == ".npz":
        return "md17"
    if suffix in (".pkl", ".pickle"):
        return "pickle"
    return "ase"


def open_dataset(
    path: str | Path,
    *,
    max_force: float | None = None,
    linear_reference: Any = None,
    system_reference: Any = None,
    transforms: list[Any] | None = None,
    **options: Any,
) -> StructureDataset:
    """Open any supported data file or folder as a dataset of structure dicts (eV, Å).

    Parameters
    ----------
    path : str or Path
        LMDB file or folder of shards, ``.aselmdb``, MD17 ``.npz``, pickle, or any ASE-readable file.
    max_force : float, optional
        Drop structures with an atom whose force norm exceeds this (eV/Å; OC20 uses 50). The number
        dropped is logged and kept as ``dataset.num_filtered``.
    linear_reference : array-like or path, optional
        Subtract per-element energies (OC22 ``lin_ref``).
    system_reference : mapping or path, optional
        Subtract per-system reference energies (OC20 ``oc20_ref``).
    transforms : list of callables, optional
        Further transforms, applied after the references.
    **options
        Passed to the reader: ``dtype``, ``on_error``, ``validate``, ``min_distance``, ``energy_key``,
        ``energy_unit``, ``length_unit``, ``format``.

    Returns
    -------
    StructureDataset
        Items carry ``pos``, ``atomic_numbers``, ``cell``, ``pbc``, ``energy``, ``forces``, ``tags``,
        ``fixed``, ``sid``, ``fid``.

    Raises
    ------
    FileNotFoundError
        When nothing is at ``path`` (the message says how to get the data).
    ValueError
        For unknown units, unreadable files or inconsistent contents.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"no dataset at {p} (looked for an LMDB file or folder of shards, an .aselmdb, an MD17 .npz "
            f"or an ASE-readable file). {_HOW_TO_GET}"
        )
    chain: list[Any] = []
    if system_reference is not None:
        chain.append(SystemReference(system_reference))
    if linear_reference is not None:
        chain.append(LinearReference(linear_reference))
    chain.extend(transforms or [])
    kind = _kind(p)
    common = {"dtype", "on_error", "validate", "min_distance"}
    allowed = {
        "lmdb": {"dtype", "on_error", "validate", "energy_key"},
        "aselmdb": {"dtype", "on_error", "validate", "energy_unit", "length_unit"},
        "md17": {"dtype", "on_error", "validate", "energy_unit"},
        "pickle": {"dtype", "on_error", "validate", "energy_key"},
        "ase": {
            "dtype",
            "on_error",
            "validate",
            "energy_unit",
            "length_unit",
            "format",
            "energy_key",
            "forces_key",
            "stress_key",
        },
    }[kind] | common
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(f"open_dataset: options {sorted(unknown)} do not apply to {kind} data at {p}")
    readers = {
        "lmdb": LmdbDataset,
        "aselmdb": AseLmdbDataset,
        "md17": MD17Dataset,
        "pickle": PickleDataset,
        "ase": AseDataset,
    }
    ds: StructureDataset = readers[kind](p, transforms=chain, **options)
    if max_force is not None:
        return filter_max_force(ds, max_force)
    return ds
