"""DeNS: corruption of structures and the training objective (paper §3.2, Eq. 6, Algorithm 2).

For each structure (or batch), with probability ``p_DeNS`` the DeNS task is optimised, else the original
one. In a DeNS structure a random subset (ratio ``r_DeNS``) of the atoms is masked: masked *free* atoms are
displaced by ``N(0, sigma^2)`` noise (fixed atoms never move and are never denoised). The model reads the
corrupted structure and the (raw, eV/Å) forces of the masked atoms (force encoding), and predicts the
energy of the original structure, the noise divided by sigma on corrupted atoms and the forces on the
others.

Every design choice of Tables 1(b) and 6 is a setting of :class:`DeNSSettings`. The paper experiments use
what the official trainers compute (``dens/conf/dens/*.yaml`` cite the lines); the literal Algorithm 2
(``selection='structure'``, ``normalization='structure'``, ``mask_atoms='free'``) is the paper's text, not
the code that produced its numbers, and stays available as options.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import distributed
from ..data.batch import Batch
from .s2ef import energy_errors, force_errors, loss_dtype

__all__ = [
    "Corruption",
    "CorruptionDraws",
    "DeNSSettings",
    "LossSettings",
    "corrupt",
    "dens_coefficient",
    "loss_rows",
    "model_inputs",
    "step_counts",
    "training_loss",
]


@dataclass
class DeNSSettings:
    """The DeNS objective's settings (the Hydra ``dens`` group).

    The defaults are Algorithm 2 as the paper writes it: the paper's text, not the code that produced its
    numbers. The paper experiments (``dens/conf/dens/*.yaml``) set what the official trainers compute:
    OC20/OC22 ``selection='batch'``, ``mask_atoms='all'``, ``normalization='atoms'``; MD17
    ``normalization='separate'``, ``schedule_unit='epoch'``.

    Parameters
    ----------
    enabled : bool
        Optimise DeNS at all (False: the original task only, Eq. 1).
    prob : float
        ``p_DeNS``, the probability of optimising DeNS for a structure (or a batch).
    sigma : float
        Standard deviation of the Gaussian noise (Å).
    corrupt_ratio : float or None
        ``r_DeNS``, the fraction of the atoms of a DeNS structure that the mask draws (over the atoms
        that ``mask_atoms`` names); None masks all of them (DeNS without partially corrupted structures).
    coefficient : float
        ``lambda_DeNS``.
    coefficient_schedule : {'constant', 'linear_decay'}
        'linear_decay' takes ``lambda_DeNS`` linearly to 0 over training (MD17, §D.2).
    energy_on_corrupted : bool
        Keep the energy term for DeNS structures (``lambda_E`` in Eq. 6).
    force_encoding : bool
        Encode the forces of the corrupted atoms (Eq. 5).
    selection : {'structure', 'batch'}
        'structure': one draw per structure (Algorithm 2, the official MD17 trainer); 'batch': one draw
        per global batch (the official OC20/OC22 trainer).
    mask_atoms : {'free', 'all'}
        Which atoms the corruption mask is drawn over. 'free' (Algorithm 2): free atoms only. 'all' (the
        official OC20/OC22 trainer): every atom; masked fixed atoms do not move and never count in the
        loss, but their forces are encoded and their output is the noise head, as in the official code.
        Without fixed atoms (MD17, OC22) both are the same.
    noise_loss : {'l2mae', 'mse'}
        Per-atom norm of the noise error (Algorithm 2, official) or its square.
    normalization : {'structure', 'atoms', 'separate'}
        How atom terms are averaged. 'structure' (Algorithm 2): the force and noise sums of a structure
        are divided by its number of (free) atoms ``|S_j|``, and everything by the number of structures
        ``B``. 'atoms' (the official OC20/OC22 trainer): force and noise sums divided by the number of
        (free) atoms of the batch, energy by ``B``. 'separate' (the official MD17 trainer): each term is
        its own mean (energy over structures, forces over uncorrupted atoms, noise over corrupted atoms).
    schedule_unit : {'step', 'epoch'}
        What 'linear_decay' counts: optimiser steps, or whole epochs (``lambda_DeNS`` constant within an
        epoch, as the official MD17 trainer).
    force_encoding_scale : float
        Factor applied to the (eV/Å) forces before encoding; the official MD17 models encoded forces in
        kcal/mol/Å (23.060548), the OC20/OC22 ones in eV/Å (1).
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
    mask_atoms: str = "free"
    schedule_unit: str = "step"

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
        if self.mask_atoms not in ("free", "all"):
            raise ValueError(f"dens.mask_atoms must be 'free' or 'all', got {self.mask_atoms!r}")
        if self.schedule_unit not in ("step", "epoch"):
            raise ValueError(f"dens.schedule_unit must be 'step' or 'epoch', got {self.schedule_unit!r}")
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
    """Coefficients of Eq. 1 and whether only free atoms count for forces (OC20: yes); ``energy_per_atom``
    divides each structure's energy error by its number of atoms (materials; fairchem's ``per_atom_mae``)."""

    energy_coefficient: float = 2.0
    force_coefficient: float = 100.0
    train_on_free_atoms: bool = True
    energy_per_atom: bool = False


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
        ``[N]`` bool, corrupted (moved and denoised) atoms.
    dens_structures : Tensor
        ``[B]`` bool, structures selected for DeNS.
    encode_mask : Tensor or None
        ``[N]`` bool, the atoms whose forces are encoded and whose output is the noise head, when they
        are more than ``noise_mask`` (``mask_atoms='all'``: masked fixed atoms too); None: ``noise_mask``.
    """

    pos: Tensor
    noise: Tensor
    noise_mask: Tensor
    dens_structures: Tensor
    encode_mask: Tensor | None = None

    @property
    def head_mask(self) -> Tensor:
        """Atoms encoded and read from the noise head (a superset of ``noise_mask``)."""
        return self.noise_mask if self.encode_mask is None else self.encode_mask


@dataclass
class CorruptionDraws:
    """Explicit random numbers for :func:`corrupt` (instead of drawing them), e.g. an official run's.

    Attributes
    ----------
    coin : Tensor
        Uniforms of the DeNS selection: ``[B]`` (``selection='structure'``) or ``[1]`` (``'batch'``).
    mask_uniform : Tensor or None
        ``[N]`` uniforms of the corruption mask, one per atom (all atoms, fixed ones included); needed
        only when some structure is selected and ``corrupt_ratio < 1``.
    normal : Tensor or None
        ``[N, 3]`` standard normal numbers (the noise divided by sigma); needed only when an atom moves.
    """

    coin: Tensor
    mask_uniform: Tensor | None = None
    normal: Tensor | None = None


def corrupt(
    batch: Batch,
    settings: DeNSSettings,
    generator: torch.Generator | None = None,
    batch_coin: torch.Generator | None = None,
    draws: CorruptionDraws | None = None,
) -> Corruption:
    """Draw the DeNS corruption of a batch (lines 5-20 of Algorithm 2).

    ``batch_coin`` draws the one coin of ``selection='batch'``; give every DDP rank the same generator
    state so that the coin is one per global batch, as in the official trainer.

    The draws come in this order: coin(s), mask uniforms ``[N]`` (all atoms), noise ``[N, 3]``. The
    official trainers draw the noise before the mask (OC20) or use NumPy for the batch coin; the
    distributions are the same, the streams are not. ``draws`` replaces the random numbers (the
    objective-fixture tests pass the official ones).

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

    def given(name: str, shape: tuple[int, ...]) -> Tensor:
        value = getattr(draws, name)
        if value is None or tuple(value.shape) != shape:
            got = None if value is None else tuple(value.shape)
            raise ValueError(f"corrupt: draws.{name} must have shape {shape} for this batch, got {got}")
        return value.to(device)

    if not settings.enabled:
        selected = torch.zeros(num_graphs, dtype=torch.bool, device=device)
    else:
        if settings.selection == "structure":
            coin = given("coin", (num_graphs,)) if draws is not None else uniform(num_graphs)
        elif draws is not None:
            coin = given("coin", (1,))
        else:
            coin = torch.rand(1, generator=batch_coin if batch_coin is not None else generator).to(device)
        selected = (coin < settings.prob).expand(num_graphs).clone()
    if settings.exclude_key and settings.exclude_key in batch.extra:
        selected &= ~batch.extra[settings.exclude_key].to(device=device, dtype=torch.bool).reshape(-1)
    mask = selected[batch.batch]
    if settings.mask_atoms == "free":
        mask = mask & ~batch.fixed
    if settings.corrupt_ratio is not None and settings.corrupt_ratio < 1.0:
        if draws is None:
            mask &= uniform(num_atoms) < settings.corrupt_ratio
        elif mask.any():
            mask &= given("mask_uniform", (num_atoms,)) < settings.corrupt_ratio
    moved = mask & ~batch.fixed  # official OC20 (l.82-84): masked fixed atoms keep their positions
    if draws is None:
        normal = torch.randn(num_atoms, 3, generator=generator, device=device, dtype=batch.pos.dtype)
    elif moved.any():
        normal = given("normal", (num_atoms, 3)).to(batch.pos.dtype)
    else:
        normal = torch.zeros_like(batch.pos)
    noise = normal * settings.sigma * moved[:, None]
    encode = None if settings.mask_atoms == "free" else mask
    return Corruption(batch.pos + noise, noise, moved, selected, encode)


def model_inputs(
    batch: Batch,
    corruption: Corruption | None,
    settings: DeNSSettings,
    has_dens_heads: bool,
    has_stress_head: bool = False,
    has_force_encoder: bool = True,
) -> dict[str, Any]:
    """The keyword inputs of :meth:`dens.models.ForceField.forward` for a training batch and its
    corruption (None: the original task for the whole batch): the one place where DeNS becomes model
    inputs.

    * ``pos``: the corrupted positions;
    * DeNS models (``has_dens_heads``): ``encoded_forces`` (the labels times ``force_encoding_scale``)
      and ``encode_mask`` (the corrupted atoms, with ``mask_atoms='all'`` the masked fixed ones too),
      ``noise_mask`` (where ``forces`` is the noise head) and ``split_heads`` (each head run only where
      the loss reads it: exact, and the noise head then costs almost nothing). Without force encoding
      (``settings.force_encoding`` off, or no DeNS this step) the encoder still runs, on masked-out zero
      forces: the same embedding as none (its ``l = 0`` bias), but every parameter takes part, which DDP
      requires. A DeNS model without a force encoder (``has_force_encoder`` False, the official
      no-encoding ablation) gets no encoding inputs;
    * a stress head: ``denoising``, the DeNS structures (a head with ``use_denoising`` off zeroes them).

    Examples
    --------
    >>> from dens.data import collate, make_structure
    >>> batch = collate([make_structure(torch.zeros(2, 3), [1, 1], forces=torch.ones(2, 3))])
    >>> sorted(model_inputs(batch, None, DeNSSettings(), has_dens_heads=True))
    ['encode_mask', 'encoded_forces', 'noise_mask', 'split_heads']
    """
    inputs: dict[str, Any] = {}
    if corruption is not None:
        inputs["pos"] = corruption.pos
    if has_dens_heads and has_force_encoder:
        encode = corruption is not None and settings.force_encoding
        inputs["encoded_forces"] = (
            batch.forces * settings.force_encoding_scale if encode else torch.zeros_like(batch.forces)
        )
        inputs["encode_mask"] = corruption.head_mask if encode else torch.zeros_like(batch.fixed)
    if has_dens_heads:
        inputs["noise_mask"] = None if corruption is None else corruption.head_mask
        inputs["split_heads"] = True
    if has_stress_head:
        inputs["denoising"] = False if corruption is None else corruption.dens_structures
    return inputs


def dens_coefficient(settings: DeNSSettings, progress: float) -> float:
    """``lambda_DeNS`` at a fraction ``progress`` in [0, 1] of training (of the steps or of the epochs
    done, ``settings.schedule_unit``)."""
    if settings.coefficient_schedule == "linear_decay":
        return settings.coefficient * max(0.0, 1.0 - progress)
    return settings.coefficient


def loss_rows(
    batch: Batch, corruption: Corruption | None, losses: LossSettings, dens: DeNSSettings
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Structures with an energy term, atoms with a force term, atoms with a noise term, and the atoms
    that count in ``|S_j|`` (free atoms when training on free atoms).

    Atoms that read the noise head without having moved (masked fixed atoms, ``mask_atoms='all'``) have
    neither a force nor a noise term, as in the official OC20 trainer.
    """
    device = batch.pos.device
    if corruption is None:
        noise_mask = head_mask = torch.zeros(batch.num_atoms, dtype=torch.bool, device=device)
        selected = torch.zeros(batch.num_graphs, dtype=torch.bool, device=device)
    else:
        noise_mask, head_mask = corruption.noise_mask, corruption.head_mask
        selected = corruption.dens_structures
    counted = ~batch.fixed if losses.train_on_free_atoms else torch.ones_like(batch.fixed)
    energy_rows = torch.ones_like(selected) if dens.energy_on_corrupted else ~selected
    return energy_rows, counted & ~head_mask, counted & noise_mask, counted


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
        distributed.all_reduce(totals)
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
    if losses.energy_per_atom:
        energy_err = energy_err / batch.natoms.to(energy_err.dtype)
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
