"""Convert any supported input into an OC20-layout sharded LMDB folder (with ``metadata.npz``).

Usage::

    python -m dens.data.convert INPUT [INPUT ...] --out DIR [--shards N] [--energy-unit kcal/mol]
                                [--max-force 50] [--skip-errors]

Inputs are anything :func:`dens.data.open_dataset` reads (extxyz, traj, ASE json, ``.aselmdb``, MD17
``.npz``, LMDB, pickles); several inputs are concatenated.

OC20 S2EF tarballs hold ``X.extxyz[.xz]`` files with a ``X.txt`` log beside each: one line
``random<sid>,frame<fid>,<reference energy>`` per frame. The S2EF target is the adsorption energy, the
total energy minus that reference (the official ``preprocess_ef.py --ref-energy``); training on total
energies instead breaks reproduction. So when such logs are present the choice must be explicit:
``--ref-energy`` (subtract the references, set ``sid``/``fid`` from the log) or ``--no-ref-energy``. The output is read by
:class:`~dens.data.LmdbDataset` (and by the official OCP readers), so MD17 trains from LMDB like the rest.

Examples
--------
>>> import tempfile, os
>>> from ase.build import molecule
>>> import ase.io
>>> d = tempfile.mkdtemp()
>>> ase.io.write(os.path.join(d, "w.xyz"), molecule("H2O"))
>>> convert([os.path.join(d, "w.xyz")], os.path.join(d, "out"))["written"]
1
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .open import open_dataset

__all__ = ["convert", "main"]

logger = logging.getLogger(__name__)


def convert(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    num_shards: int = 1,
    max_force: float | None = None,
    on_error: str = "raise",
    ref_energy: bool | None = None,
    **options: Any,
) -> dict[str, int]:
    """Convert ``inputs`` into an LMDB folder.

    Parameters
    ----------
    inputs : sequence of paths
        Files or folders readable by :func:`dens.data.open_dataset`.
    out_dir : str or Path
        Output folder (``data.0000.lmdb`` ..., ``metadata.npz``).
    num_shards : int
        Number of LMDB files.
    max_force : float, optional
        Drop frames with an atomic force norm above this (eV/Å).
    on_error : {"raise", "skip"}
        Skip (and count) unreadable or invalid entries instead of failing.
    ref_energy : bool, optional
        For inputs with an OC20 ``.txt`` frame log beside them: subtract the logged reference energies
        (True) or keep total energies (False). Required (not None) when such logs exist.
    **options
        Reader options (``energy_unit``, ``length_unit``, ``energy_key``, ``format``).

    Returns
    -------
    dict
        ``read``, ``written``, ``filtered`` (too large forces) and ``skipped`` (bad entries) counts.
    """
    from .lmdb import write_lmdb

    counts = {"read": 0, "written": 0, "filtered": 0, "skipped": 0}
    datasets = [open_dataset(p, on_error=on_error, **options) for p in inputs]
    logs = [_frame_log(Path(p)) for p in inputs]
    if any(log is not None for log in logs) and ref_energy is None:
        raise ValueError(
            "OC20 frame logs (.txt) found beside the inputs: pass --ref-energy to train on adsorption "
            "energies (the S2EF target) or --no-ref-energy to keep total energies"
        )

    def stream() -> Iterator[dict[str, Any]]:
        for ds, log, path in zip(datasets, logs, inputs, strict=True):
            if log is not None and len(log) != len(ds):
                raise ValueError(f"{path}: {len(ds)} frames but {len(log)} lines in its .txt frame log")
            for i in range(len(ds)):
                counts["read"] += 1
                s = ds[i]
                if s is None:
                    counts["skipped"] += 1
                    continue
                if log is not None:
                    sid, fid, reference = log[i]
                    s = {**s, "sid": sid, "fid": fid}
                    if ref_energy:
                        s["energy"] = s["energy"] - reference
                f = s.get("forces")
                if (
                    max_force is not None
                    and f is not None
                    and f.numel()
                    and float(f.norm(dim=-1).max()) > max_force
                ):
                    counts["filtered"] += 1
                    continue
                counts["written"] += 1
                yield s

    write_lmdb(stream(), out_dir, num_shards=num_shards)
    logger.info(
        "converted %d structures into %s (%d filtered by |F| > %s, %d skipped)",
        counts["written"],
        out_dir,
        counts["filtered"],
        max_force,
        counts["skipped"],
    )
    return counts


def _frame_log(path: Path) -> list[tuple[int, int, float]] | None:
    """The OC20 S2EF frame log beside ``X.extxyz`` / ``X.extxyz.xz`` (``X.txt``), parsed; None if absent."""
    name = path.name
    for suffix in (".extxyz.xz", ".extxyz"):
        if name.endswith(suffix):
            txt = path.with_name(name[: -len(suffix)] + ".txt")
            break
    else:
        return None
    if not txt.is_file():
        return None
    entries = []
    for number, line in enumerate(txt.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            system, frame, reference = line.split(",")[:3]
            entries.append(
                (int(system.removeprefix("random")), int(frame.removeprefix("frame")), float(reference))
            )
        except ValueError as err:
            raise ValueError(
                f"{txt}:{number}: expected 'random<sid>,frame<fid>,<energy>', got {line!r}"
            ) from err
    return entries


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m dens.data.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="input files or folders")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--shards", type=int, default=1, help="number of .lmdb files (default 1)")
    ap.add_argument(
        "--energy-unit",
        default=None,
        help="energy unit of files that do not state it (eV, meV, kcal/mol, ...)",
    )
    ap.add_argument("--length-unit", default=None, help="length unit of such files (default Å)")
    ap.add_argument(
        "--energy-key", default=None, help="record field used as the energy (LMDB / pickle input)"
    )
    ap.add_argument("--max-force", type=float, default=None, help="drop frames with |F| above this (eV/Å)")
    ap.add_argument(
        "--skip-errors", action="store_true", help="skip and count bad entries instead of failing"
    )
    ref = ap.add_mutually_exclusive_group()
    ref.add_argument(
        "--ref-energy",
        dest="ref_energy",
        action="store_true",
        default=None,
        help="OC20 S2EF: subtract the reference energies of the .txt frame logs (adsorption energies)",
    )
    ref.add_argument(
        "--no-ref-energy",
        dest="ref_energy",
        action="store_false",
        help="OC20 S2EF: keep total energies despite .txt frame logs",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = {
        k: v
        for k, v in (
            ("energy_unit", args.energy_unit),
            ("length_unit", args.length_unit),
            ("energy_key", args.energy_key),
        )
        if v is not None
    }
    counts = convert(
        args.inputs,
        args.out,
        num_shards=args.shards,
        max_force=args.max_force,
        on_error="skip" if args.skip_errors else "raise",
        ref_energy=args.ref_energy,
        **options,
    )
    logger.info("read %(read)d, written %(written)d, filtered %(filtered)d, skipped %(skipped)d", counts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
