"""Dataset base classes, subsets, splits, filters and units.

Every reader in :mod:`dens.data` returns a :class:`StructureDataset`: a map-style
``torch.utils.data.Dataset`` whose items are structure dicts (see :mod:`dens.data.batch`) in eV and Å.

Examples
--------
>>> import torch
>>> from dens.data.batch import make_structure
>>> ds = InMemoryDataset([make_structure(torch.zeros(1, 3), [1], energy=float(i)) for i in range(5)])
>>> len(ds), float(ds[3]["energy"])
(5, 3.0)
>>> split = random_split_indices(5, (2, 1, None), seed=1)
>>> [len(split[k]) for k in ("train", "val", "test")]
[2, 1, 2]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import ase.units
import numpy as np
import torch
from torch.utils.data import Dataset

from .batch import DEFAULT_MIN_DISTANCE, check_requirements, register_field, validate_structure

__all__ = [
    "ENERGY_UNITS",
    "LENGTH_UNITS",
    "CorruptEntryError",
    "InMemoryDataset",
    "StructureDataset",
    "Subset",
    "energy_factor",
    "filter_max_force",
    "get_natoms",
    "length_factor",
    "load_split",
    "random_split_indices",
    "require_labels",
    "save_split",
]

logger = logging.getLogger(__name__)

#: Energy units understood by the readers, as eV per unit. Forces use energy unit / length unit.
ENERGY_UNITS: dict[str, float] = {
    "eV": 1.0,
    "meV": 1e-3,
    "kcal/mol": ase.units.kcal / ase.units.mol,
    "kJ/mol": ase.units.kJ / ase.units.mol,
    "Hartree": ase.units.Hartree,
    "Ha": ase.units.Hartree,
    "Ry": ase.units.Rydberg,
}
#: Length units, as Å per unit.
LENGTH_UNITS: dict[str, float] = {"Å": 1.0, "A": 1.0, "Angstrom": 1.0, "Bohr": ase.units.Bohr, "nm": 10.0}


def energy_factor(unit: str) -> float:
    """eV per ``unit``; raises ``ValueError`` for an unknown unit.

    Examples
    --------
    >>> round(energy_factor("kcal/mol"), 7)
    0.0433641
    """
    try:
        return ENERGY_UNITS[unit]
    except KeyError:
        raise ValueError(f"unknown energy unit {unit!r}; known units: {sorted(ENERGY_UNITS)}") from None


def length_factor(unit: str) -> float:
    """Å per ``unit``; raises ``ValueError`` for an unknown unit.

    Examples
    --------
    >>> length_factor("nm")
    10.0
    """
    try:
        return LENGTH_UNITS[unit]
    except KeyError:
        raise ValueError(f"unknown length unit {unit!r}; known units: {sorted(LENGTH_UNITS)}") from None


class CorruptEntryError(ValueError):
    """An entry of a data file could not be decoded (names the file and index)."""


Transform = Callable[[dict[str, Any]], dict[str, Any]]


class StructureDataset(Dataset):
    """Base class of the readers: structure dicts with validation, transforms and error policy.

    Subclasses implement ``__len__``, ``_get(index)`` and ``describe(index)``.

    Parameters
    ----------
    transforms : sequence of callables, optional
        Applied to every structure dict, in order (e.g. energy references).
    on_error : {"raise", "skip"}
        ``"raise"``: a corrupt or invalid entry raises an error naming the file and index. ``"skip"``:
        such an entry yields ``None`` (dropped by :func:`~dens.data.batch.collate`), a warning is logged
        and :attr:`num_skipped` counts it (per process).
    validate : bool
        Check every structure (zero atoms, mismatched lengths, wrong shapes, NaN/inf labels, atoms closer
        than ``min_distance``).
    min_distance : float
        Smallest allowed distance (Å) between two atoms (periodic images included); closer pairs, e.g.
        duplicated atoms, get no edge in the graph and would train silently. 0 disables the check.

    Attributes
    ----------
    required_labels : tuple of str
        Labels every item must carry (set by :func:`require_labels` for training; default none).
    element_limit : int or None
        Atomic numbers must be below it (a model's ``max_num_elements``; set by :func:`require_labels`).
    """

    natoms: np.ndarray | None = None
    required_labels: tuple[str, ...] = ()
    element_limit: int | None = None

    def __init__(
        self,
        transforms: Sequence[Transform] | None = None,
        on_error: str = "raise",
        validate: bool = True,
        min_distance: float = DEFAULT_MIN_DISTANCE,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.transforms = list(transforms or [])
        self.on_error = on_error
        self.validate = validate
        self.min_distance = float(min_distance)
        self.num_skipped = 0

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _get(self, index: int) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Where item ``index`` comes from (file and index), for messages."""
        return f"{type(self).__name__}[{index}]"

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{type(self).__name__}: index {index} out of range for {n} structures")
        try:
            item = self._get(index)
            if self.validate:
                validate_structure(item, self.describe(index), min_distance=self.min_distance)
            for t in self.transforms:
                item = t(item)
            if self.required_labels or self.element_limit is not None:
                check_requirements(item, self.describe(index), self.required_labels, self.element_limit)
        except (CorruptEntryError, ValueError) as err:
            if self.on_error == "skip":
                self.num_skipped += 1
                logger.warning("skipped: %s (%d skipped so far)", err, self.num_skipped)
                return None
            raise
        return item

    def __iter__(self) -> Iterable[dict[str, Any] | None]:
        for i in range(len(self)):
            yield self[i]


class InMemoryDataset(StructureDataset):
    """A list of structure dicts.

    Parameters
    ----------
    structures : sequence of dict
        The records.
    source : str
        Name used in messages (e.g. the file they were read from).
    **kwargs
        See :class:`StructureDataset`.
    """

    def __init__(self, structures: Sequence[dict[str, Any]], source: str = "memory", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.structures = list(structures)
        self.source = source
        self.natoms = np.array([int(s["pos"].shape[0]) for s in self.structures], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.structures)

    def _get(self, index: int) -> dict[str, Any]:
        return dict(self.structures[index])

    def describe(self, index: int) -> str:
        return f"{self.source}, structure {index}"


class Subset(StructureDataset):
    """The items ``indices`` of ``dataset`` (keeps ``natoms`` metadata).

    Parameters
    ----------
    dataset : StructureDataset
        The parent.
    indices : sequence of int
        Parent indices.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int] | np.ndarray) -> None:
        super().__init__(validate=False)
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        parent_natoms = getattr(dataset, "natoms", None)
        self.natoms = None if parent_natoms is None else np.asarray(parent_natoms)[self.indices]
        self.num_filtered = 0

    def __len__(self) -> int:
        return len(self.indices)

    def _get(self, index: int) -> dict[str, Any]:
        return self.dataset[int(self.indices[index])]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"Subset: index {index} out of range for {len(self)} structures")
        return self.dataset[int(self.indices[index])]

    def describe(self, index: int) -> str:
        describe = getattr(self.dataset, "describe", None)
        return describe(int(self.indices[index])) if describe else f"item {self.indices[index]}"


class ConcatDataset(StructureDataset):
    """Several datasets one after the other (keeps ``natoms`` metadata when every part has it).

    Parameters
    ----------
    datasets : sequence of Dataset
        The parts, in order.
    """

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        super().__init__(validate=False)
        self.datasets = list(datasets)
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets])
        parts = [getattr(d, "natoms", None) for d in self.datasets]
        self.natoms = (
            None if any(p is None for p in parts) else np.concatenate([np.asarray(p) for p in parts])
        )

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int) -> tuple[Dataset, int]:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.datasets[part], index - int(self.offsets[part])

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"ConcatDataset: index {index} out of range for {len(self)} structures")
        dataset, local = self._locate(index)
        return dataset[local]

    def describe(self, index: int) -> str:
        dataset, local = self._locate(index)
        describe = getattr(dataset, "describe", None)
        return describe(local) if describe else f"item {local}"


class SetFields:
    """A transform that adds constant per-structure entries, e.g. ``SetFields({"md_split": True})``; it
    declares them per-structure (:func:`~dens.data.batch.register_field`).

    Examples
    --------
    >>> SetFields({"md_split": True})({"pos": torch.zeros(1, 3)})["md_split"]
    tensor(True)
    """

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = {k: torch.as_tensor(v) for k, v in values.items()}
        for key in self.values:
            register_field(key, "structure")

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        return {**item, **self.values}


def require_labels(
    dataset: Dataset, labels: Sequence[str] = ("energy", "forces"), element_limit: int | None = None
) -> int:
    """Make every reader under ``dataset`` (subsets and concatenations walked) refuse items without
    ``labels`` or with atomic numbers ``>= element_limit``, naming the file and frame (``on_error="skip"``
    skips them instead). Used by the trainer, whose losses need both labels and whose model embeds
    ``max_num_elements`` elements.

    Returns
    -------
    int
        The number of readers configured (0: the dataset is no :class:`StructureDataset`; the trainer
        then checks batches, naming sid/fid).

    Examples
    --------
    >>> from dens.data.batch import make_structure
    >>> ds = InMemoryDataset([make_structure(torch.zeros(1, 3), [1])], source="h.xyz")
    >>> require_labels(ds)
    1
    >>> ds[0]
    Traceback (most recent call last):
    ...
    ValueError: h.xyz, structure 0: no energy label (training needs energy and forces)
    """
    count = 0
    children = list(getattr(dataset, "datasets", None) or [])
    if getattr(dataset, "dataset", None) is not None:
        children.append(dataset.dataset)
    for child in children:
        count += require_labels(child, labels, element_limit)
    if not children and isinstance(dataset, StructureDataset):
        dataset.required_labels = tuple(labels)
        dataset.element_limit = element_limit
        count += 1
    return count


def get_natoms(dataset: Dataset) -> np.ndarray:
    """Atoms per structure: the dataset's metadata when present, else by reading every item (logged).

    Examples
    --------
    >>> import torch
    >>> from dens.data.batch import make_structure
    >>> get_natoms(InMemoryDataset([make_structure(torch.zeros(4, 3), [1] * 4)])).tolist()
    [4]
    """
    natoms = getattr(dataset, "natoms", None)
    if natoms is not None:
        return np.asarray(natoms, dtype=np.int64)
    logger.warning(
        "%s has no natoms metadata; reading every structure to count atoms", type(dataset).__name__
    )
    out = np.zeros(len(dataset), dtype=np.int64)
    for i in range(len(dataset)):
        item = dataset[i]
        out[i] = 0 if item is None else int(item["pos"].shape[0])
    return out


def filter_max_force(dataset: Dataset, max_force: float = 50.0) -> Subset:
    """Drop structures whose largest per-atom force norm exceeds ``max_force`` (eV/Å).

    OC20 drops frames with |F| > 50 eV/Å. The number dropped is logged and stored as
    ``subset.num_filtered``. Structures without forces are kept.

    Parameters
    ----------
    dataset : Dataset
        Any dataset of structure dicts (read once, streamed).
    max_force : float
        Limit on the force norm of any atom.

    Returns
    -------
    Subset

    Examples
    --------
    >>> import torch
    >>> from dens.data.batch import make_structure
    >>> ds = InMemoryDataset([make_structure(torch.zeros(1, 3), [1], forces=[[f, 0.0, 0.0]]) for f in (1., 60.)])
    >>> filter_max_force(ds, 50.0).num_filtered
    1
    """
    keep = []
    for i in range(len(dataset)):
        item = dataset[i]
        if item is None:
            continue
        f = item.get("forces")
        if f is not None and f.numel() and float(f.norm(dim=-1).max()) > max_force:
            continue
        keep.append(i)
    sub = Subset(dataset, keep)
    sub.num_filtered = len(dataset) - len(keep)
    logger.info(
        "filter_max_force: dropped %d of %d structures with |F| > %g eV/Å",
        sub.num_filtered,
        len(dataset),
        max_force,
    )
    return sub


def random_split_indices(
    n: int, sizes: Sequence[int | None] = (950, 50, None), seed: int = 1
) -> dict[str, np.ndarray]:
    """Seeded train/val/test split (MD17: 950 / 50 / rest, seed 1, as TorchMD-Net and Equiformer).

    The permutation is ``np.random.default_rng(seed).permutation(n)``; train takes the first
    ``sizes[0]`` entries, val the next ``sizes[1]``, test the next ``sizes[2]`` (``None``: the rest).

    Parameters
    ----------
    n : int
        Number of structures.
    sizes : (int, int, int or None)
        Split sizes.
    seed : int
        Seed of the permutation.

    Returns
    -------
    dict
        ``{"train", "val", "test"}`` index arrays, plus ``"seed"``.
    """
    train, val, test = sizes
    if train + val > n:
        raise ValueError(f"split sizes {train} + {val} exceed the {n} structures")
    perm = np.random.default_rng(seed).permutation(n)
    end = n if test is None else train + val + test
    if end > n:
        raise ValueError(f"split sizes {tuple(sizes)} exceed the {n} structures")
    return {
        "train": perm[:train],
        "val": perm[train : train + val],
        "test": perm[train + val : end],
        "seed": np.array(seed),
    }


def save_split(path: str | Path, split: dict[str, np.ndarray]) -> None:
    """Record a split as ``.npz`` (keys ``train``, ``val``, ``test``, ``seed``)."""
    np.savez(Path(path), **{k: np.asarray(v) for k, v in split.items()})


def load_split(path: str | Path) -> dict[str, np.ndarray]:
    """Read a split written by :func:`save_split` (also the official ``splits.npz``: ``idx_train``...)."""
    with np.load(Path(path)) as f:
        data = {k: f[k] for k in f.files}
    return {k.removeprefix("idx_"): v for k, v in data.items()}
