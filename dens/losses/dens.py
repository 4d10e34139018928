"""DeNS: corruption of structures and the training objective (paper §3.2, Eq. 6, Algorithm 2).

For each structure, with probability ``p_DeNS`` the DeNS task is optimised, else the original one. In a
DeNS structure a random subset (ratio ``r_DeNS``) of the *free* atoms is displaced by ``N(0, sigma^2)``
noise (fixed atoms never move and are never denoised). The model reads the corrupted structure and the
(raw, eV/Å) forces of the corrupted atoms (force encoding), and predicts the energy of the original
structure, the noise divided by sigma on corrupted atoms and the forces on the others.

Every design choice of Tables 1(b) and 6 is a setting of :class:`DeNSSettings`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..data.batch import Batch
from .s2ef import energy_errors, force_errors, loss_dtype

__all__ = [
    "Corruption",
    "DeNSSettings",
    "LossSettings",
    "corrupt",
    "dens_coefficient",
    "loss_rows",
    "step_counts",
    "training_loss",
]


@dataclass
class DeNSSettings:
    """The DeNS objective's settings (the Hydra ``dens`` group).

    Parameters
    ----------
    enabled : bool
        Optimise DeNS at all (False: the original task only, Eq. 1).
    prob : float
        ``p_DeNS``, the probability of optimising DeNS for a structure (or a batch).
    sigma : float
        Standard deviation of the Gaussian noise (Å).
    corrupt_ratio : float or None
        ``r_DeNS``, the fraction of free atoms corrupted; None corrupts every free atom (DeNS without
        partially corrupted structures).
    coefficient : float
        ``lambda_DeNS``.
    coefficient_schedule : {'constant', 'linear_decay'}
        'linear_decay' takes ``lambda_DeNS`` linearly to 0 over training (MD17, §D.2).
    energy_on_corrupted : bool
        Keep the energy term for DeNS structures (``lambda_E`` in Eq. 6).
    force_encoding : bool
        Encode the forces of the corrupted atoms (Eq. 5).
    selection : {'structure', 'batch'}
        'structure': one draw per structure (Algorithm 2); 'batch': one draw per batch (the official
        OC20 trainer).
    noise_loss : {'l2mae', 'mse'}
        Per-atom norm of the noise error (Algorithm 2, official) or its square.
    normalization : {'structure', 'atoms', 'separate'}
        How atom terms are averaged. 'structure' (Algorithm 2): the force and noise sums of a structure
        are divided by its number of (free) atoms ``|S_j|``, and everything by the number of structures
        ``B``. 'atoms' (the official OC20/OC22 trainer): force and noise sums divided by the number of
        free atoms of the batch, energy by ``B``. 'separate' (the official MD17 trainer): each term is
        its own mean (forces over uncorrupted atoms, noise over corrupted atoms).
    force_encoding_scale : float
        Factor applied to the (eV/Å) forces before encoding; the official MD17 models encoded forces in
        kcal/mol/Å (23.0605), the OC20/OC22 ones in eV/Å (1).
    exclude_key : str or None
        A per-structure boolean entry of ``batch.extra``; flagged structures are never corrupted (the MD
        split of OC20 All+MD, §B.1).
    """

    enabled: bool = True
    prob: float = 0.5
    sigma: float = 0.1
    corrupt_ratio: float | None = 0.5
    coefficient: float = 10.0
    coefficient_schedule: str = "constant"
    energy_on_corrupted: bool = True
    force_encoding: bool = True
    selection: str = "structure"
    noise_loss: str = "l2mae"
    exclude_key: str | None = "md_split"
    normalization: str = "structure"
    force_encoding_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.selection not in ("structure", "batch"):
            raise ValueError(f"dens.selection must be 'structure' or 'batch', got {self.selection!r}")
        if self.coefficient_schedule not in ("constant", "linear_decay"):
            raise ValueError(
                f"dens.coefficient_schedule must be 'constant' or 'linear_decay', got {self.coefficient_schedule!r}"
            )
        if self.normalization not in ("structure", "atoms", "separate"):
            raise ValueError(
                f"dens.normalization must be 'structure', 'atoms' or 'separate', got {self.normalization!r}"
            )
        if self.noise_loss not in ("l2mae", "mse"):
            raise ValueError(f"dens.noise_loss must be 'l2mae' or 'mse', got {self.noise_loss!r}")
        if self.corrupt_ratio is not None and not 0.0 < self.corrupt_ratio <= 1.0:
            raise ValueError(f"dens.corrupt_ratio must be in (0, 1] or null, got {self.corrupt_ratio}")
        if not 0.0 <= self.prob <= 1.0 or self.sigma <= 0:
            raise ValueError(f"need 0 <= dens.prob <= 1 and dens.sigma > 0, got {self.prob}, {self.sigma}")

    @classmethod
    def from_dict(cls, values: dict) -> DeNSSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown dens settings {unknown}; known: {sorted(names)}")
        return cls(**values)


@dataclass
class LossSettings:
    """Coefficients of Eq. 1 and whether only free atoms count for forces (OC20: yes)."""

    energy_coefficient: float = 2.0
    force_coefficient: float = 100.0
    train_on_free_atoms: bool = True


@dataclass
class Corruption:
    """One draw of Algorithm 2 for a batch.

    Attributes
    ----------
    pos : Tensor
        ``[N, 3]`` positions after corruption.
    noise : Tensor
        ``[N, 3]`` the displacement (zero outside ``noise_mask``).
    noise_mask : Tensor
        ``[N]`` bool, corrupted (and denoised) atoms.
    dens_structures : Tensor
        ``[B]`` bool, structures selected for DeNS.
    """

    pos: Tensor
    noise: Tensor
    noise_mask: Tensor
    dens_structures: Tensor


def corrupt(
    batch: Batch,
    settings: DeNSSettings,
    generator: torch.Generator | None = None,
    batch_coin: torch.Generator | None = None,
) -> Corruption:
    """Draw the DeNS corruption of a batch (lines 5-20 of Algorithm 2).

    ``batch_coin`` draws the one coin of ``selection='batch'``; give every DDP rank the same generator
    state so that the coin is one per global batch, as in the official trainer.

    Examples
    --------
    >>> from dens.data import collate, make_structure
    >>> b = collate([make_structure(torch.zeros(4, 3), [1, 1, 8, 8], fixed=[1, 0, 0, 0])])
    >>> c = corrupt(b, DeNSSettings(prob=1.0, corrupt_ratio=None))
    >>> c.noise_mask.tolist()  # every free atom, never the fixed one
    [False, True, True, True]
    """
    device, num_graphs, num_atoms = batch.pos.device, batch.num_graphs, batch.num_atoms

    def uniform(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator, device=device)

    if not settings.enabled:
        selected = torch.zeros(num_graphs, dtype=torch.bool, device=device)
    elif settings.selection == "structure":
        selected = uniform(num_graphs) < settings.prob
    else:
        coin = torch.rand(1, generator=batch_coin if batch_coin is not None else generator)
        selected = (coin.to(device) < settings.prob).expand(num_graphs).clone()
    if settings.exclude_key and settings.exclude_key in batch.extra:
        selected &= ~batch.extra[settings.exclude_key].to(device=device, dtype=torch.bool).reshape(-1)
    mask = selected[batch.batch] & ~batch.fixed
    if settings.corrupt_ratio is not None and settings.corrupt_ratio < 1.0:
        mask &= uniform(num_atoms) < settings.corrupt_ratio
    noise = torch.randn(num_atoms, 3, generator=generator, device=device, dtype=batch.pos.dtype)
    noise = noise * settings.sigma * mask[:, None]
    return Corruption(batch.pos + noise, noise, mask, selected)


def dens_coefficient(settings: DeNSSettings, progress: float) -> float:
    """``lambda_DeNS`` at a fraction ``progress`` in [0, 1] of training."""
    if settings.coefficient_schedule == "linear_decay":
        return settings.coefficient * max(0.0, 1.0 - progress)
    return settings.coefficient


def loss_rows(
    batch: Batch, corruption: Corruption | None, losses: LossSettings, dens: DeNSSettings
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Structures with an energy term, atoms with a force term, atoms with a noise term, and the atoms
    that count in ``|S_j|`` (free atoms when training on free atoms)."""
    device = batch.pos.device
    if corruption is None:
        noise_mask = torch.zeros(batch.num_atoms, dtype=torch.bool, device=device)
        selected = torch.zeros(batch.num_graphs, dtype=torch.bool, device=device)
    else:
        noise_mask, selected = corruption.noise_mask, corruption.dens_structures
    counted = ~batch.fixed if losses.train_on_free_atoms else torch.ones_like(batch.fixed)
    energy_rows = torch.ones_like(selected) if dens.energy_on_corrupted else ~selected
    return energy_rows, counted & ~noise_mask, noise_mask, counted


def step_counts(
    items: list[tuple[Batch, Corruption | None]], losses: LossSettings, dens: DeNSSettings
) -> dict[str, Tensor]:
    """Denominators of the loss terms over all micro-batches of an optimiser step and all DDP ranks.

    Dividing every micro-batch's sums by these makes gradient accumulation and DDP compute the gradient
    of the loss of the whole global batch, exactly.
    """
    totals = None
    for batch, corruption in items:
        energy_rows, force_rows, noise_rows, counted = loss_rows(batch, corruption, losses, dens)
        values = [
            energy_rows.sum(),
            force_rows.sum(),
            noise_rows.sum(),
            counted.sum(),
            torch.tensor(batch.num_graphs),
        ]
        counts = torch.stack([v.to(device=batch.pos.device, dtype=torch.float64) for v in values])
        totals = counts if totals is None else totals + counts
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    return dict(zip(("energy", "forces", "noise", "atoms", "structures"), totals, strict=True))


def training_loss(
    out: dict[str, Tensor],
    batch: Batch,
    corruption: Corruption | None,
    losses: LossSettings,
    dens: DeNSSettings,
    energy_mean: float,
    energy_std: float,
    force_std: float,
    progress: float = 0.0,
    counts: dict[str, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of Eq. 1 for ordinary structures and Eq. 6 for DeNS structures (Algorithm 2, 22-35).

    ``out`` holds the model's normalised ``energy``, its force prediction (``force_head`` for direct
    models, else ``forces``) and, for DeNS, ``noise_head``. The averaging follows
    ``dens.normalization``; denominators are those of the whole global batch (``counts`` from
    :func:`step_counts` when it is split into micro-batches or DDP ranks; otherwise this batch).
    Predictions are compared in at least float32 with targets normalised in float64.

    Returns
    -------
    (Tensor, dict)
        The total loss and its parts (``energy``, ``forces``, ``noise``; detached, already averaged).
    """
    if counts is None:
        counts = step_counts([(batch, corruption)], losses, dens)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    energy_rows, force_rows, noise_rows, counted = loss_rows(batch, corruption, losses, dens)

    energy_err = energy_errors(out["energy"], batch.energy, energy_mean, energy_std)
    force_err = force_errors(out.get("force_head", out["forces"]), batch.forces, force_std)
    noise_err = None
    if corruption is not None and "noise_head" in out:
        noise = out["noise_head"]
        if dens.noise_loss == "mse":
            target = (corruption.noise.to(torch.float64) / dens.sigma).to(loss_dtype(noise))
            noise_err = (noise.to(target.dtype) - target).pow(2).sum(-1)
        else:
            noise_err = force_errors(noise, corruption.noise, dens.sigma)

    def denominator(key: str) -> Tensor:
        return counts[key].to(energy_err.dtype).clamp(min=1) / world

    e_sum = (energy_err * energy_rows).sum()
    if dens.normalization == "structure":
        # w_i = 1 / |S_j| for the atoms of structure j, then a mean over the global batch's structures
        per_structure = torch.zeros(batch.num_graphs, dtype=force_err.dtype, device=force_err.device)
        per_structure.index_add_(0, batch.batch, counted.to(force_err.dtype))
        weight = 1.0 / per_structure.clamp(min=1)[batch.batch]
        energy_term = e_sum / denominator("structures")
        force_term = (force_err * weight * force_rows).sum() / denominator("structures")
        noise_term = (
            None if noise_err is None else (noise_err * weight * noise_rows).sum() / denominator("structures")
        )
    else:
        energy_term = e_sum / denominator("energy")
        force_key, noise_key = ("atoms", "atoms") if dens.normalization == "atoms" else ("forces", "noise")
        force_term = (force_err * force_rows).sum() / denominator(force_key)
        noise_term = None if noise_err is None else (noise_err * noise_rows).sum() / denominator(noise_key)

    total = losses.energy_coefficient * energy_term + losses.force_coefficient * force_term
    parts = {"energy": energy_term.detach(), "forces": force_term.detach()}
    if noise_term is not None:
        total = total + dens_coefficient(dens, progress) * noise_term
        parts["noise"] = noise_term.detach()
    return total, parts
