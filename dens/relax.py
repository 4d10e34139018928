"""IS2RE / IS2RS over whole splits: the L-BFGS of :mod:`dens.lbfgs` run in resumable chunks.

:func:`relax_dataset` runs a whole split in chunks, writes each finished chunk to ``out_dir/parts`` and
skips the ids already there on a restart, halves the batch when the device runs out of memory, and writes
the IS2RE prediction file (``ids``, ``energy``), the relaxed positions (``ids``, ``pos``, ``chunk_idx``) and,
when the data carry relaxed energies, the IS2RE energy MAE and EwT (:func:`is2re_metrics`).

The optimiser and its settings (:class:`~dens.lbfgs.BatchedLBFGS`, :func:`~dens.lbfgs.relax`,
:data:`~dens.lbfgs.RELAX_PRESETS`, the toy potentials) live in :mod:`dens.lbfgs` and are importable from
here as well.

Examples
--------
>>> import torch
>>> from dens.data import make_structure
>>> pot = HarmonicPotential(k=1.0)
>>> s = make_structure([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0]], [1, 1], dtype=torch.float64)
>>> res = relax([s], pot, RelaxSettings(fmax=1e-3, maxstep=0.1))
>>> res[0].converged, round(res[0].energy, 6)
(True, 0.0)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .evaluate import structure_id
from .inference import progress_bar
from .lbfgs import (
    RELAX_PRESETS,
    AsePotential,
    BatchedLBFGS,
    HarmonicPotential,
    RelaxResult,
    RelaxSettings,
    is_out_of_memory,
    relax,
    relax_with_retry,
    select_structures,
)

__all__ = [
    "RELAX_PRESETS",
    "AsePotential",
    "BatchedLBFGS",
    "HarmonicPotential",
    "RelaxResult",
    "RelaxSettings",
    "is2re_metrics",
    "is_out_of_memory",
    "relax",
    "relax_dataset",
    "relax_with_retry",
    "select_structures",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Whole splits
# --------------------------------------------------------------------------------------------------
def is2re_metrics(
    energy: Sequence[float], target: Sequence[float], threshold: float = 0.02
) -> dict[str, float]:
    """IS2RE energy MAE (meV) and energy within threshold (EwT, %, ``|ΔE| < threshold`` eV).

    Examples
    --------
    >>> is2re_metrics([1.0, 2.0], [1.01, 2.5])
    {'energy_mae': 255.0, 'ewt': 50.0, 'structures': 2.0}
    """
    e = np.asarray(energy, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    if e.shape != t.shape or e.size == 0:
        raise ValueError(f"need matching non-empty energies and targets, got {e.shape} and {t.shape}")
    err = np.abs(e - t)
    return {
        "energy_mae": round(float(1000.0 * err.mean()), 9),
        "ewt": float(100.0 * (err < threshold).mean()),
        "structures": float(e.size),
    }


def _save_part(path: Path, results: Sequence[RelaxResult]) -> None:
    sizes = [len(r.pos) for r in results]
    targets = [np.nan if r.target is None else r.target for r in results]
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        ids=np.asarray([r.id for r in results]),
        energy=np.asarray([r.energy for r in results], dtype=np.float64),
        target=np.asarray(targets, dtype=np.float64),
        fmax=np.asarray([r.fmax for r in results], dtype=np.float64),
        steps=np.asarray([r.steps for r in results], dtype=np.int64),
        converged=np.asarray([r.converged for r in results], dtype=bool),
        natoms=np.asarray(sizes, dtype=np.int64),
        pos=np.concatenate([r.pos for r in results], 0).astype(np.float32),
    )
    os.replace(tmp, path)


def _load_parts(parts_dir: Path) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    for p in sorted(parts_dir.glob("part_*.npz")):
        if p.name.endswith(".tmp.npz"):
            continue
        with np.load(p, allow_pickle=False) as f:
            pos = np.split(f["pos"], np.cumsum(f["natoms"])[:-1])
            for i, sid in enumerate(f["ids"].tolist()):
                done[sid] = {
                    "energy": float(f["energy"][i]),
                    "target": float(f["target"][i]),
                    "fmax": float(f["fmax"][i]),
                    "steps": int(f["steps"][i]),
                    "converged": bool(f["converged"][i]),
                    "pos": pos[i],
                }
    return done


def _chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def relax_dataset(
    model: Any,
    dataset: Any,
    out_dir: str | Path,
    settings: RelaxSettings | str = "oc20_2m",
    batch_size: int = 16,
    chunk_size: int = 256,
    device: str | torch.device | None = None,
    target_key: str | None = None,
    resume: bool = True,
    progress: bool = False,
    prediction_dtype: str = "float32",
) -> dict[str, Any]:
    """Relax every structure of a dataset, resumably, and write the IS2RE / IS2RS files.

    Parameters
    ----------
    model : object
        A :class:`~dens.models.ForceField` (or the same ``predict`` interface).
    dataset : Dataset
        Structure dicts (initial structures); ``energy_relaxed`` / ``y_relaxed`` fields, when present,
        give the IS2RE metrics.
    out_dir : str or Path
        Output folder: ``parts/part_XXXXX.npz`` per finished chunk, then ``is2re_predictions.npz``
        (``ids``, ``energy``), ``relaxed_positions.npz`` (``ids``, ``pos``, ``chunk_idx``) and
        ``summary.json``.
    settings : RelaxSettings or str
        Settings or a preset name.
    batch_size : int
        Structures relaxed together (halved on out-of-memory errors).
    chunk_size : int
        Structures per part file (the unit of resumption).
    device : str or torch.device, optional
        Where to relax (default: where the model is).
    target_key : str, optional
        Field holding the relaxed-energy label.
    resume : bool
        Skip the ids already in ``out_dir/parts`` (else start over).
    progress : bool
        Show a tqdm bar over structures.
    prediction_dtype : str
        Precision of the energies in ``is2re_predictions.npz``.

    Returns
    -------
    dict
        ``metrics`` (when labelled), ``converged`` fraction, mean ``steps``, ``relaxed`` (this call),
        ``skipped`` (already done), ``batch_size`` (final) and the written ``files``.

    Examples
    --------
    >>> summary = relax_dataset(model, open_dataset("is2re_val_id.lmdb"), "relax/val_id")  # doctest: +SKIP
    """
    if isinstance(settings, str):
        settings = RelaxSettings.preset(settings)
    out = Path(out_dir)
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    if not resume:
        for p in parts.glob("part_*.npz"):
            p.unlink()
    done = _load_parts(parts)
    skipped = 0
    relaxed = 0
    next_part = len(list(parts.glob("part_*.npz")))
    bar = progress_bar(range(len(dataset)), len(dataset), "relax", progress)
    update = getattr(bar, "update", lambda n: None)
    t0 = time.perf_counter()
    for chunk in _chunks(len(dataset), chunk_size):
        items = []
        for i in chunk:
            item = dataset[i]
            if item is None:
                continue
            rid = structure_id(item.get("sid"), item.get("fid"), i)
            if rid in done:
                skipped += 1
                continue
            item = dict(item)
            if item.get("sid") is None:
                item["sid"] = i
            items.append(item)
        update(len(chunk) - len(items))
        if not items:
            continue
        results, batch_size = relax_with_retry(
            items, model, settings, batch_size, device, target_key, on_batch=lambda r: update(len(r))
        )
        part = parts / f"part_{next_part:05d}.npz"
        _save_part(part, results)
        next_part += 1
        relaxed += len(results)
        for r in results:
            done[r.id] = {"energy": r.energy, "target": np.nan if r.target is None else r.target,
                          "fmax": r.fmax, "steps": r.steps, "converged": r.converged, "pos": r.pos}  # fmt: skip
    if hasattr(bar, "close"):
        bar.close()
    ids = sorted(done)
    energy = np.asarray([done[i]["energy"] for i in ids], dtype=np.float64)
    np.savez_compressed(
        out / "is2re_predictions.npz", ids=np.asarray(ids), energy=energy.astype(prediction_dtype)
    )
    pos = [done[i]["pos"] for i in ids]
    np.savez_compressed(
        out / "relaxed_positions.npz",
        ids=np.asarray(ids),
        pos=np.concatenate(pos, 0) if pos else np.zeros((0, 3), np.float32),
        chunk_idx=np.cumsum([len(p) for p in pos])[:-1].astype(np.int64),
    )
    summary: dict[str, Any] = {
        "settings": dataclasses.asdict(settings),
        "structures": len(ids),
        "relaxed": relaxed,
        "skipped": skipped,
        "batch_size": batch_size,
        "converged": float(np.mean([done[i]["converged"] for i in ids])) if ids else 0.0,
        "steps": float(np.mean([done[i]["steps"] for i in ids])) if ids else 0.0,
        "seconds": time.perf_counter() - t0,
        "files": [str(out / "is2re_predictions.npz"), str(out / "relaxed_positions.npz")],
    }
    targets = np.asarray([done[i]["target"] for i in ids], dtype=np.float64)
    labelled = ~np.isnan(targets)
    if labelled.any():
        summary["metrics"] = is2re_metrics(energy[labelled], targets[labelled])
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
