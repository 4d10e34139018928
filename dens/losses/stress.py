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
from typing import Any

import torch
from torch import Tensor

from ..models.stress import decompose_stress
from .s2ef import loss_dtype

__all__ = [
    "MATERIALS_KEYS",
    "StressLossSettings",
    "energy_per_atom_errors",
    "fit_element_references",
    "fit_stress_normalizer",
    "fit_stress_statistics",
    "materials_settings",
    "stress_abs_errors",
    "stress_errors",
    "stress_loss",
    "stress_term",
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
    anisotropic_error : {'norm', 'mae'}
        The anisotropic part's error per structure: 'norm', the Euclidean norm of the five-component
        error (rotation invariant, dens's default); 'mae', the mean of its five absolute errors
        (fairchem's ``stress_anisotropic: {fn: mae, reduction: mean}``, so that ``coefficient`` times the
        term equals fairchem's two stress terms when both have that coefficient).
    """

    coefficient: float = 1.0
    isotropic_mean: float = 0.0
    isotropic_std: float = 1.0
    anisotropic_mean: float = 0.0
    anisotropic_std: float = 1.0
    on_corrupted: str = "skip"
    anisotropic_error: str = "norm"

    def __post_init__(self) -> None:
        if self.anisotropic_error not in ("norm", "mae"):
            raise ValueError(f"anisotropic_error must be 'norm' or 'mae', got {self.anisotropic_error!r}")
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
    """Per structure ``|iso - iso*| + ||aniso - aniso*||`` in normalised units, ``[B]`` (with
    ``anisotropic_error='mae'`` the mean of the five ``|aniso_k - aniso_k*|`` instead of the norm)."""
    dtype = loss_dtype(out["stress_isotropic"])
    iso, aniso = decompose_stress(stress.to(torch.float64))
    iso_t = ((iso - settings.isotropic_mean) / settings.isotropic_std).to(dtype)
    aniso_t = ((aniso - settings.anisotropic_mean) / settings.anisotropic_std).to(dtype)
    iso_err = (out["stress_isotropic"].to(dtype).reshape(-1, 1) - iso_t).abs()[:, 0]
    aniso_diff = out["stress_anisotropic"].to(dtype).reshape(-1, 5) - aniso_t
    if settings.anisotropic_error == "mae":
        aniso_err = aniso_diff.abs().mean(dim=-1)
    else:
        aniso_err = torch.linalg.vector_norm(aniso_diff, dim=-1)
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


#: the keys of the ``materials`` config group
MATERIALS_KEYS = {
    "stress_coefficient",
    "stress_on_corrupted",
    "stress_anisotropic_error",
    "energy_per_atom",
    "element_references",
    "normalizer_structures",
}


def materials_settings(model: Any, materials: Mapping[str, Any] | None) -> StressLossSettings | None:
    """The stress term of a training run from its ``materials`` config section (None: no stress term).

    ``materials``: ``stress_coefficient`` (0: off), ``stress_on_corrupted`` ('skip' | 'clean_target'),
    ``stress_anisotropic_error`` ('norm' | 'mae': :class:`StressLossSettings`),
    ``energy_per_atom``, ``element_references`` ('fit': :func:`fit_element_references` in ``dens.train``)
    and ``normalizer_structures`` (read by the trainer and ``dens.train``). The normalisers are the
    model's (``ForceField.stress_normalizer``).

    Raises
    ------
    ValueError
        For unknown keys, a model without a stress head, or ``clean_target`` with a head that zeroes its
        output on DeNS structures (``stress_use_denoising=False``).
    """
    materials = dict(materials or {})
    unknown = set(materials) - MATERIALS_KEYS
    if unknown:
        raise ValueError(f"materials: unknown keys {sorted(unknown)}; known: {sorted(MATERIALS_KEYS)}")
    coefficient = float(materials.get("stress_coefficient", 0.0))
    if coefficient == 0.0:
        return None
    head = model.backbone.stress_head
    if head is None:
        raise ValueError(
            "materials.stress_coefficient > 0 needs a model with a stress head (backbone.stress_head)"
        )
    on_corrupted = materials.get("stress_on_corrupted", "skip")
    if on_corrupted == "clean_target" and not head.use_denoising:
        raise ValueError(
            "stress_on_corrupted='clean_target' with a stress head that zeroes DeNS structures "
            "(stress_use_denoising=False): set one of them the other way"
        )
    mean_iso, std_iso, mean_aniso, std_aniso = model.stress_normalizer.tolist()
    anisotropic_error = materials.get("stress_anisotropic_error", "norm")
    return StressLossSettings(
        coefficient, mean_iso, std_iso, mean_aniso, std_aniso, on_corrupted, anisotropic_error
    )


def stress_term(
    out: Mapping[str, Tensor],
    stress: Tensor | None,
    settings: StressLossSettings,
    corrupted: Tensor | None,
    denominator: Tensor,
) -> Tensor:
    """The (unweighted) stress term of a micro-batch: its structures' errors summed and divided by
    ``denominator`` (the global batch's number of structures, over the world size, as the other terms
    of :func:`dens.losses.dens.training_loss`); structures without a label or skipped as corrupted add 0.
    """
    if stress is None:
        raise ValueError(
            "the stress term is on (materials.stress_coefficient) but the batch has no stress labels"
        )
    stress = stress.reshape(-1, 3, 3)
    keep = torch.isfinite(stress.reshape(-1, 9)).all(dim=1)
    if corrupted is not None and settings.on_corrupted == "skip":
        keep = keep & ~corrupted
    errors = stress_errors(out, torch.where(keep[:, None, None], stress, torch.zeros_like(stress)), settings)
    return (errors * keep.to(errors.dtype)).sum() / denominator.to(errors.dtype).clamp(min=1e-12)


def stress_abs_errors(pred: Tensor, labels: Tensor | None) -> tuple[float, int]:
    """Validation stress error: the sum of ``|S_pred - S|`` over the nine components of the structures that
    have a (finite) label, and the number of components summed (eV/Å³; fairchem's stress ``mae`` counts
    the nine components of the 3x3 tensor likewise).

    Parameters
    ----------
    pred : Tensor
        ``[B, 3, 3]`` predicted stress (eV/Å³).
    labels : Tensor or None
        ``[B, 3, 3]`` or ``[B, 1, 3, 3]`` labels, NaN rows for structures without one (None: no labels).
    """
    if labels is None:
        return 0.0, 0
    labels = labels.detach().reshape(-1, 9).to(torch.float64).cpu()
    pred = pred.detach().reshape(-1, 9).to(torch.float64).cpu()
    if labels.shape != pred.shape:
        raise ValueError(f"stress labels {tuple(labels.shape)} and predictions {tuple(pred.shape)} differ")
    keep = torch.isfinite(labels).all(dim=1)
    return float((pred[keep] - labels[keep]).abs().sum()), 9 * int(keep.sum())


def fit_stress_statistics(dataset: Any, limit: int = 10000) -> dict[str, float]:
    """:func:`fit_stress_normalizer` over the labelled structures among the first ``limit`` of a dataset,
    as ``ForceField`` keyword arguments (``stress_isotropic_mean``, ...)."""
    labels = []
    for i in range(min(len(dataset), limit)):
        s = dataset[i]
        if s is not None and s.get("stress") is not None and bool(torch.isfinite(s["stress"]).all()):
            labels.append(s["stress"].reshape(3, 3).to(torch.float64))
    if not labels:
        raise ValueError(f"no stress labels among the first {min(len(dataset), limit)} training structures")
    norm = fit_stress_normalizer(torch.stack(labels))
    return {f"stress_{k}": v for k, v in norm.items()}


def fit_element_references(train_set: Any, limit: int = 10000) -> list[float]:
    """Fit per-element reference energies by linear regression on the first ``limit`` training structures
    (fairchem's ``element_references: fit``), and subtract them from the training set's energies from now
    on (a :class:`~dens.data.normalize.LinearReference` transform appended to ``train_set.transforms``).

    The model predicts the referenced energy; ``ForceField(element_references=...)`` adds the references
    back in ``predict`` (validation, calculator), so validation sets keep their total energies.

    Returns
    -------
    list of float
        The references indexed by atomic number (0..118).

    Raises
    ------
    ValueError
        When the training set takes no transforms (e.g. a split of one file) or has no energies.
    """
    from ..data.normalize import LinearReference, fit_linear_reference

    if not isinstance(getattr(train_set, "transforms", None), list):
        raise ValueError(
            f"materials.element_references=fit needs a training set with transforms, not {type(train_set).__name__}"
        )
    structures = (train_set[i] for i in range(min(len(train_set), limit)))
    coeff = fit_linear_reference(structures, max_z=118)
    if not coeff.any():
        raise ValueError("materials.element_references=fit: the training structures have no energies")
    train_set.transforms.append(LinearReference(coeff))
    return [float(c) for c in coeff]
