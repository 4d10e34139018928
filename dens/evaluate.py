"""Evaluation of a trained force field: S2EF metrics, prediction files and the test-server submission.

Metrics (the official OC20/OC22 evaluator definitions; forces count on free atoms only):

=========================  ==========  ========================================================================
key                        unit        definition
=========================  ==========  ========================================================================
``energy_mae``             meV         mean over structures of ``|E_pred - E|``
``forces_mae``             meV/Å       mean over free atoms and the three components of ``|F_pred - F|``
``forces_{x,y,z}_mae``     meV/Å       the same for one component
``forces_cosine``          1           mean over free atoms of the cosine between ``F_pred`` and ``F``
``forces_magnitude_error`` meV/Å       mean over free atoms of ``| |F_pred| - |F| |``
``efwt``                   %           structures with ``|ΔE| < 0.02 eV`` **and** ``max |ΔF| < 0.03 eV/Å``, the
                                       maximum over the free atoms and the three components
``stress_mae``             meV/Å³      mean over the nine components of ``|S_pred - S|`` (structures with a
                                       stress label, models with a stress head); ``stress_mae_GPa`` in GPa
=========================  ==========  ========================================================================

Over the four OC20 validation splits (ID, OOD-ads, OOD-cat, OOD-both) the paper reports the plain mean of
the per-split numbers: :func:`average_metrics`.

Prediction files (:func:`write_predictions`) follow the layout of the OCP ``predict`` mode: ``ids``
(``"sid_fid"`` strings), ``energy`` [S], ``forces`` (the free atoms of every structure, concatenated) and
``chunk_idx`` (the cumulative free-atom counts without the last, so that ``np.split(forces, chunk_idx)``
gives the per-structure arrays). The command line writes them in float32 and in the order of the file,
except for the OC20/OC22 test splits, which go to the evaluation server as it wants them: float16, ids
de-duplicated and sorted as ``np.unique`` does (the function's defaults). A ``.extxyz`` prediction path
(:func:`write_extxyz_predictions`) writes every structure with its labels and ``dens_energy`` /
``dens_forces`` (all atoms, float64, file order), as MACE's ``eval_configs`` does. :func:`merge_submission` merges the split files into the one file the evaluation server takes:
every key prefixed with its split, ``id``, ``ood_ads``, ``ood_cat``, ``ood_both`` (OC20) or ``id``,
``ood`` (OC22).

Command line::

    python -m dens.evaluate --checkpoint runs/demo/checkpoints/best.pt --data val_id.lmdb --split-name val_id
    dens-predict --checkpoint best.pt --data mine.extxyz --energy-key REF_energy --out predictions.extxyz

Examples
--------
>>> import torch
>>> from dens.data import collate, make_structure
>>> s = make_structure(torch.zeros(2, 3), [1, 1], energy=1.0, forces=torch.ones(2, 3))
>>> batch = collate([s])
>>> m = S2EFMetrics()
>>> m.update(torch.tensor([1.01], dtype=torch.float64), torch.ones(2, 3), batch)
>>> round(m.compute()["energy_mae"], 6), m.compute()["efwt"]
(10.0, 100.0)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase.units import GPa
from torch import Tensor, nn

from .checkpoint import element_names, unseen_elements
from .data.batch import Batch, collate
from .data.open import LABEL_OPTIONS
from .inference import model_device, model_dtype, prepare_batch, progress_bar
from .losses.stress import stress_abs_errors

__all__ = [
    "EFWT_ENERGY_THRESHOLD",
    "EFWT_FORCE_THRESHOLD",
    "SUBMISSION_SPLITS",
    "S2EFMetrics",
    "average_metrics",
    "batch_ids",
    "evaluate",
    "load_model",
    "main",
    "merge_submission",
    "model_dtype",
    "prepare_batch",
    "s2ef_metrics",
    "structure_id",
    "write_extxyz_predictions",
    "write_predictions",
]

logger = logging.getLogger(__name__)

#: EFwT thresholds: energy (eV) and the largest force-component error (eV/Å).
EFWT_ENERGY_THRESHOLD = 0.02
EFWT_FORCE_THRESHOLD = 0.03
#: Split prefixes of the evaluation-server files.
SUBMISSION_SPLITS: dict[str, tuple[str, ...]] = {
    "oc20": ("id", "ood_ads", "ood_cat", "ood_both"),
    "oc22": ("id", "ood"),
}


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------
class S2EFMetrics:
    """Streaming S2EF metrics (see the module docstring for the definitions and units).

    The one implementation of the metrics: :func:`evaluate` and the trainer's validation
    (:func:`dens.trainer.evaluate_s2ef`) both use it. Sums are kept in float64 on the device of the
    predictions (no transfer or synchronisation per batch); :meth:`compute` divides them. Structures
    without force labels count for the energy only.

    Parameters
    ----------
    energy_threshold, force_threshold : float
        EFwT thresholds (eV, eV/Å).
    device : str or torch.device, optional
        Where the sums live; default: where the first predictions are. Give it for :meth:`all_reduce`
        (a rank that saw no batch must still take part).

    Examples
    --------
    >>> import torch
    >>> from dens.data import collate, make_structure
    >>> s = make_structure(torch.zeros(2, 3), [1, 1], energy=0.0, forces=[[1.0, 0, 0], [0, 1.0, 0]],
    ...                    fixed=[False, True])
    >>> m = S2EFMetrics()
    >>> m.update(torch.tensor([0.5], dtype=torch.float64), torch.tensor([[1.0, 0, 0], [5.0, 5, 5]]),
    ...          collate([s]))
    >>> out = m.compute()
    >>> out["energy_mae"], out["forces_mae"], out["forces_cosine"], out["efwt"]
    (500.0, 0.0, 1.0, 0.0)
    """

    _KEYS = ("e_abs", "structures", "f_abs_x", "f_abs_y", "f_abs_z", "atoms", "cos", "mag", "efwt", "efwt_n",
             "s_abs", "s_n")  # fmt: skip

    def __init__(
        self,
        energy_threshold: float = EFWT_ENERGY_THRESHOLD,
        force_threshold: float = EFWT_FORCE_THRESHOLD,
        device: str | torch.device | None = None,
    ) -> None:
        self.energy_threshold, self.force_threshold = energy_threshold, force_threshold
        self.device = None if device is None else torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.sums: Tensor | None = None if self.device is None else self._zeros(self.device)

    def _zeros(self, device: torch.device) -> Tensor:
        return torch.zeros(len(self._KEYS), dtype=torch.float64, device=device)

    def _add(self, device: torch.device, **values: Tensor | float) -> None:
        if self.sums is None:
            self.sums = self._zeros(device)
        for key, value in values.items():
            self.sums[self._KEYS.index(key)] += value

    @torch.no_grad()
    def update(self, energy: Tensor | None, forces: Tensor | None, batch: Batch) -> None:
        """Add a batch of predictions (eV, eV/Å) against the labels of ``batch``.

        Parameters
        ----------
        energy : Tensor, optional
            ``[B]`` predicted energies.
        forces : Tensor, optional
            ``[N, 3]`` predicted forces of every atom (fixed ones are ignored).
        batch : Batch
            The structures with their ``energy`` / ``forces`` labels and ``fixed`` flags, on the device of
            the predictions.
        """
        de = None
        if energy is not None and batch.energy is not None:
            de = (energy.detach().double() - batch.energy.double()).abs()
            self._add(de.device, e_abs=de.sum(), structures=de.numel())
        if forces is None or batch.forces is None:
            return
        free = ~batch.fixed
        pred = forces.detach().double()
        target = batch.forces.double()
        df = (pred - target).abs()
        dff = df[free]
        self._add(
            df.device,
            f_abs_x=dff[:, 0].sum(),
            f_abs_y=dff[:, 1].sum(),
            f_abs_z=dff[:, 2].sum(),
            atoms=free.sum(),
            cos=torch.cosine_similarity(pred[free], target[free], dim=-1, eps=1e-8).sum(),
            mag=(pred[free].norm(dim=-1) - target[free].norm(dim=-1)).abs().sum(),
        )
        if de is not None:
            per_atom_max = torch.where(free, df.amax(dim=-1), torch.zeros_like(df[:, 0]))
            max_df = torch.zeros(batch.num_graphs, dtype=torch.float64, device=df.device).scatter_reduce(
                0, batch.batch, per_atom_max, reduce="amax", include_self=True
            )
            ok = (de < self.energy_threshold) & (max_df < self.force_threshold)
            self._add(df.device, efwt=ok.sum(), efwt_n=ok.numel())

    @torch.no_grad()
    def update_stress(self, stress: Tensor, batch: Batch) -> None:
        """Add ``[B, 3, 3]`` predicted stresses (eV/Å³) against the batch's ``stress`` labels, if any."""
        total, count = stress_abs_errors(stress, batch.extra.get("stress"))
        self._add(stress.device, s_abs=total, s_n=count)

    def all_reduce(self) -> None:
        """Sum the counts of every rank of a distributed run (nothing outside one)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if self.sums is None:
                raise RuntimeError(
                    "S2EFMetrics.all_reduce: give the metrics a device (every rank takes part)"
                )
            torch.distributed.all_reduce(self.sums)

    def compute(self) -> dict[str, float]:
        """The metrics so far (meV, meV/Å, %, meV/Å³); keys whose labels were never seen are absent."""
        values = self.sums.tolist() if self.sums is not None else [0.0] * len(self._KEYS)
        s = dict(zip(self._KEYS, values, strict=True))
        out: dict[str, float] = {}
        if s["structures"]:
            out["energy_mae"] = 1000.0 * s["e_abs"] / s["structures"]
        if s["atoms"]:
            n = s["atoms"]
            out["forces_mae"] = 1000.0 * (s["f_abs_x"] + s["f_abs_y"] + s["f_abs_z"]) / (3 * n)
            for axis in "xyz":
                out[f"forces_{axis}_mae"] = 1000.0 * s[f"f_abs_{axis}"] / n
            out["forces_cosine"] = s["cos"] / n
            out["forces_magnitude_error"] = 1000.0 * s["mag"] / n
        if s["efwt_n"]:
            out["efwt"] = 100.0 * s["efwt"] / s["efwt_n"]
        if s["s_n"]:
            out["stress_mae"] = 1000.0 * s["s_abs"] / s["s_n"]
            out["stress_mae_GPa"] = s["s_abs"] / s["s_n"] / GPa
        out["structures"] = float(s["structures"] or s["efwt_n"])
        out["free_atoms"] = float(s["atoms"])
        return out


def s2ef_metrics(
    energy: Tensor | None, forces: Tensor | None, batch: Batch, **thresholds: float
) -> dict[str, float]:
    """Metrics of one batch of predictions (a one-shot :class:`S2EFMetrics`).

    Examples
    --------
    >>> import torch
    >>> from dens.data import collate, make_structure
    >>> s = make_structure(torch.zeros(1, 3), [8], energy=2.0, forces=[[0.0, 0.0, 1.0]])
    >>> out = s2ef_metrics(torch.tensor([2.0], dtype=torch.float64), torch.tensor([[0.0, 0.0, 2.0]]),
    ...                    collate([s]))
    >>> round(out["forces_mae"], 3), out["forces_magnitude_error"], out["efwt"]
    (333.333, 1000.0, 0.0)
    """
    m = S2EFMetrics(**thresholds)
    m.update(energy, forces, batch)
    return m.compute()


def average_metrics(per_split: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The plain mean over splits of every metric present in all of them (as the paper averages).

    Examples
    --------
    >>> average_metrics({"val_id": {"energy_mae": 200.0}, "val_ood_ads": {"energy_mae": 300.0}})
    {'energy_mae': 250.0}
    """
    splits = list(per_split.values())
    if not splits:
        return {}
    keys = [k for k in splits[0] if k not in ("structures", "free_atoms") and all(k in s for s in splits)]
    return {k: float(np.mean([s[k] for s in splits])) for k in keys}


# --------------------------------------------------------------------------------------------------
# Ids and prediction files
# --------------------------------------------------------------------------------------------------
def structure_id(sid: Any, fid: Any, index: int | None = None) -> str:
    """The id of a structure in prediction files: ``"sid_fid"``, or ``"sid"`` when it has no frame id.

    Examples
    --------
    >>> structure_id(1000156, 3), structure_id("random5", None), structure_id(None, None, index=7)
    ('1000156_3', 'random5', '7')
    """
    if sid is None:
        if index is None:
            raise ValueError("a structure without sid needs an index for its id")
        sid = index
    return f"{sid}" if fid is None else f"{sid}_{fid}"


def batch_ids(batch: Batch, start: int = 0) -> list[str]:
    """Ids of the structures of a batch (see :func:`structure_id`); ``start`` numbers id-less ones."""

    def pick(ids: Any, i: int) -> Any:
        if ids is None:
            return None
        return int(ids[i]) if isinstance(ids, Tensor) else ids[i]

    return [structure_id(pick(batch.sid, i), pick(batch.fid, i), start + i) for i in range(batch.num_graphs)]


def write_predictions(
    path: str | Path,
    ids: Sequence[str],
    energy: Sequence[float] | np.ndarray,
    forces: Sequence[np.ndarray] | None = None,
    dtype: str | np.dtype = "float16",
    sort: bool = True,
) -> Path:
    """Write an OCP-layout prediction file.

    Parameters
    ----------
    path : str or Path
        The ``.npz`` to write (parents are created).
    ids : sequence of str
        ``"sid_fid"`` per structure.
    energy : array-like
        ``[S]`` energies (eV).
    forces : sequence of arrays, optional
        Per structure, the ``[n_free, 3]`` forces of its free atoms (eV/Å).
    dtype : str or numpy dtype
        Precision of energies and forces (official default float16; OC22 float32).
    sort : bool
        Drop duplicated ids (first kept) and sort the rest as ``np.unique`` orders (the evaluation
        server's layout); False keeps every structure in the given order.

    Returns
    -------
    Path
        The file.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> p = write_predictions(os.path.join(tempfile.mkdtemp(), "p.npz"), ["2_0", "1_0"], [0.5, 0.25],
    ...                       [np.ones((2, 3)), np.zeros((1, 3))])
    >>> f = np.load(p)
    >>> f["ids"].tolist(), f["energy"].tolist(), f["chunk_idx"].tolist(), f["forces"].shape
    (['1_0', '2_0'], [0.25, 0.5], [1], (3, 3))
    """
    ids_arr = np.asarray([str(i) for i in ids])
    energy_arr = np.asarray(energy, dtype=np.float64).reshape(-1)
    if len(ids_arr) != len(energy_arr):
        raise ValueError(f"{len(ids_arr)} ids but {len(energy_arr)} energies")
    if sort:
        _, keep = np.unique(ids_arr, return_index=True)  # sorted unique ids, first occurrence of each
    else:
        keep = np.arange(len(ids_arr))
    out: dict[str, np.ndarray] = {"ids": ids_arr[keep], "energy": energy_arr[keep].astype(dtype)}
    if forces is not None:
        if len(forces) != len(ids_arr):
            raise ValueError(f"{len(ids_arr)} ids but {len(forces)} force arrays")
        kept = [np.asarray(forces[i], dtype=np.float64).reshape(-1, 3) for i in keep]
        out["forces"] = (np.concatenate(kept, 0) if kept else np.zeros((0, 3))).astype(dtype)
        out["chunk_idx"] = np.cumsum([len(f) for f in kept])[:-1].astype(np.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **out)
    os.replace(tmp, path)
    return path


def write_extxyz_predictions(path: str | Path, structures: Sequence[Mapping[str, Any]],
                             energy: Sequence[float], forces: Sequence[np.ndarray]) -> Path:  # fmt: skip
    """Write structures with their labels (``energy`` / ``forces``, eV) and predictions (``dens_energy`` /
    ``dens_forces``, eV and eV/Å, every atom) to an extended XYZ file, in the given order.

    Examples
    --------
    >>> import os, tempfile, torch, ase.io
    >>> from dens.data import make_structure
    >>> s = make_structure(torch.zeros(1, 3), [8], energy=-2.0)
    >>> p = write_extxyz_predictions(os.path.join(tempfile.mkdtemp(), "p.extxyz"), [s], [-1.5], [np.zeros((1, 3))])
    >>> a = ase.io.read(p)
    >>> float(a.info["dens_energy"]), float(a.get_potential_energy())
    (-1.5, -2.0)
    """
    import ase.io

    from .data.ase_io import structure_to_atoms

    frames = []
    for s, e, f in zip(structures, energy, forces, strict=True):
        atoms = structure_to_atoms(dict(s))
        atoms.info["dens_energy"] = float(e)
        atoms.arrays["dens_forces"] = np.asarray(f, dtype=np.float64).reshape(len(atoms), 3)
        frames.append(atoms)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    ase.io.write(str(tmp), frames, format="extxyz")
    os.replace(tmp, path)
    return path


def _submission_prefix(name: str) -> str:
    for head in ("test_", "val_", "is2re_", "s2ef_"):
        if name.startswith(head):
            name = name[len(head) :]
    return name


def merge_submission(
    split_files: Mapping[str, str | Path], out_path: str | Path, dataset: str | None = None
) -> Path:
    """Merge per-split prediction files into one evaluation-server file with split-prefixed keys.

    Parameters
    ----------
    split_files : mapping
        Split name (``id``, ``ood_ads``, ... ; a ``test_`` / ``val_`` head is dropped) to its file.
    out_path : str or Path
        The merged ``.npz``.
    dataset : {'oc20', 'oc22'}, optional
        Require exactly that dataset's splits; guessed from the names when omitted.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> files = {s: write_predictions(os.path.join(d, f"{s}.npz"), ["1_0"], [0.0]) for s in ("id", "ood")}
    >>> sorted(np.load(merge_submission(files, os.path.join(d, "sub.npz"))).files)
    ['id_energy', 'id_ids', 'ood_energy', 'ood_ids']
    """
    files = {_submission_prefix(k): Path(v) for k, v in split_files.items()}
    if dataset is None:
        dataset = next((d for d, s in SUBMISSION_SPLITS.items() if set(s) == set(files)), None)
        if dataset is None:
            raise ValueError(
                f"splits {sorted(files)} are neither the OC20 {list(SUBMISSION_SPLITS['oc20'])} nor the "
                f"OC22 {list(SUBMISSION_SPLITS['oc22'])} test splits"
            )
    expected = SUBMISSION_SPLITS[dataset.lower()]
    if set(files) != set(expected):
        raise ValueError(f"{dataset} submissions need the splits {list(expected)}, got {sorted(files)}")
    merged: dict[str, np.ndarray] = {}
    for split in expected:
        with np.load(files[split], allow_pickle=False) as f:
            for key in f.files:
                merged[f"{split}_{key}"] = f[key]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_path, **merged)
    return out_path


# --------------------------------------------------------------------------------------------------
# Models and batches
# --------------------------------------------------------------------------------------------------
def load_model(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> nn.Module:
    """A :class:`~dens.models.ForceField` from a dens checkpoint, an official OCP/DeNS checkpoint or a
    fairchem 1.x EquiformerV2 checkpoint (OMat24 / MPtrj models, :mod:`dens.models.fairchem`).

    Official checkpoints are imported with :func:`dens.models.official.load_official_checkpoint`; the graph
    settings come from their ``config['model']`` (``max_radius``, ``max_neighbors``,
    ``enforce_max_neighbors_strictly``) and the normalisation from their ``normalizers`` (or the
    ``normalizer`` of the training data's transforms).

    Examples
    --------
    >>> model = load_model("runs/demo/checkpoints/best.pt")  # doctest: +SKIP
    """
    from .checkpoint import load_checkpoint
    from .models.potential import ForceField

    path = Path(path)
    state = load_checkpoint(path)
    config = (state.get("config") or {}) if isinstance(state, Mapping) else {}
    from .models.fairchem import is_fairchem_checkpoint, load_fairchem_checkpoint

    if is_fairchem_checkpoint(state):
        return load_fairchem_checkpoint(state, use_ema=use_ema).to(device).eval()
    if "resolved_normalizer" in config:
        return ForceField.from_checkpoint(path, device=device, use_ema=use_ema, state=state)
    if not isinstance(config.get("model"), Mapping) or "name" not in config["model"]:
        raise ValueError(f"{path} is neither a dens training checkpoint nor an official OCP/DeNS checkpoint")
    from .models.official import load_official_checkpoint

    backbone = load_official_checkpoint(state, use_ema=use_ema)
    mcfg = config["model"]
    e_mean, e_std, f_std = _official_normalizer(state)
    model = ForceField(
        backbone,
        cutoff=float(mcfg.get("max_radius", mcfg.get("cutoff", 12.0))),
        max_neighbors=mcfg.get("max_neighbors", 20),
        strict_max_neighbors=bool(mcfg.get("enforce_max_neighbors_strictly", True)),
        energy_mean=e_mean,
        energy_std=e_std,
        force_std=f_std,
    )
    return model.to(device).eval()


def _official_normalizer(state: Mapping[str, Any]) -> tuple[float, float, float]:
    norms = state.get("normalizers") or {}
    if "target" in norms:
        target, grad = norms["target"], norms.get("grad_target", norms["target"])
        return float(target["mean"]), float(target["std"]), float(grad["std"])
    cfg = state.get("config") or {}
    for path in (("dataset", "train", "transforms", "normalizer"), ("dataset", "transforms", "normalizer")):
        node: Any = cfg
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and "energy" in node:
            e, f = node["energy"], node.get("forces", node["energy"])
            return float(e.get("mean", 0.0)), float(e["stdev"]), float(f["stdev"])
    logger.warning("the checkpoint states no normaliser: predictions are in the model's normalised units")
    return 0.0, 1.0, 1.0


class UnseenElements:
    """Counts the structures with elements a model never saw in training; warns or raises (``policy``).

    Elements the model cannot embed at all (``Z >= max_num_elements``) always raise, naming the structures.
    """

    def __init__(self, model: nn.Module, policy: str = "warn", desc: str = "eval") -> None:
        from .calculator import element_limit

        if policy not in ("warn", "error", "ignore"):
            raise ValueError(f"unseen_elements must be 'warn', 'error' or 'ignore', got {policy!r}")
        self.model, self.policy, self.desc = model, policy, desc
        self.limit = element_limit(model) if isinstance(model, nn.Module) else None
        self.elements: set[int] = set()
        self.structures = 0

    def update(self, batch: Batch) -> None:
        if self.limit is not None and int(batch.atomic_numbers.max()) >= self.limit:
            big = int(batch.atomic_numbers.max())
            raise ValueError(
                f"{self.desc}: {element_names([big])} is beyond the model's embedding (max_num_elements="
                f"{self.limit}; structures (sid, fid): {list(zip(_ids(batch.sid), _ids(batch.fid), strict=False))})"
            )
        if self.policy == "ignore" or not getattr(self.model, "training_elements", None):
            return
        new = unseen_elements(self.model, torch.unique(batch.atomic_numbers).tolist())
        if not new:
            return
        per_structure = [
            unseen_elements(self.model, z.tolist()) for z in batch.atomic_numbers.split(batch.natoms.tolist())
        ]
        self.structures += sum(bool(u) for u in per_structure)
        self.elements.update(new)
        if self.policy == "error":
            raise ValueError(
                f"{self.desc}: element(s) {element_names(sorted(new))} never occurred in the model's training data "
                f"(structures (sid, fid): {list(zip(_ids(batch.sid), _ids(batch.fid), strict=False))}); pass "
                f"unseen_elements='warn' (--unseen-elements warn) to evaluate them anyway"
            )

    def report(self) -> None:
        if self.structures:
            logger.warning(
                "%s: %d structure(s) hold element(s) %s that never occurred in the model's training data; "
                "their predictions are extrapolations",
                self.desc, self.structures, element_names(sorted(self.elements)),
            )  # fmt: skip


def _ids(ids: Any) -> list[Any]:
    if ids is None:
        return []
    return ids.tolist() if isinstance(ids, Tensor) else list(ids)


def evaluate(
    model: nn.Module,
    dataset: Any,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    predictions_path: str | Path | None = None,
    prediction_dtype: str = "float16",
    progress: bool = False,
    desc: str = "eval",
    num_workers: int = 0,
    sort_ids: bool = True,
    unseen_elements: str = "warn",
) -> dict[str, float]:
    """Predict a dataset, return its S2EF metrics (when labelled) and optionally write its prediction file.

    Parameters
    ----------
    model : nn.Module
        Anything with ``predict(batch) -> {"energy", "forces"}`` (a :class:`~dens.models.ForceField`).
    dataset : Dataset
        Structure dicts (labels optional).
    batch_size : int
        Structures per forward pass.
    device : str or torch.device, optional
        Where to run (default: where the model is).
    predictions_path : str or Path, optional
        Write the OCP-layout prediction file there (``.npz``), or an extended XYZ file of the structures
        with their predictions (``.extxyz`` / ``.xyz``: :func:`write_extxyz_predictions`).
    prediction_dtype : str
        Precision of the ``.npz`` file.
    sort_ids : bool
        ``.npz``: de-duplicate and sort the ids (evaluation-server layout); False keeps the file order.
    progress : bool
        Show a tqdm bar.
    unseen_elements : {"warn", "error", "ignore"}
        Structures with elements the model never saw in training (``model.training_elements``): one
        warning with their count, a ``ValueError``, or nothing.

    Returns
    -------
    dict
        The :class:`S2EFMetrics` keys (only ``structures`` / ``free_atoms`` for unlabelled data).

    Examples
    --------
    >>> from dens.data.demo import demo_dataset
    >>> metrics = evaluate(model, demo_dataset("val"))  # doctest: +SKIP
    """
    from torch.utils.data import DataLoader

    device = torch.device(device) if device is not None else model_device(model)
    dtype = model_dtype(model)
    if isinstance(model, nn.Module):
        model.eval()
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers
    )
    metrics = S2EFMetrics()
    ids: list[str] = []
    energies: list[np.ndarray] = []
    forces: list[np.ndarray] = []
    extxyz = predictions_path is not None and Path(predictions_path).suffix.lower() in (".extxyz", ".xyz")
    kept: list[Mapping[str, Any]] = []
    from .models.potential import ForceField

    # a ForceField with gradient forces differentiates; any other predictor is run without grad
    direct = model.direct_forces if isinstance(model, ForceField) else True
    unseen = UnseenElements(model, unseen_elements, desc)
    for batch in progress_bar(loader, len(loader), desc, progress):
        unseen.update(batch)
        start = len(ids)
        batch = prepare_batch(batch, device, dtype)
        with torch.enable_grad() if not direct else contextlib.nullcontext():
            pred = model.predict(batch)
        metrics.update(pred["energy"], pred["forces"], batch)
        if "stress" in pred:
            metrics.update_stress(pred["stress"], batch)
        if predictions_path is not None:
            ids.extend(batch_ids(batch, start))
            energies.append(pred["energy"].detach().double().cpu().numpy())
            f = pred["forces"].detach().double().cpu()
            free = ~batch.fixed.cpu()
            for chunk, m in zip(torch.split(f, batch.natoms.tolist()), torch.split(free, batch.natoms.tolist()),
                                strict=True):  # fmt: skip
                forces.append(chunk.numpy() if extxyz else chunk[m].numpy())
            if extxyz:
                kept.extend(batch.to("cpu").structure(i) for i in range(batch.num_graphs))
    unseen.report()
    if predictions_path is not None:
        energy = np.concatenate(energies) if energies else []
        if extxyz:
            write_extxyz_predictions(predictions_path, kept, energy, forces)
        else:
            write_predictions(predictions_path, ids, energy, forces, prediction_dtype, sort=sort_ids)
    return metrics.compute()


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def _format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    cols = [
        ("energy_mae", "E MAE (meV)"),
        ("forces_mae", "F MAE (meV/Å)"),
        ("forces_cosine", "F cos"),
        ("forces_magnitude_error", "F mag (meV/Å)"),
        ("efwt", "EFwT (%)"),
        ("stress_mae", "S MAE (meV/Å³)"),
        ("structures", "structures"),
    ]
    if not any("stress_mae" in m for m in results.values()):
        cols = [c for c in cols if c[0] != "stress_mae"]
    width = max(12, *(len(k) for k in results))
    lines = [f"{'split':<{width}}" + "".join(f"{h:>15}" for _, h in cols)]
    for name, m in results.items():
        cells = []
        for key, _ in cols:
            v = m.get(key)
            cells.append(f"{'-':>15}" if v is None else f"{v:>15.{0 if key == 'structures' else 3}f}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m dens.evaluate``: metrics and prediction files of a checkpoint on one or more splits."""
    parser = argparse.ArgumentParser(
        prog="python -m dens.evaluate",
        description="Evaluate a dens (or imported official) checkpoint: S2EF metrics per split and their "
        "mean, OCP-layout prediction files, and the merged submission file when the names are the OC20 "
        "(id, ood_ads, ood_cat, ood_both) or OC22 (id, ood) test splits.",
    )
    parser.add_argument("--checkpoint", required=True, help="dens best.pt/last.pt or an official checkpoint")
    parser.add_argument(
        "--data", action="append", required=True, help="dataset path (repeat for more splits)"
    )
    parser.add_argument("--split-name", action="append", default=None, help="name of each --data (in order)")
    parser.add_argument("--out", default="eval", help="output folder (metrics.json, *_predictions.npz)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--no-ema", action="store_true", help="use the raw instead of the EMA weights")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N structures")
    parser.add_argument("--max-force", type=float, default=None, help="drop frames with |F| above this")
    parser.add_argument(
        "--prediction-dtype", default=None, choices=["float16", "float32", "float64"],
        help="precision of the .npz files (default: float16 for the OC20/OC22 test splits, as the evaluation "
        "server wants, else float32)",
    )  # fmt: skip
    parser.add_argument(
        "--prediction-format", default="npz", choices=["npz", "extxyz"],
        help="npz: OCP layout (free atoms; file order, or sorted ids for the test splits); extxyz: the "
        "structures with dens_energy / dens_forces (MACE eval_configs style)",
    )  # fmt: skip
    parser.add_argument("--no-predictions", action="store_true", help="do not write prediction files")
    parser.add_argument("--no-progress", action="store_true")
    _reader_options(parser)
    parser.add_argument(
        "--unseen-elements", default="warn", choices=["warn", "error", "ignore"],
        help="structures with elements absent from the training data: warn (default), refuse, or ignore",
    )  # fmt: skip
    args = parser.parse_args(argv)

    from .data import Subset, open_dataset

    names = args.split_name or []
    if len(names) > len(args.data):
        parser.error(f"{len(names)} --split-name for {len(args.data)} --data")
    names = names + [Path(p).stem for p in args.data[len(names) :]]
    if len(set(names)) != len(names):
        parser.error(f"split names must be distinct: {names}")
    submission = any({_submission_prefix(n) for n in names} == set(s) for s in SUBMISSION_SPLITS.values())
    dtype = args.prediction_dtype or ("float16" if submission else "float32")
    suffix = "extxyz" if args.prediction_format == "extxyz" else "npz"
    model = load_model(args.checkpoint, device=args.device, use_ema=not args.no_ema)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    prediction_files: dict[str, Path] = {}
    for name, path in zip(names, args.data, strict=True):
        dataset = open_dataset(path, max_force=args.max_force, **_options_of(args, path))
        if args.limit is not None:
            dataset = Subset(dataset, list(range(min(args.limit, len(dataset)))))
        pred_path = None if args.no_predictions else out / f"{name}_predictions.{suffix}"
        results[name] = evaluate(
            model, dataset, args.batch_size, args.device, pred_path, dtype,
            progress=not args.no_progress, desc=name, num_workers=args.num_workers, sort_ids=submission,
            unseen_elements=args.unseen_elements,
        )  # fmt: skip
        if pred_path is not None and suffix == "npz":
            prediction_files[name] = pred_path
    labelled = {k: v for k, v in results.items() if "energy_mae" in v or "forces_mae" in v}
    report: dict[str, Any] = {"checkpoint": str(args.checkpoint), "ema": not args.no_ema, "splits": results}
    if len(labelled) > 1:
        report["average"] = average_metrics(labelled)
    prefixes = {_submission_prefix(k) for k in prediction_files}
    for dataset_name, splits in SUBMISSION_SPLITS.items():
        if prediction_files and prefixes == set(splits):
            report["submission"] = str(
                merge_submission(prediction_files, out / "submission.npz", dataset_name)
            )
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    table = dict(results)
    if "average" in report:
        table["average"] = report["average"]
    print(_format_table(table))
    print(
        f"wrote {out / 'metrics.json'}" + (f" and {report['submission']}" if "submission" in report else "")
    )
    return report


def _reader_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reading files that do not state their units or use other label names")
    group.add_argument(
        "--energy-unit", help="energy unit of the data (forces: per Å): eV, meV, kcal/mol, ..."
    )
    group.add_argument("--energy-key", help="energy field (e.g. REF_energy; default energy, then REF_energy)")
    group.add_argument("--forces-key", help="forces field (e.g. REF_forces; default forces, then REF_forces)")
    group.add_argument("--stress-key", help="stress field (e.g. REF_stress; default stress, then virial)")


def _options_of(args: argparse.Namespace, path: str) -> dict[str, Any]:
    """Reader options given on the command line (an MD17 .npz is kcal/mol unless told)."""
    options = {k: getattr(args, k) for k in LABEL_OPTIONS if getattr(args, k)}
    suffix = Path(path).suffix.lower()
    if "energy_unit" not in options and suffix in (".xyz", ".extxyz"):
        logger.info("%s states no energy unit: reading eV (--energy-unit to say otherwise)", path)
    return options


def predict_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``dens-predict``: predictions of a checkpoint for one file (metrics too when it has labels)."""
    parser = argparse.ArgumentParser(
        prog="dens-predict",
        description="Predict total energies (eV) and forces (eV/Å) of every structure of a file with a dens (or "
        "imported official) checkpoint. --out *.extxyz: the structures with dens_energy / dens_forces; "
        "*.npz: OCP layout (float32, file order).",
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="any readable file (extxyz, traj, LMDB, .npz, ...)")
    parser.add_argument("--out", default="predictions.extxyz", help="*.extxyz / *.xyz or *.npz")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-ema", action="store_true", help="use the raw instead of the EMA weights")
    parser.add_argument("--prediction-dtype", default="float32", choices=["float16", "float32", "float64"])
    _reader_options(parser)
    args = parser.parse_args(argv)

    from .data import open_dataset

    model = load_model(args.checkpoint, device=args.device, use_ema=not args.no_ema)
    dataset = open_dataset(args.data, **_options_of(args, args.data))
    metrics = evaluate(model, dataset, args.batch_size, args.device, args.out, args.prediction_dtype,
                       sort_ids=False)  # fmt: skip
    if "energy_mae" in metrics or "forces_mae" in metrics:
        print(_format_table({Path(args.data).stem: metrics}))
    print(f"wrote {args.out} ({len(dataset)} structures)")
    return {"metrics": metrics, "predictions": str(args.out)}


if __name__ == "__main__":
    main()
