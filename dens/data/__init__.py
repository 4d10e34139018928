"""Data layer of ``dens``: readers, batches, periodic radius graphs, normalisers, samplers, demo data.

Everything public is re-exported here; see the submodules for details.
"""

from .ase_io import (
    AseDataset,
    AseLmdbDataset,
    atoms_to_structure,
    read_ase_file,
    structure_to_atoms,
    write_aselmdb,
)
from .batch import (
    FIELD_KINDS,
    STRUCTURE_KEYS,
    Batch,
    collate,
    make_structure,
    register_field,
    validate_structure,
)
from .dataset import (
    ENERGY_UNITS,
    LENGTH_UNITS,
    ConcatDataset,
    CorruptEntryError,
    InMemoryDataset,
    SetFields,
    StructureDataset,
    Subset,
    energy_factor,
    filter_max_force,
    get_natoms,
    length_factor,
    load_split,
    random_split_indices,
    save_split,
)
from .graph import DEGENERACY_TOLERANCE, MIN_DISTANCE, edge_vectors, num_images, radius_graph_pbc
from .lmdb import LmdbDataset, close_lmdb_envs, find_lmdb_files, structure_from_record, write_lmdb
from .md17 import MD17_MOLECULES, MD17Dataset, md17_splits, read_md17_npz, read_md17_xyz
from .normalize import (
    LinearReference,
    SystemReference,
    compute_statistics,
    fit_linear_reference,
    load_linear_reference,
)
from .open import PickleDataset, open_dataset
from .sampler import BalancedBatchSampler, balanced_partition

__all__ = [
    "DEGENERACY_TOLERANCE",
    "ENERGY_UNITS",
    "FIELD_KINDS",
    "LENGTH_UNITS",
    "MD17_MOLECULES",
    "MIN_DISTANCE",
    "STRUCTURE_KEYS",
    "AseDataset",
    "AseLmdbDataset",
    "BalancedBatchSampler",
    "Batch",
    "ConcatDataset",
    "CorruptEntryError",
    "InMemoryDataset",
    "LinearReference",
    "LmdbDataset",
    "MD17Dataset",
    "PickleDataset",
    "SetFields",
    "StructureDataset",
    "Subset",
    "SystemReference",
    "atoms_to_structure",
    "balanced_partition",
    "close_lmdb_envs",
    "collate",
    "compute_statistics",
    "edge_vectors",
    "energy_factor",
    "filter_max_force",
    "find_lmdb_files",
    "fit_linear_reference",
    "get_natoms",
    "length_factor",
    "load_linear_reference",
    "load_split",
    "make_structure",
    "md17_splits",
    "num_images",
    "open_dataset",
    "radius_graph_pbc",
    "random_split_indices",
    "read_ase_file",
    "read_md17_npz",
    "read_md17_xyz",
    "register_field",
    "save_split",
    "structure_from_record",
    "structure_to_atoms",
    "validate_structure",
    "write_aselmdb",
    "write_lmdb",
]
