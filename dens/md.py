"""Molecular dynamics with a trained force field and the MD17 simulation metrics of Fu et al. (2023).

Protocol (Fu et al., "Forces are not enough", TMLR 2023; Table 10 of the DeNS paper): NVT with a
Nosé-Hoover thermostat at 500 K, 0.5 fs steps, 300 ps, started from reference (test-set) structures.

* **Stability**: the simulated time until any bond length deviates from its equilibrium length by more
  than 0.5 Å (the whole duration when that never happens). Bonds are the atom pairs closer than
  ``scale * (r_cov,i + r_cov,j)`` (covalent radii, ``scale=1.2``) in the first reference frame; their
  equilibrium lengths are the means over the reference frames.
* **h(r)**: the distribution of all interatomic distances ``|x_i - x_j|`` (``i != j``) over a trajectory,
  a histogram on ``(0, r_max]`` (10 Å, 500 bins) normalised to a density (``sum h * dr = 1``).
  ``MAE_h(r) = ∫ |h_sim(r) - h_ref(r)| dr`` (the sum over bins of ``|Δh| * dr``), computed on the
  stable part of the simulation; 0 for identical distributions, 2 for disjoint ones.

:class:`BatchedMD` integrates several simulations at once (one model call per step for the whole batch;
simulations of different molecules may share a batch). Integrators: velocity Verlet (``"nve"``) and a
single Nosé-Hoover thermostat per simulation (``"nose_hoover"``, the symmetric Trotter splitting, whose
extended energy ``K + U + Q ζ²/2 + g k_B T η`` is conserved). A simulation that becomes unstable is
stopped and leaves the batch; the others continue. Units follow ASE: eV, Å, amu, ``ase.units.fs``.

ASE's own integrators work too, through :class:`dens.calculator.DeNSCalculator` (``VelocityVerlet``,
``Langevin``, ``NoseHooverChainNVT``).

Examples
--------
>>> import numpy as np
>>> t = np.arange(6) * 0.25                                # ps
>>> frames = np.zeros((6, 2, 3)); frames[:, 1, 0] = [1.0, 1.1, 1.2, 1.7, 1.0, 1.0]
>>> stability_time(frames, t, bonds=np.array([[0, 1]]), lengths=np.array([1.0]))
0.75
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ase import units
from ase.data import atomic_masses, covalent_radii
from torch import Tensor

from .data.batch import collate
from .inference import model_device, model_dtype, prepare_batch, progress_bar
from .lbfgs import select_structures
from .ops import scatter_sum

__all__ = [
    "BatchedMD",
    "BondReference",
    "MDSettings",
    "MDTrajectory",
    "distance_histogram",
    "find_bonds",
    "hr_mae",
    "simulate",
    "stability_time",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MDSettings:
    """MD settings; the defaults are the MD17 protocol of Fu et al. (2023).

    Attributes
    ----------
    temperature : float
        Thermostat (and initial velocity) temperature (K).
    timestep : float
        Step (fs).
    duration : float
        Simulated time (ps).
    integrator : {'nose_hoover', 'nve'}
        Nosé-Hoover NVT or velocity Verlet (NVE).
    tdamp : float
        Nosé-Hoover time constant τ (fs); thermostat mass ``Q = g k_B T τ²``.
    save_every : int
        Steps between stored frames (and stability checks).
    stability_threshold : float
        Largest allowed bond-length deviation (Å).
    seed : int
        Seed of the initial Maxwell-Boltzmann velocities.
    """

    temperature: float = 500.0
    timestep: float = 0.5
    duration: float = 300.0
    integrator: str = "nose_hoover"
    tdamp: float = 50.0
    save_every: int = 100
    stability_threshold: float = 0.5
    seed: int = 0

    @property
    def steps(self) -> int:
        """Number of integration steps."""
        return round(self.duration * 1000.0 / self.timestep)


@dataclass
class BondReference:
    """Bonds of a molecule and their equilibrium lengths (Å), from reference data (see :func:`find_bonds`)."""

    bonds: np.ndarray
    lengths: np.ndarray

    @classmethod
    def from_frames(cls, atomic_numbers: Any, frames: Any, scale: float = 1.2) -> BondReference:
        """Bonds from the first frame, equilibrium lengths averaged over all ``frames`` ``[T, n, 3]``.

        Examples
        --------
        >>> import numpy as np
        >>> ref = BondReference.from_frames([1, 1], np.array([[[0, 0, 0], [0.7, 0, 0]], [[0, 0, 0], [0.8, 0, 0]]]))
        >>> ref.bonds.tolist(), ref.lengths.round(3).tolist()
        ([[0, 1]], [0.75])
        """
        frames = np.asarray(frames, dtype=np.float64).reshape(-1, len(np.asarray(atomic_numbers)), 3)
        bonds = find_bonds(atomic_numbers, frames[0], scale)
        return cls(bonds, _bond_lengths(frames, bonds).mean(0))


@dataclass
class MDTrajectory:
    """The record of one simulation.

    Attributes
    ----------
    atomic_numbers : np.ndarray
        ``[n]``.
    time : np.ndarray
        ``[T]`` times (ps) of the stored frames (0 first).
    positions : np.ndarray
        ``[T, n, 3]`` (Å, float32).
    potential_energy, kinetic_energy, temperature, conserved : np.ndarray
        ``[T]`` (eV, eV, K, eV); ``conserved`` is the total energy (NVE) or the Nosé-Hoover extended energy.
    stability : float
        Time (ps) until the first unstable frame, or the simulated time if none.
    stable : bool
        Whether the whole run stayed stable.
    steps : int
        Integration steps made.
    """

    atomic_numbers: np.ndarray
    time: np.ndarray
    positions: np.ndarray
    potential_energy: np.ndarray
    kinetic_energy: np.ndarray
    temperature: np.ndarray
    conserved: np.ndarray
    stability: float
    stable: bool
    steps: int
    info: dict[str, Any] = field(default_factory=dict)

    def stable_positions(self) -> np.ndarray:
        """The frames before the first unstable one (all frames of a stable run)."""
        return self.positions[self.time < self.stability + 1e-9] if not self.stable else self.positions

    def energy_drift(self) -> float:
        """Largest deviation of ``conserved`` from its initial value (eV)."""
        return float(np.abs(self.conserved - self.conserved[0]).max())


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------
def find_bonds(atomic_numbers: Any, positions: Any, scale: float = 1.2) -> np.ndarray:
    """Pairs ``i < j`` closer than ``scale`` times the sum of their covalent radii, ``[n_bonds, 2]``.

    Examples
    --------
    >>> from ase.build import molecule
    >>> m = molecule("H2O")
    >>> find_bonds(m.numbers, m.positions).tolist()
    [[0, 1], [0, 2]]
    """
    z = np.asarray(atomic_numbers, dtype=int).reshape(-1)
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    r = covalent_radii[z]
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    i, j = np.triu_indices(len(z), 1)
    bonded = d[i, j] < scale * (r[i] + r[j])
    return np.stack([i[bonded], j[bonded]], 1).astype(np.int64)


def _bond_lengths(frames: np.ndarray, bonds: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames, dtype=np.float64)
    return np.linalg.norm(frames[:, bonds[:, 1]] - frames[:, bonds[:, 0]], axis=-1)


def stability_time(frames: Any, times: Any, bonds: Any, lengths: Any, threshold: float = 0.5) -> float:
    """Time of the first frame where a bond deviates by more than ``threshold`` (else the last time).

    Parameters
    ----------
    frames : array-like
        ``[T, n, 3]`` positions (Å).
    times : array-like
        ``[T]`` times (any unit; the result is in it).
    bonds : array-like
        ``[n_bonds, 2]`` atom pairs.
    lengths : array-like
        ``[n_bonds]`` equilibrium lengths (Å).
    threshold : float
        Allowed deviation (Å).
    """
    frames = np.asarray(frames, dtype=np.float64)
    times = np.asarray(times, dtype=np.float64)
    bonds = np.asarray(bonds, dtype=np.int64).reshape(-1, 2)
    dev = np.abs(_bond_lengths(frames, bonds) - np.asarray(lengths, dtype=np.float64)[None])
    bad = ~np.isfinite(frames).all(axis=(1, 2))
    if bonds.size:
        bad |= (dev > threshold).any(axis=1)
    hits = np.nonzero(bad)[0]
    return float(times[hits[0]] if hits.size else times[-1])


def distance_histogram(frames: Any, r_max: float = 10.0, bins: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """h(r): density histogram of all interatomic distances over the frames.

    Parameters
    ----------
    frames : array-like
        ``[T, n, 3]`` positions (Å).
    r_max : float
        Upper end of the histogram (Å); distances beyond it are not counted.
    bins : int
        Number of bins on ``(0, r_max]``.

    Returns
    -------
    centers, h : np.ndarray
        Bin centres (Å) and the density (1/Å, ``sum(h) * r_max / bins == 1``).

    Examples
    --------
    >>> r, h = distance_histogram([[[0, 0, 0], [1.01, 0, 0]]], r_max=2.0, bins=4)
    >>> h.tolist()
    [0.0, 0.0, 2.0, 0.0]
    """
    frames = torch.as_tensor(np.asarray(frames, dtype=np.float64))
    frames = frames.reshape(-1, frames.shape[-2], 3)
    n = frames.shape[1]
    i, j = torch.triu_indices(n, n, 1)
    counts = torch.zeros(bins, dtype=torch.float64)
    for start in range(0, len(frames), 4096):
        chunk = frames[start : start + 4096]
        d = (chunk[:, j] - chunk[:, i]).norm(dim=-1).flatten()
        d = d[torch.isfinite(d) & (d > 0) & (d <= r_max)]
        counts += torch.histc(d, bins=bins, min=0.0, max=r_max)
    width = r_max / bins
    total = counts.sum()
    h = counts / (total * width) if total > 0 else counts
    centers = (np.arange(bins) + 0.5) * width
    return centers, h.numpy()


def hr_mae(frames: Any, reference: Any, r_max: float = 10.0, bins: int = 500) -> float:
    """``∫ |h_frames(r) - h_reference(r)| dr`` (see the module docstring).

    Examples
    --------
    >>> a = [[[0, 0, 0], [1.0, 0, 0]]]
    >>> b = [[[0, 0, 0], [3.0, 0, 0]]]
    >>> hr_mae(a, a), hr_mae(a, b)
    (0.0, 2.0)
    """
    _, h1 = distance_histogram(frames, r_max, bins)
    _, h2 = distance_histogram(reference, r_max, bins)
    return float(np.abs(h1 - h2).sum() * (r_max / bins))


# --------------------------------------------------------------------------------------------------
# Batched integrators
# --------------------------------------------------------------------------------------------------
class BatchedMD:
    """Several MD simulations integrated together (see the module docstring).

    Parameters
    ----------
    model : object
        ``predict(batch) -> {"energy", "forces"}`` (a :class:`~dens.models.ForceField` or a toy potential).
    structures : sequence of dict
        Initial structures (``dens.data.make_structure``); ``fixed`` atoms are held.
    settings : MDSettings
        Protocol.
    references : sequence of BondReference, optional
        Per simulation, the bonds whose deviation ends it (stability); None: never stopped.
    velocities : sequence of array-like, optional
        Initial velocities (Å / ASE time unit); default Maxwell-Boltzmann at ``settings.temperature``.
    device : str or torch.device, optional
        Where to run (default: where the model is).

    Examples
    --------
    >>> import torch
    >>> from dens.data import make_structure
    >>> from dens.relax import HarmonicPotential
    >>> s = make_structure([[0.0, 0, 0], [1.1, 0, 0]], [1, 1], dtype=torch.float64)
    >>> md = BatchedMD(HarmonicPotential(k=5.0), [s], MDSettings(integrator="nve", duration=0.01, save_every=5))
    >>> traj = md.run()[0]
    >>> traj.steps, len(traj.time), traj.energy_drift() < 1e-3
    (20, 5, True)
    """

    def __init__(
        self,
        model: Any,
        structures: Sequence[Mapping[str, Any]],
        settings: MDSettings,
        references: Sequence[BondReference | None] | None = None,
        velocities: Sequence[Any] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if settings.integrator not in ("nose_hoover", "nve"):
            raise ValueError(f"unknown integrator {settings.integrator!r}; use 'nose_hoover' or 'nve'")
        self.model, self.settings = model, settings
        is_module = isinstance(model, torch.nn.Module)
        self.dtype = model_dtype(model) if is_module else structures[0]["pos"].dtype
        dev = torch.device(device) if device is not None else (model_device(model) if is_module else None)
        dev = dev or torch.device("cpu")
        batch = prepare_batch(collate(list(structures)), dev, self.dtype)
        self.batch = dataclasses.replace(batch, energy=None, forces=None, edge_index=None, cell_offsets=None,
                                         extra={})  # fmt: skip
        b = self.batch.num_graphs
        self.references = list(references) if references is not None else [None] * b
        if len(self.references) != b:
            raise ValueError(f"{len(self.references)} bond references for {b} simulations")
        z = self.batch.atomic_numbers
        idx = self.batch.batch
        self.masses = torch.as_tensor(atomic_masses[z.cpu().numpy()], dtype=torch.float64, device=dev)
        self.free = (~self.batch.fixed).unsqueeze(-1).to(torch.float64)
        n_free = scatter_sum(self.free[:, 0], idx, b)
        has_fixed = scatter_sum(self.batch.fixed.to(torch.float64), idx, b) > 0
        self.dof = torch.where(has_fixed, 3 * n_free, 3 * n_free - 3).clamp_min(1.0)
        self.remove_com = ~has_fixed
        self.kT = units.kB * settings.temperature
        self.dt = settings.timestep * units.fs
        tau = settings.tdamp * units.fs
        self.Q = self.dof * self.kT * tau**2
        self.zeta = torch.zeros(b, dtype=torch.float64, device=dev)
        self.eta = torch.zeros(b, dtype=torch.float64, device=dev)
        self.pos = self.batch.pos.detach().to(torch.float64).clone()
        if velocities is not None:
            vel = torch.cat(
                [torch.as_tensor(np.asarray(v), dtype=torch.float64).reshape(-1, 3) for v in velocities]
            )
            self.vel = vel.to(dev) * self.free
        else:
            self.vel = self._maxwell_boltzmann()
        self.active = torch.ones(b, dtype=torch.bool, device=dev)
        self.forces = torch.zeros_like(self.pos)
        self.energy = torch.zeros(b, dtype=torch.float64, device=dev)
        self.step_count = torch.zeros(b, dtype=torch.long, device=dev)
        self.stability = torch.full((b,), float("nan"), dtype=torch.float64)
        self._frames: list[list[tuple[float, np.ndarray, float, float, float, float]]] = [
            [] for _ in range(b)
        ]

    # -- helpers -----------------------------------------------------------------------------------
    def _maxwell_boltzmann(self) -> Tensor:
        gen = torch.Generator().manual_seed(self.settings.seed)
        v = torch.randn(self.pos.shape, generator=gen, dtype=torch.float64).to(self.pos.device)
        v = v * torch.sqrt(self.kT / self.masses).unsqueeze(-1) * self.free
        v = self._zero_momentum(v)
        k = self.kinetic(v)
        target = 0.5 * self.dof * self.kT
        scale = torch.where(k > 0, torch.sqrt(target / k.clamp_min(1e-300)), torch.zeros_like(k))
        return v * scale[self.batch.batch].unsqueeze(-1)

    def _zero_momentum(self, v: Tensor) -> Tensor:
        idx, b = self.batch.batch, self.batch.num_graphs
        p = scatter_sum(self.masses.unsqueeze(-1) * v, idx, b)
        m = scatter_sum(self.masses, idx, b)
        v_com = p / m.unsqueeze(-1)
        return v - (v_com * self.remove_com.unsqueeze(-1))[idx]

    def kinetic(self, v: Tensor | None = None) -> Tensor:
        """Per-simulation kinetic energy (eV)."""
        v = self.vel if v is None else v
        return scatter_sum(0.5 * self.masses * (v * v).sum(-1), self.batch.batch, self.batch.num_graphs)

    def temperature(self) -> Tensor:
        """Per-simulation instantaneous temperature (K), ``2 K / (g k_B)``."""
        return 2.0 * self.kinetic() / (self.dof * units.kB)

    def conserved(self) -> Tensor:
        """Total energy (NVE) or Nosé-Hoover extended energy per simulation (eV)."""
        h = self.energy + self.kinetic()
        if self.settings.integrator == "nose_hoover":
            h = h + 0.5 * self.Q * self.zeta**2 + self.dof * self.kT * self.eta
        return h

    def compute_forces(self) -> None:
        """Energies and forces of the active simulations at the current positions."""
        active = self.active
        atom_active = active[self.batch.batch]
        sub = select_structures(self.batch, active)
        sub = dataclasses.replace(sub, pos=self.pos[atom_active].to(self.dtype))
        out = self.model.predict(sub)
        self.forces[atom_active] = out["forces"].detach().to(torch.float64)
        self.energy[active] = out["energy"].detach().to(torch.float64).reshape(-1)
        self.forces = self.forces * self.free

    def _thermostat_half(self, mask: Tensor) -> None:
        half = 0.5 * self.dt
        m = mask.to(torch.float64)
        self.zeta = self.zeta + m * 0.5 * half * (2 * self.kinetic() - self.dof * self.kT) / self.Q
        scale = torch.exp(-self.zeta * half * m)
        self.vel = self.vel * scale[self.batch.batch].unsqueeze(-1)
        self.eta = self.eta + m * self.zeta * half
        self.zeta = self.zeta + m * 0.5 * half * (2 * self.kinetic() - self.dof * self.kT) / self.Q

    def step(self) -> None:
        """One integration step of the active simulations (forces must be current)."""
        nh = self.settings.integrator == "nose_hoover"
        atom_active = self.active[self.batch.batch].unsqueeze(-1).to(torch.float64)
        if nh:
            self._thermostat_half(self.active)
        acc = self.forces / self.masses.unsqueeze(-1)
        self.vel = self.vel + 0.5 * self.dt * acc * atom_active
        self.pos = self.pos + self.dt * self.vel * atom_active
        self.compute_forces()
        acc = self.forces / self.masses.unsqueeze(-1)
        self.vel = self.vel + 0.5 * self.dt * acc * atom_active
        if nh:
            self._thermostat_half(self.active)
        self.step_count += self.active.long()

    def _record(self, t_ps: float) -> None:
        sizes = self.batch.natoms.tolist()
        pos = torch.split(self.pos.cpu(), sizes)
        pe, ke, temp, h = (
            x.cpu() for x in (self.energy, self.kinetic(), self.temperature(), self.conserved())
        )
        for i in torch.nonzero(self.active).flatten().tolist():
            self._frames[i].append(
                (
                    t_ps,
                    pos[i].numpy().astype(np.float32),
                    float(pe[i]),
                    float(ke[i]),
                    float(temp[i]),
                    float(h[i]),
                )
            )

    def _check(self, t_ps: float) -> None:
        sizes = self.batch.natoms.tolist()
        pos = torch.split(self.pos.cpu(), sizes)
        for i in torch.nonzero(self.active).flatten().tolist():
            p = pos[i].numpy()
            ref = self.references[i]
            bad = not np.isfinite(p).all()
            if not bad and ref is not None and ref.bonds.size:
                dev = np.abs(_bond_lengths(p[None], ref.bonds)[0] - ref.lengths)
                bad = bool((dev > self.settings.stability_threshold).any())
            if bad:
                self.stability[i] = t_ps
                self.active[i] = False

    # -- main loop ---------------------------------------------------------------------------------
    def run(self, progress: bool = False) -> list[MDTrajectory]:
        """Integrate for ``settings.duration`` (stopping unstable simulations) and return the trajectories."""
        s = self.settings
        if isinstance(self.model, torch.nn.Module):
            self.model.eval()
        self.compute_forces()
        self._record(0.0)
        t0 = time.perf_counter()
        steps = s.steps
        bar = progress_bar(range(steps), steps, "md", progress)
        for k in bar:
            if not bool(self.active.any()):
                break
            self.step()
            if (k + 1) % s.save_every == 0 or k + 1 == steps:
                t_ps = (k + 1) * s.timestep / 1000.0
                self._check(t_ps)
                self._record(t_ps)
        elapsed = time.perf_counter() - t0
        out = []
        for i in range(self.batch.num_graphs):
            frames = self._frames[i]
            stable = math.isnan(float(self.stability[i]))
            m = self.batch.batch == i
            out.append(
                MDTrajectory(
                    atomic_numbers=self.batch.atomic_numbers[m].cpu().numpy(),
                    time=np.asarray([f[0] for f in frames]),
                    positions=np.stack([f[1] for f in frames]),
                    potential_energy=np.asarray([f[2] for f in frames]),
                    kinetic_energy=np.asarray([f[3] for f in frames]),
                    temperature=np.asarray([f[4] for f in frames]),
                    conserved=np.asarray([f[5] for f in frames]),
                    stability=float(int(self.step_count[i]) * s.timestep / 1000.0)
                    if stable
                    else float(self.stability[i]),
                    stable=stable,
                    steps=int(self.step_count[i]),
                    info={"seconds": elapsed, "settings": dataclasses.asdict(s)},
                )
            )
        return out


def simulate(
    model: Any,
    structures: Sequence[Mapping[str, Any]],
    settings: MDSettings | None = None,
    references: Sequence[BondReference | None] | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> list[MDTrajectory]:
    """Run :class:`BatchedMD` on ``structures`` (one simulation each) and return their trajectories.

    Examples
    --------
    >>> trajs = simulate(model, [start_a, start_b], MDSettings(), [ref, ref], device="cuda")  # doctest: +SKIP
    """
    return BatchedMD(model, structures, settings or MDSettings(), references, device=device).run(progress)
