"""Materials training terms: stress (with its own coefficient and normalisers), energy per atom, and the
stress target of DeNS (corrupted) structures.

A stress head predicts the isotropic and anisotropic parts in normalised units; the labels
``[B, 3, 3]`` (eV/Å³, ASE's sign) are split by :func:`dens.models.stress.decompose_stress` and normalised
as ``(x - mean) / std`` per part, fairchem's convention. On DeNS structures the stress label belongs to the
clean structure (the cell is never corrupted, the positions are). Two choices, :class:`StressLossSettings`:

* ``on_corrupted='skip'``: corrupted structures add no stress term (fairchem's MPtrj DeNS recipe, whose
  ``DeNSRank2Head(use_denoising=False)`` multiplies the stress output by 0 there: the term is a constant);
* ``on_corrupted='clean_target'``: the stress predicted for the corrupted structure is regressed to the
  clean structure's label, as DeNS does with the energy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.stress import decompose_stress
from .s2ef import loss_dtype

__all__ = [
    "StressLossSettings",
    "energy_per_atom_errors",
    "fit_stress_normalizer",
    "stress_errors",
    "stress_loss",
]


@dataclass
class StressLossSettings:
    """Settings of the stress term.

    Parameters
    ----------
    coefficient : float
        Weight of the stress term (its own, beside the energy and force coefficients).
    isotropic_mean, isotropic_std, anisotropic_mean, anisotropic_std : float
        Normalisers of the two parts (fit them on the training labels with :func:`fit_stress_normalizer`).
    on_corrupted : {'skip', 'clean_target'}
        The stress target of DeNS structures (module docstring).
    """

    coefficient: float = 1.0
    isotropic_mean: float = 0.0
    isotropic_std: float = 1.0
    anisotropic_mean: float = 0.0
    anisotropic_std: float = 1.0
    on_corrupted: str = "skip"

    def __post_init__(self) -> None:
        if self.on_corrupted not in ("skip", "clean_target"):
            raise ValueError(f"on_corrupted must be 'skip' or 'clean_target', got {self.on_corrupted!r}")
        if self.isotropic_std <= 0 or self.anisotropic_std <= 0:
            raise ValueError("stress normaliser standard deviations must be positive")


def energy_per_atom_errors(pred: Tensor, energy: Tensor, natoms: Tensor, mean: float, std: float) -> Tensor:
    """``|pred - (E - mean) / std| / natoms`` per structure: the materials convention (fairchem's
    ``per_atom_mae``), so large cells do not dominate."""
    dtype = loss_dtype(pred)
    target = (energy.to(torch.float64) - mean) / std
    return (pred.to(dtype) - target.to(dtype)).abs() / natoms.to(dtype)


def stress_errors(out: Mapping[str, Tensor], stress: Tensor, settings: StressLossSettings) -> Tensor:
    """Per structure ``|iso - iso*| + ||aniso - aniso*||`` in normalised units, ``[B]``."""
    dtype = loss_dtype(out["stress_isotropic"])
    iso, aniso = decompose_stress(stress.to(torch.float64))
    iso_t = ((iso - settings.isotropic_mean) / settings.isotropic_std).to(dtype)
    aniso_t = ((aniso - settings.anisotropic_mean) / settings.anisotropic_std).to(dtype)
    iso_err = (out["stress_isotropic"].to(dtype).reshape(-1, 1) - iso_t).abs()[:, 0]
    aniso_err = torch.linalg.vector_norm(out["stress_anisotropic"].to(dtype).reshape(-1, 5) - aniso_t, dim=-1)
    return iso_err + aniso_err


def stress_loss(
    out: Mapping[str, Tensor], stress: Tensor, settings: StressLossSettings, corrupted: Tensor | None = None
) -> Tensor:
    """The weighted mean stress term of a batch.

    Parameters
    ----------
    out : dict
        Model outputs with ``stress_isotropic [B, 1]`` and ``stress_anisotropic [B, 5]``.
    stress : Tensor
        ``[B, 3, 3]`` (or ``[B, 1, 3, 3]``) labels (eV/Å³); NaN rows (no label) are left out.
    corrupted : Tensor, optional
        ``[B]`` bool, the DeNS structures of the batch.

    Returns
    -------
    Tensor
        ``coefficient * mean`` over the structures that have a stress term (0 if none).
    """
    stress = stress.reshape(-1, 3, 3)  # per-structure entries are stored as [1, 3, 3] and stacked
    keep = torch.isfinite(stress.reshape(-1, 9)).all(dim=1)
    if corrupted is not None and settings.on_corrupted == "skip":
        keep = keep & ~corrupted
    errors = stress_errors(out, torch.where(keep[:, None, None], stress, torch.zeros_like(stress)), settings)
    weight = keep.to(errors.dtype)
    return settings.coefficient * (errors * weight).sum() / weight.sum().clamp(min=1)


def fit_stress_normalizer(stress: Tensor) -> dict[str, float]:
    """Means and RMS deviations of the two parts over ``[B, 3, 3]`` labels (fairchem's normaliser fit:
    the anisotropic mean is one number over all five components)."""
    iso, aniso = decompose_stress(stress.to(torch.float64))
    iso_mean, aniso_mean = float(iso.mean()), float(aniso.mean())
    return {
        "isotropic_mean": iso_mean,
        "isotropic_std": float(((iso - iso_mean) ** 2).mean().sqrt()),
        "anisotropic_mean": aniso_mean,
        "anisotropic_std": float(((aniso - aniso_mean) ** 2).mean().sqrt()),
    }
