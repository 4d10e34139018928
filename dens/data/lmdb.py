"""OC20/OC22 S2EF and IS2RE LMDB readers and the writer of that layout.

Layout (as distributed by the Open Catalyst Project): one ``.lmdb`` file (``subdir=False``) or a folder of
``*.lmdb`` shards read in sorted order as one dataset. Keys are ASCII integers ``"0" .. "n-1"`` plus an
optional ``"length"`` entry; every value is a pickled torch_geometric ``Data`` (PyG 1.x or 2.x layout,
read without torch_geometric by :mod:`dens.data.pyg_pickle`) or a pickled dict. An optional
``metadata.npz`` beside the shards holds ``natoms`` (used by the balanced sampler).

Field names are normalised: energy from ``energy`` / ``y`` / ``y_relaxed`` (override with ``energy_key``),
forces from ``forces`` / ``force``; IS2RE fields ``y_init``, ``y_relaxed`` and ``pos_relaxed`` are kept as
``energy_init``, ``energy_relaxed`` and ``pos_relaxed``. OC20/OC22 LMDB structures are periodic in all
three directions unless the record carries ``pbc``.

Energies are returned as stored. The official OC20 S2EF files were written with ``--ref-energy`` and hold
adsorption-referenced energies; OC22 holds total energies, to which a linear reference is applied as a
transform (:class:`~dens.data.normalize.LinearReference`).

LMDB environments are opened lazily, once per process, and shared between datasets that read the same
file (``lmdb >= 2`` refuses to open one environment twice in a process); a forked ``DataLoader`` worker
drops the inherited handles and opens its own.

Examples
--------
>>> import tempfile, torch
>>> from dens.data.batch import make_structure
>>> d = tempfile.mkdtemp()
>>> _ = write_lmdb([make_structure(torch.rand(3, 3), [1, 1, 8], energy=-1.0)], d)
>>> ds = LmdbDataset(d)
>>> len(ds), ds.natoms.tolist(), ds[0]["atomic_numbers"].tolist()
(1, [3], [1, 1, 8])
"""

from __future__ import annotations

import bisect
import logging
import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch

from .batch import make_structure
from .dataset import CorruptEntryError, StructureDataset
from .pyg_pickle import dumps_data, loads, record_mapping

__all__ = [
    "LmdbDataset",
    "check_lmdb_size",
    "close_lmdb_envs",
    "find_lmdb_files",
    "open_lmdb_env",
    "structure_from_record",
    "write_lmdb",
]

logger = logging.getLogger(__name__)

_ENVS: dict[str, lmdb.Environment] = {}
_ENVS_PID: int = os.getpid()


def _forget_inherited_envs() -> None:
    global _ENVS_PID
    if _ENVS_PID != os.getpid():
        # handles inherited through fork(): close them in this process (the parent keeps its own)
        for env in _ENVS.values():
            try:
                env.close()
            except Exception:  # pragma: no cover - best effort
                pass
        _ENVS.clear()
        _ENVS_PID = os.getpid()


def open_lmdb_env(path: str | Path) -> lmdb.Environment:
    """The read-only environment of ``path``, opened once per process and shared.

    Parameters
    ----------
    path : str or Path
        An LMDB file (``subdir=False``).

    Returns
    -------
    lmdb.Environment
    """
    _forget_inherited_envs()
    key = os.path.realpath(path)
    env = _ENVS.get(key)
    if env is None:
        if not os.path.isfile(key):
            raise FileNotFoundError(f"LMDB file not found: {path}")
        try:
            env = lmdb.open(
                key, subdir=False, readonly=True, lock=False, readahead=True, meminit=False, max_readers=1
            )
        except lmdb.Error as err:
            raise CorruptEntryError(
                f"{path}: not a readable LMDB file ({type(err).__name__}: {err})"
            ) from err
        try:
            check_lmdb_size(env, key)
        except CorruptEntryError:
            env.close()
            raise
        _ENVS[key] = env
    return env


def check_lmdb_size(env: lmdb.Environment, path: str | Path) -> None:
    """Raise :class:`CorruptEntryError` if the file is shorter than the pages its metadata says it holds.

    Reading a page beyond the end of a memory-mapped file kills the process with SIGBUS, which no
    ``try`` can catch; a truncated copy (an interrupted download or ``cp``) is caught here instead, before
    any data page is read.
    """
    info, stat = env.info(), env.stat()
    needed = (int(info["last_pgno"]) + 1) * int(stat["psize"])
    size = os.path.getsize(path)
    if size < needed:
        raise CorruptEntryError(
            f"{path}: truncated LMDB file: {size:,} bytes, but its pages reach {needed:,} bytes (last page "
            f"{info['last_pgno']}); the copy or download was interrupted: copy it again"
        )


def close_lmdb_envs(path: str | Path | None = None) -> None:
    """Close the shared environment of ``path`` (or all of them) in this process."""
    _forget_inherited_envs()
    keys = list(_ENVS) if path is None else [os.path.realpath(path)]
    for key in keys:
        env = _ENVS.pop(key, None)
        if env is not None:
            env.close()


def find_lmdb_files(path: str | Path, suffix: str = ".lmdb") -> list[Path]:
    """The LMDB file ``path`` or the sorted ``*{suffix}`` shards of the folder ``path``."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.glob(f"*{suffix}") if f.is_file())
        if not files:
            raise FileNotFoundError(f"no '*{suffix}' files in the folder {p}")
        return files
    raise FileNotFoundError(f"LMDB path not found: {p}")


def _to_tensor(v: Any) -> torch.Tensor | None:
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        return v
    return torch.as_tensor(np.asarray(v))


def structure_from_record(
    record: dict[str, Any], where: str, dtype: torch.dtype = torch.float32, energy_key: str | None = None
) -> dict[str, Any]:
    """Normalise one OC20/OC22 record (attribute dict) into a structure dict.

    Parameters
    ----------
    record : dict
        Attributes of the pickled ``Data`` (see :func:`dens.data.pyg_pickle.record_mapping`).
    where : str
        File and index, for messages.
    dtype : torch.dtype
        Float dtype of positions, cell and forces.
    energy_key : str, optional
        Record field to use as ``energy``; default: the first of ``energy``, ``y``, ``y_relaxed``.

    Returns
    -------
    dict
    """
    pos = record.get("pos")
    z = record.get("atomic_numbers")
    if pos is None or z is None:
        raise CorruptEntryError(
            f"{where}: record has no 'pos' or 'atomic_numbers' (fields: {sorted(record)})"
        )
    if energy_key is not None:
        if energy_key not in record:
            raise ValueError(f"{where}: energy field {energy_key!r} absent (fields: {sorted(record)})")
        energy = record[energy_key]
    else:
        energy = next((record[k] for k in ("energy", "y", "y_relaxed") if record.get(k) is not None), None)
    forces = record.get("forces", record.get("force"))
    cell = _to_tensor(record.get("cell"))
    pbc = record.get("pbc")
    if pbc is None:
        pbc = cell is not None and bool(cell.abs().sum() > 0)
    extra: dict[str, Any] = {}
    if record.get("y_init") is not None:
        extra["energy_init"] = torch.as_tensor(
            float(_to_tensor(record["y_init"]).reshape(-1)[0]), dtype=torch.float64
        )
    if record.get("y_relaxed") is not None:
        extra["energy_relaxed"] = torch.as_tensor(
            float(_to_tensor(record["y_relaxed"]).reshape(-1)[0]), dtype=torch.float64
        )
    if record.get("pos_relaxed") is not None:
        extra["pos_relaxed"] = _to_tensor(record["pos_relaxed"]).to(dtype)
    if energy is not None:
        energy = float(_to_tensor(energy).reshape(-1)[0])
    sid, fid = record.get("sid"), record.get("fid")
    n = int(_to_tensor(pos).shape[0])
    natoms = record.get("natoms")
    if natoms is not None and int(_to_tensor(natoms).reshape(-1)[0]) != n:
        raise ValueError(f"{where}: natoms = {int(_to_tensor(natoms).reshape(-1)[0])} but pos has {n} rows")
    return make_structure(
        pos=_to_tensor(pos),
        atomic_numbers=_to_tensor(z),
        cell=cell,
        pbc=pbc,
        tags=_to_tensor(record.get("tags")),
        fixed=_to_tensor(record.get("fixed")),
        energy=energy,
        forces=_to_tensor(forces),
        sid=sid,
        fid=fid,
        dtype=dtype,
        **extra,
    )


class LmdbDataset(StructureDataset):
    """OC20/OC22 S2EF or IS2RE LMDB: one file or a folder of shards.

    Parameters
    ----------
    path : str or Path
        An ``.lmdb`` file or a folder of ``*.lmdb`` shards.
    energy_key : str, optional
        Record field used as ``energy`` (default: ``energy``, ``y`` or ``y_relaxed``).
    dtype : torch.dtype
        Float dtype of positions, cell and forces (energies are float64).
    **kwargs
        ``transforms``, ``on_error``, ``validate``: see :class:`~dens.data.dataset.StructureDataset`.

    Attributes
    ----------
    files : list of Path
        The shards.
    natoms : numpy.ndarray or None
        Atoms per structure from ``metadata.npz``, when present and consistent.
    """

    def __init__(
        self,
        path: str | Path,
        energy_key: str | None = None,
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.path = Path(path)
        self.files = find_lmdb_files(self.path)
        self.energy_key = energy_key
        self.dtype = dtype
        self._keys: list[list[bytes] | None] = []
        lengths = []
        for f in self.files:
            env = open_lmdb_env(f)
            with env.begin() as txn:
                raw = txn.get(b"length")
                if raw is not None:
                    try:
                        length = int(pickle.loads(raw))
                    except Exception as err:
                        raise CorruptEntryError(f"{f}: unreadable 'length' entry ({err})") from err
                    self._keys.append(None)
                else:
                    # no 'length': use the integer keys that are present
                    keys = sorted((k for k in txn.cursor().iternext(values=False) if k.isdigit()), key=int)
                    length = len(keys)
                    self._keys.append(keys)
            lengths.append(length)
        self._lengths = lengths
        self._cum = np.cumsum(lengths).tolist()
        self.natoms = self._load_metadata()

    def _load_metadata(self) -> np.ndarray | None:
        folder = self.path if self.path.is_dir() else self.path.parent
        meta = folder / "metadata.npz"
        if not meta.is_file():
            return None
        with np.load(meta) as m:
            natoms = m["natoms"] if "natoms" in m.files else None
        if natoms is None:
            return None
        if self.path.is_file():
            # a metadata.npz beside one file of a sharded folder describes the whole folder
            if len(natoms) != len(self):
                return None
        elif len(natoms) != len(self):
            logger.warning("%s has %d entries but %d structures; ignoring it", meta, len(natoms), len(self))
            return None
        return np.asarray(natoms, dtype=np.int64)

    def __len__(self) -> int:
        return self._cum[-1] if self._cum else 0

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, index within the shard) of a global index."""
        shard = bisect.bisect_right(self._cum, index)
        start = self._cum[shard - 1] if shard > 0 else 0
        return shard, index - start

    def describe(self, index: int) -> str:
        shard, local = self.locate(index)
        return f"{self.files[shard]}, entry {local}"

    def read_record(self, index: int) -> dict[str, Any]:
        """The raw attribute dict of entry ``index``."""
        shard, local = self.locate(index)
        keys = self._keys[shard]
        key = keys[local] if keys is not None else str(local).encode("ascii")
        env = open_lmdb_env(self.files[shard])
        with env.begin() as txn:
            blob = txn.get(key)
        if blob is None:
            raise CorruptEntryError(f"{self.files[shard]}, entry {local}: key {key.decode()!r} is missing")
        try:
            return record_mapping(loads(blob))
        except Exception as err:
            raise CorruptEntryError(
                f"{self.files[shard]}, entry {local}: cannot decode the record ({type(err).__name__}: {err})"
            ) from err

    def _get(self, index: int) -> dict[str, Any]:
        return structure_from_record(
            self.read_record(index), self.describe(index), self.dtype, self.energy_key
        )

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)  # no environment handles are stored on the dataset


def _record_from_structure(s: dict[str, Any], index: int) -> dict[str, Any]:
    pos = s["pos"].detach().to(torch.float32)
    n = pos.shape[0]
    rec: dict[str, Any] = {
        "pos": pos,
        "cell": s["cell"].detach().reshape(1, 3, 3).to(torch.float32),
        "atomic_numbers": s["atomic_numbers"].to(torch.float32),
        "natoms": int(n),
        "tags": s["tags"].to(torch.long),
        "fixed": s["fixed"].to(torch.float32),
        "pbc": s["pbc"].reshape(1, 3).to(torch.bool),
        "sid": s.get("sid") if s.get("sid") is not None else index,
        "fid": s.get("fid") if s.get("fid") is not None else 0,
    }
    if s.get("energy") is not None:
        rec["energy"] = float(s["energy"])
    if s.get("forces") is not None:
        rec["forces"] = s["forces"].detach().to(torch.float32)
    for src, dst in (("energy_init", "y_init"), ("energy_relaxed", "y_relaxed")):
        if s.get(src) is not None:
            rec[dst] = float(s[src])
    if s.get("pos_relaxed") is not None:
        rec["pos_relaxed"] = s["pos_relaxed"].detach().to(torch.float32)
    return rec


def write_lmdb(
    structures: Iterable[dict[str, Any] | None],
    out_dir: str | Path,
    num_shards: int = 1,
    prefix: str = "data",
    map_size: int = 1 << 40,
) -> np.ndarray:
    """Write structures as an OC20 S2EF LMDB folder: ``{prefix}.0000.lmdb`` ... and ``metadata.npz``.

    Structure ``k`` goes to shard ``k % num_shards``; every shard has keys ``"0" ..`` and ``"length"``;
    values are pickled PyG 1.x ``Data`` objects with ``pos``, ``cell`` [1,3,3], ``atomic_numbers``,
    ``natoms``, ``tags``, ``fixed``, ``pbc``, ``energy``, ``forces``, ``sid``, ``fid`` (float32 arrays).
    ``metadata.npz`` holds ``natoms`` in the global order of :class:`LmdbDataset` (shard after shard).
    ``None`` items (skipped entries) are ignored.

    Parameters
    ----------
    structures : iterable of dict
        Structure records (streamed).
    out_dir : str or Path
        Output folder (created).
    num_shards : int
        Number of ``.lmdb`` files.
    prefix : str
        File name prefix.
    map_size : int
        LMDB map size (sparse; the files only take what they hold).

    Returns
    -------
    numpy.ndarray
        ``natoms`` as written to ``metadata.npz``.
    """
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{prefix}.{k:04d}.lmdb" for k in range(num_shards)]
    for p in paths:
        close_lmdb_envs(p)
        if p.exists():
            raise FileExistsError(f"{p} exists; remove it or write to another folder")
    envs = [
        lmdb.open(str(p), subdir=False, map_size=map_size, meminit=False, map_async=True, lock=False)
        for p in paths
    ]
    counts = [0] * num_shards
    natoms: list[list[int]] = [[] for _ in range(num_shards)]
    txns = [env.begin(write=True) for env in envs]
    try:
        k = 0
        for s in structures:
            if s is None:
                continue
            shard = k % num_shards
            rec = _record_from_structure(s, k)
            txns[shard].put(str(counts[shard]).encode("ascii"), dumps_data(rec))
            counts[shard] += 1
            natoms[shard].append(rec["natoms"])
            k += 1
            if counts[shard] % 1000 == 0:
                txns[shard].commit()
                txns[shard] = envs[shard].begin(write=True)
        for shard in range(num_shards):
            txns[shard].put(b"length", pickle.dumps(counts[shard], protocol=-1))
            txns[shard].commit()
    finally:
        for env in envs:
            env.sync()
            env.close()
    all_natoms = np.array([n for shard in natoms for n in shard], dtype=np.int64)
    np.savez(out / "metadata.npz", natoms=all_natoms)
    logger.info("wrote %d structures to %d shard(s) in %s", len(all_natoms), num_shards, out)
    return all_natoms
