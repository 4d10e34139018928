"""Structures and batches of structures.

A dataset item is a plain ``dict`` of tensors describing one structure (eV, Å):

==================  ==============  ===========================================================
key                 shape / dtype   meaning
==================  ==============  ===========================================================
``pos``             [N, 3] float    positions (Å)
``atomic_numbers``  [N] long        Z
``cell``            [1, 3, 3] float rows are lattice vectors (zeros where not periodic)
``pbc``             [1, 3] bool     periodic flags
``tags``            [N] long        OC20 tags (0 sub-surface, 1 surface, 2 adsorbate); 0 if unknown
``fixed``           [N] bool        constrained atoms
``energy``          [] float64      energy label, or absent / ``None``
``forces``          [N, 3] float    force labels (eV/Å), or absent / ``None``
``sid``, ``fid``    int or str      system and frame ids
``natoms``          [] long         N (optional; derived when absent)
==================  ==============  ===========================================================

Any other entry is carried into :attr:`Batch.extra`, joined as its declared kind says
(:data:`FIELD_KINDS`, :func:`register_field`, as nequip's field registry): ``"atom"`` entries (one row
per atom, e.g. ``pos_relaxed`` of IS2RE data) and ``"edge"`` entries (one row per edge of the item's
graph) are concatenated, ``"structure"`` entries (``energy_relaxed``, ``stress``, ``md_split``) are
stacked. An undeclared entry is stacked when it cannot be per-atom (a scalar, or a leading size other
than the atom count); one that has a row per atom in every item of a batch is ambiguous (a 3-vector of
a 3-atom molecule) and :func:`collate` refuses it, asking for a declaration. Non-tensor entries (strings)
are kept as a list.

:func:`collate` concatenates structures into a :class:`Batch`. If every item carries ``edge_index`` and
``cell_offsets`` (see :mod:`dens.data.graph` for the convention) the graphs are concatenated with
offset indices; otherwise ``Batch.edge_index`` is ``None`` and the model builds the graph.

Examples
--------
>>> import torch
>>> s = make_structure(pos=torch.zeros(2, 3), atomic_numbers=[1, 1], energy=-1.0)
>>> b = collate([s, s])
>>> b.num_graphs, b.natoms.tolist(), b.batch.tolist()
(2, [2, 2], [0, 0, 1, 1])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_MIN_DISTANCE",
    "FIELD_KINDS",
    "STRUCTURE_KEYS",
    "Batch",
    "check_requirements",
    "collate",
    "make_structure",
    "min_pair_distance",
    "register_field",
    "validate_structure",
]

#: Atoms closer than this (Å) make a structure invalid by default (duplicated atoms get no graph edge).
DEFAULT_MIN_DISTANCE = 0.1

STRUCTURE_KEYS = (
    "pos",
    "atomic_numbers",
    "cell",
    "pbc",
    "tags",
    "fixed",
    "energy",
    "forces",
    "sid",
    "fid",
    "natoms",
    "edge_index",
    "cell_offsets",
)


#: How :func:`collate` joins an extra entry: ``"atom"`` and ``"edge"`` (one row per atom / per edge:
#: concatenated) or ``"structure"`` (one value per structure: stacked); :func:`register_field` adds to it.
FIELD_KINDS: dict[str, str] = {
    "pos_relaxed": "atom",
    "energy_init": "structure",
    "energy_relaxed": "structure",
    "stress": "structure",
    "md_split": "structure",
}
_KINDS = ("atom", "structure", "edge")


def register_field(key: str, kind: str) -> None:
    """Declare how :func:`collate` joins the extra entry ``key`` of structure dicts.

    Call it where the dataset that makes the entry is defined (data loader workers import that module
    too). Declaring a key again with the same kind is harmless; another kind is an error.

    Parameters
    ----------
    key : str
        The entry's name (not one of :data:`STRUCTURE_KEYS`).
    kind : {"atom", "structure", "edge"}
        One row per atom, one value per structure, or one row per edge of the item's graph.

    Examples
    --------
    >>> register_field("dipole", "structure")
    >>> s = make_structure(torch.zeros(3, 3), [8, 1, 1], dipole=[0.0, 0.0, 0.4])
    >>> collate([s]).extra["dipole"].shape
    torch.Size([1, 3])
    """
    if kind not in _KINDS:
        raise ValueError(f"register_field({key!r}): kind must be one of {_KINDS}, got {kind!r}")
    if key in STRUCTURE_KEYS:
        raise ValueError(f"register_field({key!r}): a standard structure key; collate joins it itself")
    if FIELD_KINDS.get(key, kind) != kind:
        raise ValueError(f"register_field({key!r}, {kind!r}): already declared as {FIELD_KINDS[key]!r}")
    FIELD_KINDS[key] = kind


def _field_kind(key: str, values: list[Tensor], natoms: list[int]) -> str:
    """The declared kind of ``key``, or the only one its values allow (``ValueError`` when ambiguous)."""
    kind = FIELD_KINDS.get(key)
    if kind is not None:
        return kind
    if all(v.ndim >= 1 and v.shape[0] == n for v, n in zip(values, natoms, strict=True)):
        raise ValueError(
            f"collate: the entry {key!r} has one row per atom in every structure of this batch, so it may be "
            f"per-atom or per-structure; declare it: dens.data.register_field({key!r}, 'atom' or 'structure')"
        )
    return "structure"


def _tensor(x: Any, dtype: torch.dtype | None = None) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(dtype) if dtype is not None else x
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
        return t.to(dtype) if dtype is not None else t
    return torch.as_tensor(x, dtype=dtype)


def _id(x: Any) -> int | str | None:
    if x is None:
        return None
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"an id must be a scalar, got a tensor of shape {tuple(x.shape)}")
        return int(x.item())
    if isinstance(x, np.ndarray):
        x = x.item()
    if isinstance(x, (bool, np.bool_)):
        return int(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)) and float(x).is_integer():
        return int(x)
    return str(x)


def _forces(forces: Any, n: int, dtype: torch.dtype) -> Tensor:
    """Forces as [N, 3]; other layouts of 3N numbers ([3N], [1, N, 3]) are reshaped, any other shape is
    kept as it is for :func:`validate_structure` to report (a reshape would hide a wrong row count)."""
    f = _tensor(forces, dtype)
    if f.shape != (n, 3) and f.numel() == 3 * n and (f.ndim == 1 or f.shape[-1] == 3):
        f = f.reshape(n, 3)
    return f


def make_structure(
    pos: Any,
    atomic_numbers: Any,
    cell: Any | None = None,
    pbc: Any | None = None,
    tags: Any | None = None,
    fixed: Any | None = None,
    energy: float | Any | None = None,
    forces: Any | None = None,
    sid: int | str | None = None,
    fid: int | str | None = None,
    dtype: torch.dtype = torch.float32,
    **extra: Any,
) -> dict[str, Any]:
    """Build a structure dict with the standard keys, dtypes and shapes.

    Parameters
    ----------
    pos, atomic_numbers : array-like
        ``[N, 3]`` positions (Å) and ``[N]`` atomic numbers.
    cell : array-like, optional
        ``[3, 3]`` or ``[1, 3, 3]`` lattice vectors as rows; zeros when absent.
    pbc : array-like or bool, optional
        Periodic flags; default: periodic along the axes with a non-zero lattice vector.
    tags, fixed : array-like, optional
        Per-atom tags (default 0) and fixed flags (default False).
    energy : float, optional
        Energy (eV), stored as a float64 scalar.
    forces : array-like, optional
        ``[N, 3]`` forces (eV/Å).
    sid, fid : int or str, optional
        System and frame ids.
    dtype : torch.dtype
        Floating dtype of positions, cell and forces.
    **extra
        Further entries (converted to tensors when numeric).

    Returns
    -------
    dict
        The structure record.

    Examples
    --------
    >>> s = make_structure([[0, 0, 0], [0, 0, 1.1]], [6, 8], energy=-14.0)
    >>> s["cell"].shape, s["pbc"].tolist(), s["energy"].dtype
    (torch.Size([1, 3, 3]), [[False, False, False]], torch.float64)
    """
    pos_t = _tensor(pos, dtype).reshape(-1, 3)
    n = pos_t.shape[0]
    z = _tensor(atomic_numbers).reshape(-1)
    if z.is_floating_point():
        z = z.round()
    z = z.to(torch.long)
    if cell is None:
        cell_t = torch.zeros(1, 3, 3, dtype=dtype)
    else:
        cell_t = _tensor(cell, dtype).reshape(1, 3, 3)
    if pbc is None:
        pbc_t = (cell_t[0].abs().sum(-1) > 0).reshape(1, 3)
    else:
        pbc_t = _tensor(pbc).to(torch.bool).reshape(-1)
        if pbc_t.numel() == 1:
            pbc_t = pbc_t.expand(3)
        pbc_t = pbc_t.reshape(1, 3).clone()
    out: dict[str, Any] = {
        "pos": pos_t,
        "atomic_numbers": z,
        "cell": cell_t,
        "pbc": pbc_t,
        "tags": torch.zeros(n, dtype=torch.long)
        if tags is None
        else _tensor(tags).reshape(-1).to(torch.long),
        "fixed": torch.zeros(n, dtype=torch.bool)
        if fixed is None
        else _tensor(fixed).reshape(-1).to(torch.bool),
        "energy": None if energy is None else _tensor(energy, torch.float64).reshape(()),
        "forces": None if forces is None else _forces(forces, n, dtype),
        "sid": _id(sid),
        "fid": _id(fid),
        "natoms": torch.tensor(n, dtype=torch.long),
    }
    for k, v in extra.items():
        if v is None:
            continue
        if isinstance(v, (np.ndarray, list, tuple, float, int, np.number)) and not isinstance(v, str):
            v = _tensor(v)
            if v.is_floating_point() and v.dtype != torch.float64:
                v = v.to(dtype)
        out[k] = v
    return out


def validate_structure(item: Mapping[str, Any], where: str = "structure", min_distance: float = 0.0) -> None:
    """Raise a ``ValueError`` naming ``where`` if a structure record is unusable.

    Checks: at least one atom; per-atom arrays of matching length; forces of shape [N, 3]; finite
    positions, energy and forces; atomic numbers in 1..118; no two atoms closer than ``min_distance`` (Å).

    Parameters
    ----------
    item : Mapping
        A structure record (see the module docstring).
    where : str
        Where the record comes from (file and index), used in the message.

    Examples
    --------
    >>> validate_structure(make_structure(torch.zeros(0, 3), []), "demo:0")
    Traceback (most recent call last):
    ...
    ValueError: demo:0: structure has zero atoms
    """
    pos = item.get("pos")
    if pos is None:
        raise ValueError(f"{where}: structure has no positions")
    n = pos.shape[0]
    if n == 0:
        raise ValueError(f"{where}: structure has zero atoms")
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise ValueError(f"{where}: positions must be [N, 3], got {tuple(pos.shape)}")
    for key in ("atomic_numbers", "tags", "fixed", "forces"):
        v = item.get(key)
        if v is not None and (v.ndim == 0 or v.shape[0] != n):
            rows = "no rows" if v.ndim == 0 else f"{v.shape[0]} rows"
            raise ValueError(f"{where}: '{key}' has {rows} but the structure has {n} atoms")
    f = item.get("forces")
    if f is not None and tuple(f.shape) != (n, 3):
        raise ValueError(f"{where}: forces must have shape [{n}, 3] (atoms x 3), got {list(f.shape)}")
    if not bool(torch.isfinite(pos).all()):
        raise ValueError(f"{where}: positions contain NaN or infinite values")
    e = item.get("energy")
    if e is not None and not math.isfinite(float(e)):
        raise ValueError(f"{where}: energy is {float(e)} (NaN or infinite)")
    f = item.get("forces")
    if f is not None and not bool(torch.isfinite(f).all()):
        raise ValueError(f"{where}: forces contain NaN or infinite values")
    z = item.get("atomic_numbers")
    if z is not None and (bool((z < 1).any()) or bool((z > 118).any())):
        raise ValueError(f"{where}: atomic numbers outside 1..118")
    if min_distance > 0 and n > 1:
        d, i, j = min_pair_distance(pos, item.get("cell"), item.get("pbc"))
        if d < min_distance:
            raise ValueError(
                f"{where}: atoms {i} and {j} are {d:.4f} Å apart (closer than min_distance={min_distance} Å; "
                f"duplicated atoms?); fix the frame, skip it (on_error=skip) or lower min_distance"
            )


def min_pair_distance(
    pos: Tensor, cell: Tensor | None = None, pbc: Tensor | None = None
) -> tuple[float, int, int]:
    """The smallest distance between two atoms and their indices (minimum image along periodic axes).

    Periodic differences are wrapped to the nearest lattice image in fractional coordinates, which is exact
    for coincident atoms and an upper bound in strongly skewed cells (so it never reports a false pair).

    Examples
    --------
    >>> min_pair_distance(torch.tensor([[0.0, 0, 0], [0, 0, 0.5], [0, 0, 3]]))
    (0.5, 0, 1)
    """
    x = pos.detach().cpu().numpy().astype(np.float64)  # numpy: a few small ops, 2x faster than torch here
    diff = x[:, None, :] - x[None, :, :]
    periodic = (
        np.zeros(3, dtype=bool) if pbc is None else pbc.detach().cpu().numpy().reshape(-1, 3)[0].astype(bool)
    )
    if periodic.any() and cell is not None:
        c = cell.detach().cpu().numpy().reshape(3, 3).astype(np.float64)
        if abs(np.linalg.det(c)) > 1e-12:
            frac = diff @ np.linalg.inv(c)
            frac[..., periodic] -= np.round(frac[..., periodic])
            diff = frac @ c
    d2 = np.einsum("ijk,ijk->ij", diff, diff)
    np.fill_diagonal(d2, np.inf)
    i, j = divmod(int(np.argmin(d2)), d2.shape[1])
    return math.sqrt(float(d2[i, j])), i, j


def check_requirements(
    item: Mapping[str, Any], where: str, labels: Sequence[str] = (), element_limit: int | None = None
) -> None:
    """Raise a ``ValueError`` naming ``where`` if ``item`` lacks one of ``labels`` or has ``Z >= element_limit``.

    Examples
    --------
    >>> check_requirements(make_structure(torch.zeros(1, 3), [95], energy=0.0), "a.xyz, frame 3", (), 90)
    Traceback (most recent call last):
    ...
    ValueError: a.xyz, frame 3: atomic number 95 (Am) is not embedded by the model, which takes Z < 90 (max_num_elements=90)
    """
    for key in labels:
        if item.get(key) is None:
            raise ValueError(f"{where}: no {key} label (training needs {' and '.join(labels)})")
    z = item.get("atomic_numbers")
    if element_limit is not None and z is not None and z.numel() and int(z.max()) >= element_limit:
        from ase.data import chemical_symbols

        big = int(z.max())
        name = chemical_symbols[big] if big < len(chemical_symbols) else "?"
        raise ValueError(
            f"{where}: atomic number {big} ({name}) is not embedded by the model, which takes "
            f"Z < {element_limit} (max_num_elements={element_limit})"
        )


@dataclasses.dataclass
class Batch:
    """A batch of structures (concatenated atoms).

    Attributes
    ----------
    pos : Tensor
        ``[N, 3]`` positions (Å).
    atomic_numbers : Tensor
        ``[N]`` long.
    batch : Tensor
        ``[N]`` long, structure index of every atom (sorted).
    natoms : Tensor
        ``[B]`` long.
    cell : Tensor
        ``[B, 3, 3]`` lattice vectors as rows (zeros where not periodic).
    pbc : Tensor
        ``[B, 3]`` bool.
    tags : Tensor
        ``[N]`` long.
    fixed : Tensor
        ``[N]`` bool.
    energy : Tensor or None
        ``[B]`` float64 energy labels.
    forces : Tensor or None
        ``[N, 3]`` force labels.
    sid, fid : Tensor or list
        Ids: a long tensor when all are integers, else a list.
    edge_index : Tensor or None
        ``[2, E]`` (row 0 source j, row 1 target i), when the items carried graphs.
    cell_offsets : Tensor or None
        ``[E, 3]`` long images of the sources.
    extra : dict
        Other entries, joined as their kind says (:data:`FIELD_KINDS`): per-atom and per-edge entries
        concatenated, per-structure entries stacked.

    Examples
    --------
    >>> s = make_structure(torch.zeros(3, 3), [1, 1, 8])
    >>> collate([s]).to("cpu").num_graphs
    1
    """

    pos: Tensor
    atomic_numbers: Tensor
    batch: Tensor
    natoms: Tensor
    cell: Tensor
    pbc: Tensor
    tags: Tensor
    fixed: Tensor
    energy: Tensor | None = None
    forces: Tensor | None = None
    sid: Tensor | list[Any] | None = None
    fid: Tensor | list[Any] | None = None
    edge_index: Tensor | None = None
    cell_offsets: Tensor | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_graphs(self) -> int:
        """Number of structures."""
        return int(self.natoms.numel())

    @property
    def num_atoms(self) -> int:
        """Total number of atoms."""
        return int(self.pos.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor moved to ``device``."""

        def mv(x: Any) -> Any:
            if isinstance(x, Tensor):
                return x.to(device, non_blocking=non_blocking)
            if isinstance(x, dict):
                return {k: mv(v) for k, v in x.items()}
            return x

        return dataclasses.replace(
            self, **{f.name: mv(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )

    def pin_memory(self) -> Batch:
        """Pinned-memory copy (used by ``DataLoader(pin_memory=True)``)."""

        def pin(x: Any) -> Any:
            if isinstance(x, Tensor):
                return x.pin_memory()
            if isinstance(x, dict):
                return {k: pin(v) for k, v in x.items()}
            return x

        return dataclasses.replace(
            self, **{f.name: pin(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )

    def structure(self, index: int) -> dict[str, Any]:
        """The ``index``-th structure as a structure dict (without graph)."""
        start = int(self.natoms[:index].sum())
        stop = start + int(self.natoms[index])
        out: dict[str, Any] = {
            "pos": self.pos[start:stop],
            "atomic_numbers": self.atomic_numbers[start:stop],
            "cell": self.cell[index : index + 1],
            "pbc": self.pbc[index : index + 1],
            "tags": self.tags[start:stop],
            "fixed": self.fixed[start:stop],
            "energy": None if self.energy is None else self.energy[index],
            "forces": None if self.forces is None else self.forces[start:stop],
            "sid": None if self.sid is None else _pick(self.sid, index),
            "fid": None if self.fid is None else _pick(self.fid, index),
            "natoms": self.natoms[index],
        }
        return out


def _pick(ids: Tensor | list[Any], index: int) -> Any:
    return int(ids[index]) if isinstance(ids, Tensor) else ids[index]


def _collate_ids(values: list[Any]) -> Tensor | list[Any] | None:
    if all(v is None for v in values):
        return None
    vals = [_id(v) for v in values]
    if all(isinstance(v, int) for v in vals):
        return torch.tensor(vals, dtype=torch.long)
    return vals


def _all_or_none(items: Sequence[Mapping[str, Any]], key: str) -> bool:
    """Whether every item has ``key``; raises when only some have it (dropping the label of the whole
    batch would silently train or evaluate on a subset)."""
    has = [it.get(key) is not None for it in items]
    if all(has) or not any(has):
        return all(has)
    missing = [
        f"item {k} (sid={it.get('sid')!r}, fid={it.get('fid')!r})"
        for k, (it, h) in enumerate(zip(items, has, strict=True))
        if not h
    ]
    raise ValueError(
        f"collate: {', '.join(missing[:5])} of this batch have no {key} label while the others have one; "
        f"label every structure or none (a dataset's error names the file and frame when it requires labels)"
    )


def collate(items: Sequence[Mapping[str, Any]]) -> Batch:
    """Concatenate structure dicts into a :class:`Batch`.

    Parameters
    ----------
    items : sequence of dict
        Structure records (see the module docstring). A label is kept when every item has it; a batch
        in which only some items have it is an error (no label is dropped silently).
        ``None`` entries (skipped by a dataset with ``on_error="skip"``) are dropped.

    Returns
    -------
    Batch

    Examples
    --------
    >>> a = make_structure(torch.zeros(1, 3), [1], energy=0.5, edge_index=torch.zeros(2, 0, dtype=torch.long),
    ...                    cell_offsets=torch.zeros(0, 3, dtype=torch.long))
    >>> collate([a, a]).edge_index.shape
    torch.Size([2, 0])
    """
    if len(items) == 0:
        raise ValueError("collate: empty list of structures")
    items = [it for it in items if it is not None]  # entries skipped by a dataset with on_error="skip"
    if not items:
        raise ValueError("collate: every structure of this batch was skipped as unreadable")
    natoms = torch.tensor([int(it["pos"].shape[0]) for it in items], dtype=torch.long)
    batch = torch.repeat_interleave(torch.arange(len(items)), natoms)
    pos = torch.cat([it["pos"] for it in items], 0)
    dtype = pos.dtype

    def per_atom(key: str, default: Any) -> Tensor:
        vals = []
        for it, n in zip(items, natoms.tolist(), strict=True):
            v = it.get(key)
            vals.append(default(n) if v is None else v)
        return torch.cat(vals, 0)

    cells = []
    pbcs = []
    for it in items:
        c = it.get("cell")
        cells.append(torch.zeros(3, 3, dtype=dtype) if c is None else c.reshape(3, 3).to(dtype))
        p = it.get("pbc")
        pbcs.append(torch.zeros(3, dtype=torch.bool) if p is None else p.reshape(3).to(torch.bool))

    energy = None
    if _all_or_none(items, "energy"):
        energy = torch.stack([torch.as_tensor(it["energy"], dtype=torch.float64).reshape(()) for it in items])
    forces = None
    if _all_or_none(items, "forces"):
        forces = torch.cat([it["forces"] for it in items], 0)

    edge_index = cell_offsets = None
    if all(it.get("edge_index") is not None for it in items):
        offsets = torch.cumsum(natoms, 0) - natoms
        edge_index = torch.cat(
            [it["edge_index"] + o for it, o in zip(items, offsets.tolist(), strict=True)], 1
        )
        cell_offsets = torch.cat(
            [
                it["cell_offsets"]
                if it.get("cell_offsets") is not None
                else torch.zeros(it["edge_index"].shape[1], 3, dtype=torch.long)
                for it in items
            ],
            0,
        )

    extra: dict[str, Any] = {}
    common = set(items[0].keys()).difference(STRUCTURE_KEYS)
    for it in items[1:]:
        common &= set(it.keys())
    for key in sorted(common):
        vals = [it[key] for it in items]
        if not all(isinstance(v, Tensor) for v in vals):
            extra[key] = vals
            continue
        kind = _field_kind(key, vals, natoms.tolist())
        if kind != "structure":
            extra[key] = torch.cat(vals, 0)
            continue
        try:
            extra[key] = torch.stack(vals)
        except RuntimeError:
            extra[key] = vals  # per-structure values of different shapes

    return Batch(
        pos=pos,
        atomic_numbers=per_atom("atomic_numbers", lambda n: torch.zeros(n, dtype=torch.long)).to(torch.long),
        batch=batch,
        natoms=natoms,
        cell=torch.stack(cells),
        pbc=torch.stack(pbcs),
        tags=per_atom("tags", lambda n: torch.zeros(n, dtype=torch.long)).to(torch.long),
        fixed=per_atom("fixed", lambda n: torch.zeros(n, dtype=torch.bool)).to(torch.bool),
        energy=energy,
        forces=forces,
        sid=_collate_ids([it.get("sid") for it in items]),
        fid=_collate_ids([it.get("fid") for it in items]),
        edge_index=edge_index,
        cell_offsets=cell_offsets,
        extra=extra,
    )
