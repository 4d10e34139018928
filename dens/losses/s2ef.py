"""Energy and force errors of Eq. 1, computed in at least float32 against float64-normalised targets.

The averaging of these errors over a (distributed, accumulated) global batch is in
:func:`dens.losses.dens.training_loss`: every term is a sum divided by a denominator of the whole global
batch (all-reduced over DDP ranks and summed over micro-batches), times the world size because DDP
averages gradients, so one process and many give the same gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["energy_errors", "force_errors", "loss_dtype"]


def loss_dtype(pred: Tensor) -> torch.dtype:
    """float32 for half-precision predictions (AMP), else the prediction's own dtype."""
    return torch.promote_types(pred.dtype, torch.float32)


def energy_errors(pred: Tensor, energy: Tensor, mean: float, std: float) -> Tensor:
    """``|pred - (E - mean) / std|`` per structure; the target is normalised in float64 first, so large
    total energies (MD17: ~-17,600 eV) lose no precision."""
    dtype = loss_dtype(pred)
    target = (energy.to(torch.float64) - mean) / std
    return (pred.to(dtype) - target.to(dtype)).abs()


def force_errors(pred: Tensor, forces: Tensor, std: float) -> Tensor:
    """``||pred - F / std||`` per atom (OCP's ``l2mae`` before averaging)."""
    dtype = loss_dtype(pred)
    target = (forces.to(torch.float64) / std).to(dtype)
    return torch.linalg.vector_norm(pred.to(dtype) - target, dim=-1)
