"""The demo data set shipped inside the package: real OC20 DFT relaxation frames as S2EF LMDBs.

Source: 17 of the 20 OC20 DFT relaxation trajectories (VASP, RPBE) in
``../shared/data/oc20/oc20_dft_relax_20sys.npz`` (the Open Catalyst 2020 data set, CC BY 4.0,
https://opencatalystproject.org; Chanussot et al., ACS Catal. 2021). The systems with at most 104 atoms
are used; about 20 frames per system are taken evenly along each relaxation (always including the last,
relaxed frame), and frames with an atomic force above 50 eV/Å are dropped, as OC20 does.

Energy target: ``energy = E_DFT(frame) - E_DFT(last frame of the same relaxation)`` in eV, i.e. the total
energy relative to the system's relaxed structure (0 for the relaxed frame, positive along the
relaxation). It is *not* the OC20 adsorption energy, and no further reference should be applied.
Forces are the raw DFT forces (eV/Å, fixed atoms included); ``tags`` and ``fixed`` are the OC20 ones.

Splits: ``test`` holds two whole relaxations never seen in training (generalisation to new systems);
``val`` holds every fourth selected frame of the other 15 relaxations and ``train`` the rest (225 / 75 /
40 frames). The validation metrics therefore measure how well a model interpolates along known
relaxations: with 15 systems, each its own material, forces do not transfer to new systems (see
``DEMO_SPLITS``). Experiments that measure generalisation must split by system, as ``test`` does. Files: ``dens/data/demo_data/{train,val,test}/data.0000.lmdb``
with ``metadata.npz`` (``natoms``).

Rebuild (from a checkout next to ``../shared``)::

    python -m dens.data.demo --build [--source ../shared/data/oc20/oc20_dft_relax_20sys.npz]

Examples
--------
>>> ds = demo_dataset("val")
>>> len(ds) > 0, ds[0]["pos"].shape[1]
(True, 3)
"""

from __future__ import annotations

import argparse
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .batch import make_structure
from .lmdb import LmdbDataset, write_lmdb

__all__ = ["DEMO_DIR", "DEMO_SPLITS", "OC20Relaxations", "build_demo", "demo_dataset", "demo_path"]

logger = logging.getLogger(__name__)

#: Folder of the packaged demo LMDBs.
DEMO_DIR = Path(__file__).resolve().parent / "demo_data"
#: Systems of the test split: unseen systems whose elements all occur in training (Pd, Sb, N, O; Ga, Te,
#: H, C, O). No OC20 system has all its element *pairs* in the others (each slab is its own material), so
#: with this little data forces do not transfer to new systems; the validation split therefore holds out
#: frames of the training relaxations instead (selected frames 1, 5, 9, ...: interpolation along
#: known relaxations), which is what the demo's validation metrics measure. Test metrics measure
#: generalisation to new systems.
DEMO_SPLITS: dict[str, list[str]] = {"test": ["random1000191", "random1000141"]}
VAL_EVERY = 4
MAX_ATOMS = 104
FRAMES_PER_SYSTEM = 20
MAX_FORCE = 50.0
DEFAULT_SOURCE = Path(__file__).resolve().parents[3] / "shared" / "data" / "oc20" / "oc20_dft_relax_20sys.npz"


def demo_path(split: str = "train") -> Path:
    """Folder of one demo split (``train``, ``val`` or ``test``)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown demo split {split!r}; use 'train', 'val' or 'test'")
    p = DEMO_DIR / split
    if not (p / "data.0000.lmdb").is_file():
        raise FileNotFoundError(
            f"demo data not found at {p}: the package was installed without its data files; rebuild with "
            f"`python -m dens.data.demo --build` from a checkout next to ../shared"
        )
    return p


def demo_dataset(split: str = "train", **kwargs: Any) -> LmdbDataset:
    """The packaged demo split as an :class:`~dens.data.LmdbDataset` (keyword options passed on)."""
    return LmdbDataset(demo_path(split), **kwargs)


class OC20Relaxations:
    """The OC20 relaxation ``.npz`` (``../shared/data/oc20``): its systems, their frames in relaxation order,
    and each frame as an S2EF structure.

    Parameters
    ----------
    source : str or Path
        ``oc20_dft_relax_20sys.npz``.
    """

    def __init__(self, source: str | Path) -> None:
        with np.load(source) as d:
            self.data = {k: d[k] for k in d.files if k != "README"}
        self.natoms = self.data["natoms"].astype(int)
        self.sids: list[str] = self.data["sid"].tolist()
        self._atom_off = np.concatenate([[0], np.cumsum(self.natoms)])
        # row offset of every frame in the concatenated positions / forces
        self._frame_rows = np.concatenate([[0], np.cumsum(self.natoms[self.data["frame_system"]])])

    def frames(self, system: int) -> np.ndarray:
        """Frame indices of one system, in relaxation order (the last is the relaxed structure)."""
        frames = np.nonzero(self.data["frame_system"] == system)[0]
        return frames[np.argsort(self.data["frame_index"][frames])]

    def max_force(self, frame: int) -> float:
        """Largest atomic force of a frame (eV/Å)."""
        rows = slice(self._frame_rows[frame], self._frame_rows[frame + 1])
        return float(np.linalg.norm(self.data["forces"][rows], axis=1).max())

    def structure(self, system: int, frame: int, reference_energy: float) -> dict[str, Any]:
        """A frame with energy target ``E_DFT(frame) - reference_energy`` (eV) and the raw DFT forces."""
        d, rows = self.data, slice(self._frame_rows[frame], self._frame_rows[frame + 1])
        atoms = slice(self._atom_off[system], self._atom_off[system + 1])
        return make_structure(
            pos=d["positions"][rows],
            atomic_numbers=d["atomic_numbers"][atoms].astype(np.int64),
            cell=d["cell"][system],
            pbc=d["pbc"],
            tags=d["tags"][atoms].astype(np.int64),
            fixed=d["fixed"][atoms],
            energy=float(d["energy"][frame]) - reference_energy,
            forces=d["forces"][rows],
            sid=int(self.sids[system].removeprefix("random")),
            fid=int(d["frame_index"][frame]),
        )


def _select_frames(energy: np.ndarray, fmax: np.ndarray, k: int) -> list[int]:
    n = len(energy)
    picks = sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))
    return [i for i in picks if fmax[i] <= MAX_FORCE]


def build_demo(source: str | Path = DEFAULT_SOURCE, out_dir: str | Path = DEMO_DIR) -> dict[str, int]:
    """Build the demo LMDBs from the OC20 relaxation ``.npz`` (see the module docstring).

    Returns
    -------
    dict
        Frames written per split.
    """
    src = Path(source)
    if not src.is_file():
        raise FileNotFoundError(
            f"demo source not found: {src} (expected ../shared/data/oc20/oc20_dft_relax_20sys.npz)"
        )
    relaxations = OC20Relaxations(src)
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    for s, sid in enumerate(relaxations.sids):
        if relaxations.natoms[s] > MAX_ATOMS:
            continue
        frames = relaxations.frames(s)
        energy = relaxations.data["energy"][frames]
        e_relaxed = float(energy[-1])
        fmax = np.array([relaxations.max_force(f) for f in frames])
        held_out = next((k for k, v in DEMO_SPLITS.items() if sid in v), None)
        for rank, i in enumerate(_select_frames(energy, fmax, FRAMES_PER_SYSTEM)):
            split = held_out or ("val" if rank % VAL_EVERY == 1 else "train")
            splits[split].append(relaxations.structure(s, frames[i], e_relaxed))
    out = Path(out_dir)
    counts = {}
    for split, structures in splits.items():
        folder = out / split
        if folder.exists():
            shutil.rmtree(folder)
        write_lmdb(structures, folder)
        counts[split] = len(structures)
    logger.info("demo data written to %s: %s", out, counts)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dens.data.demo --build``: rebuild the packaged demo data."""
    ap = argparse.ArgumentParser(
        prog="python -m dens.data.demo", description="Build or describe the demo data"
    )
    ap.add_argument("--build", action="store_true", help="rebuild the LMDBs from the OC20 relaxation .npz")
    ap.add_argument("--source", default=str(DEFAULT_SOURCE), help="oc20_dft_relax_20sys.npz")
    ap.add_argument("--out", default=str(DEMO_DIR), help="output folder")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.build:
        build_demo(args.source, args.out)
    for split in ("train", "val", "test"):
        ds = demo_dataset(split) if Path(args.out) == DEMO_DIR else LmdbDataset(Path(args.out) / split)
        logger.info("%s: %d frames, %d atoms", split, len(ds), int(ds.natoms.sum()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
