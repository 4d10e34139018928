"""Batched structure relaxation with L-BFGS on the device: the optimiser, its presets and toy potentials.

:class:`BatchedLBFGS` relaxes many structures at once with the L-BFGS of the OC20 relaxations:

* a history of the last ``memory`` position and force differences, initial inverse Hessian ``1 / alpha``;
* the step of every structure is rescaled so that its longest atomic step is at most ``maxstep``, then
  multiplied by ``damping``;
* a structure has converged when the largest force norm over its atoms (fixed atoms excluded: their
  forces are zeroed, as ASE's ``FixAtoms`` does) is below ``fmax``; it then stops moving and is no longer
  evaluated; the others go on until ``steps`` position updates.
* Fixed atoms never move.

Every structure runs its own L-BFGS: the two-loop recursion uses per-structure dot products, so a
structure relaxes exactly as it would alone, whatever else is in the batch. (The official batched
optimiser takes the dot products over the whole batch, which couples the structures of a batch; this is
the one deliberate difference.)

:data:`RELAX_PRESETS` names the settings of the DeNS configurations (see ``OFFICIAL_SETTINGS.md``):

=============  =====  ======  =======  =======  =====  ======
preset         fmax   steps   maxstep  memory   alpha  damping
=============  =====  ======  =======  =======  =====  ======
``oc20_2m``    0.05   200     0.04     50       70     1.0
``oc20_all``   0.02   300     0.2      50       80     1.2
``oc22``       0.02   300     0.2      50       80     1.2
=============  =====  ======  =======  =======  =====  ======

(The All+MD and OC22 configs do not restate ``memory``; 50 is the value of the 2M config.)

:mod:`dens.relax` runs whole IS2RE splits with it (:func:`dens.relax.relax_dataset`).

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
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .data.batch import Batch, collate
from .evaluate import batch_ids
from .inference import model_device, model_dtype, prepare_batch
from .models.heads import edge_gradient_forces
from .ops import scatter_sum

__all__ = [
    "RELAX_PRESETS",
    "AsePotential",
    "BatchedLBFGS",
    "HarmonicPotential",
    "RelaxResult",
    "RelaxSettings",
    "is_out_of_memory",
    "relax",
    "relax_with_retry",
    "select_structures",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelaxSettings:
    """L-BFGS relaxation settings (the OCP ``relax_opt`` plus ``relaxation_steps`` / ``relaxation_fmax``).

    Attributes
    ----------
    fmax : float
        Convergence: largest force norm over the free atoms (eV/Å).
    steps : int
        Most position updates per structure.
    maxstep : float
        Longest atomic step per update (Å), before ``damping``.
    memory : int
        L-BFGS history length.
    damping : float
        Factor applied to every step.
    alpha : float
        Initial Hessian guess (eV/Å²); the inverse Hessian starts as ``1 / alpha``.
    """

    fmax: float = 0.05
    steps: int = 200
    maxstep: float = 0.04
    memory: int = 50
    damping: float = 1.0
    alpha: float = 70.0

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> RelaxSettings:
        """A named preset of :data:`RELAX_PRESETS` with optional overrides.

        Examples
        --------
        >>> RelaxSettings.preset("oc20_all").fmax
        0.02
        """
        if name not in RELAX_PRESETS:
            raise KeyError(f"unknown relaxation preset {name!r}; choose from {sorted(RELAX_PRESETS)}")
        return dataclasses.replace(RELAX_PRESETS[name], **overrides)


#: The relaxation settings of the DeNS / EquiformerV2 configurations.
RELAX_PRESETS: dict[str, RelaxSettings] = {
    "oc20_2m": RelaxSettings(fmax=0.05, steps=200, maxstep=0.04, memory=50, damping=1.0, alpha=70.0),
    "oc20_all": RelaxSettings(fmax=0.02, steps=300, maxstep=0.2, memory=50, damping=1.2, alpha=80.0),
    "oc22": RelaxSettings(fmax=0.02, steps=300, maxstep=0.2, memory=50, damping=1.2, alpha=80.0),
}


@dataclass
class RelaxResult:
    """The outcome of one relaxation (eV, Å).

    Attributes
    ----------
    id : str
        ``"sid"`` or ``"sid_fid"`` (see :func:`dens.evaluate.structure_id`).
    energy : float
        Energy at the final positions.
    pos : np.ndarray
        ``[n, 3]`` final positions.
    forces : np.ndarray
        ``[n, 3]`` forces at the final positions (fixed atoms included, unconstrained).
    fmax : float
        Largest force norm over the free atoms at the end.
    steps : int
        Position updates made.
    converged : bool
        Whether ``fmax`` was reached.
    energies : list of float
        Energy after every evaluation (initial structure first).
    target : float, optional
        The relaxed-energy label, when the data carry one.
    """

    id: str
    energy: float
    pos: np.ndarray
    forces: np.ndarray
    fmax: float
    steps: int
    converged: bool
    energies: list[float] = field(default_factory=list)
    target: float | None = None


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def _segment_max(x: Tensor, index: Tensor, size: int) -> Tensor:
    return x.new_zeros(size).scatter_reduce(0, index, x, reduce="amax", include_self=True)


def select_structures(batch: Batch, keep: Tensor) -> Batch:
    """The structures ``keep`` (``[B]`` bool) of a batch, without labels or graph.

    Examples
    --------
    >>> import torch
    >>> from dens.data import collate, make_structure
    >>> b = collate([make_structure(torch.zeros(n, 3), [1] * n) for n in (1, 2, 3)])
    >>> select_structures(b, torch.tensor([True, False, True])).natoms.tolist()
    [1, 3]
    """
    keep = keep.to(batch.natoms.device)
    atom_keep = keep[batch.batch]
    new_index = torch.cumsum(keep.long(), 0) - 1

    def pick(ids: Any) -> Any:
        if ids is None:
            return None
        if isinstance(ids, Tensor):
            return ids[keep.to(ids.device)]
        return [v for v, k in zip(ids, keep.tolist(), strict=True) if k]

    return Batch(
        pos=batch.pos[atom_keep],
        atomic_numbers=batch.atomic_numbers[atom_keep],
        batch=new_index[batch.batch[atom_keep]],
        natoms=batch.natoms[keep],
        cell=batch.cell[keep],
        pbc=batch.pbc[keep],
        tags=batch.tags[atom_keep],
        fixed=batch.fixed[atom_keep],
        sid=pick(batch.sid),
        fid=pick(batch.fid),
    )


def is_out_of_memory(err: BaseException) -> bool:
    """Whether an exception is a device out-of-memory error (CUDA, MPS or CPU allocator)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


# --------------------------------------------------------------------------------------------------
# Toy potentials with the ForceField predict interface (tests, demos)
# --------------------------------------------------------------------------------------------------
class HarmonicPotential:
    """Harmonic springs of rest length ``r0`` between atom pairs of a structure (a toy potential).

    ``E = sum_pairs k/2 (|r_ij| - r0)^2`` per structure over all pairs (or the pairs closer than
    ``cutoff``, which makes the energy discontinuous), without periodic images; ``predict`` has the
    :class:`~dens.models.ForceField` interface. ``calls`` and ``structures`` count its evaluations.

    Examples
    --------
    >>> import torch
    >>> from dens.data import collate, make_structure
    >>> b = collate([make_structure([[0.0, 0, 0], [2.0, 0, 0]], [1, 1], dtype=torch.float64)])
    >>> out = HarmonicPotential(k=2.0, r0=1.0).predict(b)
    >>> out["energy"].item(), out["forces"][0, 0].item()
    (1.0, 2.0)
    """

    direct_forces = True

    def __init__(self, k: float = 1.0, r0: float = 1.0, cutoff: float | None = None) -> None:
        self.k, self.r0, self.cutoff = k, r0, cutoff
        self.calls = 0
        self.structures = 0

    def predict(self, batch: Batch) -> dict[str, Tensor]:
        self.calls += 1
        self.structures += batch.num_graphs
        pos = batch.pos.double()
        i, j = torch.triu_indices(len(pos), len(pos), 1, device=pos.device)
        same = batch.batch[i] == batch.batch[j]
        i, j = i[same], j[same]
        d = pos[j] - pos[i]
        r = d.norm(dim=-1)
        close = r < self.cutoff if self.cutoff is not None else torch.ones_like(r, dtype=torch.bool)
        i, j, d, r = i[close], j[close], d[close], r[close]
        e_pair = 0.5 * self.k * (r - self.r0) ** 2
        energy = scatter_sum(e_pair, batch.batch[i], batch.num_graphs)
        g = (self.k * (r - self.r0) / r.clamp_min(1e-12)).unsqueeze(-1) * d  # dE/dpos_j
        forces = edge_gradient_forces(g, torch.stack([j, i]), len(pos))  # edges j -> i
        return {"energy": energy, "forces": forces.to(batch.pos.dtype)}


class AsePotential:
    """Any ASE calculator (e.g. ``EMT()``) behind the :class:`~dens.models.ForceField` ``predict`` interface.

    Structures are evaluated one at a time on the CPU; useful to test relaxations and MD against ASE.

    Examples
    --------
    >>> from ase.calculators.emt import EMT
    >>> import torch
    >>> from dens.data import collate, make_structure
    >>> b = collate([make_structure([[0.0, 0, 0], [2.5, 0, 0]], [29, 29], dtype=torch.float64)])
    >>> AsePotential(EMT()).predict(b)["forces"].shape
    torch.Size([2, 3])
    """

    direct_forces = True

    def __init__(self, calculator: Any) -> None:
        self.calculator = calculator
        self.calls = 0

    def predict(self, batch: Batch) -> dict[str, Tensor]:
        import ase

        self.calls += 1
        energies, forces = [], []
        for b in range(batch.num_graphs):
            m = batch.batch == b
            atoms = ase.Atoms(
                numbers=batch.atomic_numbers[m].cpu().numpy(),
                positions=batch.pos[m].detach().double().cpu().numpy(),
                cell=batch.cell[b].double().cpu().numpy(),
                pbc=batch.pbc[b].cpu().numpy(),
            )
            atoms.calc = self.calculator
            energies.append(atoms.get_potential_energy())
            forces.append(torch.from_numpy(atoms.get_forces()))
        return {
            "energy": torch.tensor(energies, dtype=torch.float64, device=batch.pos.device),
            "forces": torch.cat(forces).to(batch.pos.device, batch.pos.dtype),
        }


# --------------------------------------------------------------------------------------------------
# L-BFGS
# --------------------------------------------------------------------------------------------------
class BatchedLBFGS:
    """Per-structure L-BFGS over a batch of structures (see the module docstring).

    Parameters
    ----------
    batch : Batch
        The structures (positions are not modified; the optimiser keeps its own float64 copy).
    model : object
        ``predict(batch) -> {"energy": [B], "forces": [N, 3]}`` (eV, eV/Å).
    settings : RelaxSettings
        Step limits and convergence.
    record_energies : bool
        Keep the energy after every evaluation.

    Examples
    --------
    >>> import torch
    >>> from dens.data import collate, make_structure
    >>> b = collate([make_structure([[0.0, 0, 0], [1.3, 0, 0]], [1, 1], dtype=torch.float64)])
    >>> opt = BatchedLBFGS(b, HarmonicPotential(), RelaxSettings(fmax=1e-4, maxstep=0.2))
    >>> opt.run().all().item(), round(float((opt.pos[1] - opt.pos[0]).norm()), 4)
    (True, 1.0)
    """

    def __init__(
        self, batch: Batch, model: Any, settings: RelaxSettings, record_energies: bool = True
    ) -> None:
        self.batch, self.model, self.settings = batch, model, settings
        self.record_energies = record_energies
        self.dtype = batch.pos.dtype
        b, n = batch.num_graphs, batch.num_atoms
        dev = batch.pos.device
        self.pos = batch.pos.detach().to(torch.float64).clone()
        self.free = ~batch.fixed.to(torch.bool)
        self.energy = torch.full((b,), float("nan"), dtype=torch.float64, device=dev)
        self.forces = torch.zeros(n, 3, dtype=torch.float64, device=dev)
        self.fmax = torch.full((b,), float("inf"), dtype=torch.float64, device=dev)
        self.active = torch.ones(b, dtype=torch.bool, device=dev)
        self.converged = torch.zeros(b, dtype=torch.bool, device=dev)
        self.steps = torch.zeros(b, dtype=torch.long, device=dev)
        self.energies: list[list[float]] = [[] for _ in range(b)]
        m = settings.memory
        self._s = torch.zeros(m, n, 3, dtype=torch.float64, device=dev)
        self._y = torch.zeros(m, n, 3, dtype=torch.float64, device=dev)
        self._rho = torch.zeros(m, b, dtype=torch.float64, device=dev)
        self._count = 0  # history entries written (ring buffer of length memory)
        self._r0: Tensor | None = None
        self._f0: Tensor | None = None

    def _dot(self, a: Tensor, c: Tensor) -> Tensor:
        """Per-structure dot products of two ``[N, 3]`` fields."""
        return scatter_sum((a * c).sum(-1), self.batch.batch, self.batch.num_graphs)

    def evaluate(self) -> None:
        """Energies and (constrained) forces of the active structures; updates convergence."""
        active = self.active
        sub = select_structures(self.batch, active)
        atom_active = active[self.batch.batch]
        sub = dataclasses.replace(sub, pos=self.pos[atom_active].to(self.dtype))
        out = self.model.predict(sub)
        f = out["forces"].detach().to(torch.float64)
        self.forces[atom_active] = f
        self.energy[active] = out["energy"].detach().to(torch.float64).reshape(-1)
        f_free = torch.where(self.free.unsqueeze(-1), self.forces, torch.zeros_like(self.forces))
        fmax = _segment_max(f_free.norm(dim=-1), self.batch.batch, self.batch.num_graphs)
        self.fmax = torch.where(active, fmax, self.fmax)
        newly = active & (self.fmax < self.settings.fmax)
        self.converged |= newly
        if self.record_energies:
            for i in torch.nonzero(active).flatten().tolist():
                self.energies[i].append(float(self.energy[i]))
        self.active = active & ~newly

    def step(self) -> None:
        """One L-BFGS position update of the active structures (forces must be current)."""
        s = self.settings
        atom_active = self.active[self.batch.batch].unsqueeze(-1)
        forces = torch.where(
            self.free.unsqueeze(-1) & atom_active, self.forces, torch.zeros_like(self.forces)
        )
        if self._r0 is not None:
            k = self._count % s.memory
            s0 = torch.where(atom_active, self.pos - self._r0, torch.zeros_like(self.pos))
            y0 = torch.where(atom_active, self._f0 - forces, torch.zeros_like(self.pos))
            ys = self._dot(y0, s0)
            self._s[k], self._y[k] = s0, y0
            self._rho[k] = torch.where(ys.abs() > 1e-30, 1.0 / ys, torch.zeros_like(ys)) * self.active
            self._count += 1
        hist = min(self._count, s.memory)
        order = [(self._count - 1 - i) % s.memory for i in range(hist)]  # newest first
        q = -forces
        alphas = {}
        idx = self.batch.batch
        for k in order:
            a = self._rho[k] * self._dot(self._s[k], q)
            alphas[k] = a
            q = q - a[idx].unsqueeze(-1) * self._y[k]
        z = q / s.alpha
        for k in reversed(order):
            beta = self._rho[k] * self._dot(self._y[k], z)
            z = z + self._s[k] * (alphas[k] - beta)[idx].unsqueeze(-1)
        dr = torch.where(self.free.unsqueeze(-1) & atom_active, -z, torch.zeros_like(z))
        longest = _segment_max(dr.norm(dim=-1), idx, self.batch.num_graphs)
        scale = torch.where(
            longest > s.maxstep, s.maxstep / longest.clamp_min(1e-300), torch.ones_like(longest)
        )
        dr = dr * (scale * s.damping)[idx].unsqueeze(-1)
        self._r0, self._f0 = self.pos.clone(), forces
        self.pos = self.pos + dr
        self.steps += self.active.long()

    def run(self) -> Tensor:
        """Relax until every structure has converged or made ``steps`` updates; returns ``converged``."""
        self.evaluate()
        for _ in range(self.settings.steps):
            if not bool(self.active.any()):
                break
            self.step()
            self.evaluate()
        return self.converged

    def results(self, targets: Sequence[float | None] | None = None) -> list[RelaxResult]:
        """One :class:`RelaxResult` per structure (on the CPU)."""
        ids = batch_ids(self.batch)
        sizes = self.batch.natoms.tolist()
        pos = torch.split(self.pos.cpu(), sizes)
        forces = torch.split(self.forces.cpu(), sizes)
        out = []
        for i in range(self.batch.num_graphs):
            out.append(
                RelaxResult(
                    id=ids[i],
                    energy=float(self.energy[i]),
                    pos=pos[i].numpy(),
                    forces=forces[i].numpy(),
                    fmax=float(self.fmax[i]),
                    steps=int(self.steps[i]),
                    converged=bool(self.converged[i]),
                    energies=self.energies[i],
                    target=None if targets is None else targets[i],
                )
            )
        return out


_TARGET_KEYS = ("energy_relaxed", "y_relaxed")


def _target(item: Mapping[str, Any], target_key: str | None) -> float | None:
    keys = (target_key,) if target_key else _TARGET_KEYS
    for k in keys:
        v = item.get(k)
        if v is not None:
            return float(v)
    return None


def relax(
    structures: Sequence[Mapping[str, Any]],
    model: Any,
    settings: RelaxSettings | str = "oc20_2m",
    device: str | torch.device | None = None,
    target_key: str | None = None,
) -> list[RelaxResult]:
    """Relax a list of structure dicts together (one batch) and return one result each.

    Parameters
    ----------
    structures : sequence of dict
        Structure records (``dens.data.make_structure``); ``fixed`` atoms are held.
    model : object
        A :class:`~dens.models.ForceField` or anything with its ``predict`` interface.
    settings : RelaxSettings or str
        Settings or a preset name of :data:`RELAX_PRESETS`.
    device : str or torch.device, optional
        Where to relax (default: where the model is).
    target_key : str, optional
        Record field with the relaxed-energy label (default ``energy_relaxed`` / ``y_relaxed``).

    Returns
    -------
    list of RelaxResult
    """
    if isinstance(settings, str):
        settings = RelaxSettings.preset(settings)
    dtype = model_dtype(model) if isinstance(model, torch.nn.Module) else structures[0]["pos"].dtype
    if device is None:
        device = model_device(model) if isinstance(model, torch.nn.Module) else torch.device("cpu")
    batch = prepare_batch(collate(list(structures)), device, dtype)
    batch = dataclasses.replace(batch, energy=None, forces=None, edge_index=None, cell_offsets=None, extra={})
    opt = BatchedLBFGS(batch, model, settings)
    if isinstance(model, torch.nn.Module):
        model.eval()
    opt.run()
    return opt.results([_target(s, target_key) for s in structures])


def relax_with_retry(
    structures: Sequence[Mapping[str, Any]],
    model: Any,
    settings: RelaxSettings,
    batch_size: int,
    device: str | torch.device | None = None,
    target_key: str | None = None,
    on_batch: Callable[[list[RelaxResult]], None] | None = None,
) -> tuple[list[RelaxResult], int]:
    """Relax ``structures`` in batches of ``batch_size``, halving the batch on out-of-memory errors.

    The batch is halved rounding up (7 -> 4 -> 2 -> 1). Returns the results (in input order) and the batch
    size that finally worked (used for the next chunk). A batch of one that still runs out of memory
    re-raises the error.
    """
    results: list[RelaxResult] = []
    start = 0
    while start < len(structures):
        chunk = structures[start : start + batch_size]
        try:
            res = relax(chunk, model, settings, device, target_key)
        except (RuntimeError, torch.OutOfMemoryError) as err:
            if not is_out_of_memory(err) or batch_size == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            new_size = max(1, (min(batch_size, len(chunk)) + 1) // 2)
            logger.warning(
                "out of memory with %d structures per batch; retrying with %d", len(chunk), new_size
            )
            batch_size = new_size
            continue
        if on_batch is not None:
            on_batch(res)
        results.extend(res)
        start += len(chunk)
    return results, batch_size
