"""Output heads shared by the backbones: energy reduction, gradient forces, DeNS force assembly.

The backbone-specific read-out blocks (EquiformerV2's FFN energy block and attention force block,
eSCN's sphere-point MLPs) live with their backbone; this module holds what every backbone shares.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import scatter_sum

__all__ = ["assemble_dens_forces", "gradient_forces", "reduce_energy"]


def reduce_energy(node_energy: Tensor, batch: Tensor, num_graphs: int, scale: float = 1.0) -> Tensor:
    """Per-structure energy ``sum_i e_i / scale`` (the official models divide by a fixed constant)."""
    return scatter_sum(node_energy.reshape(-1), batch, num_graphs) / scale


def gradient_forces(energy: Tensor, pos: Tensor, create_graph: bool) -> Tensor:
    """Conservative forces ``-dE/dpos``; ``create_graph=True`` when the forces enter a training loss."""
    (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=create_graph)
    return -grad


def assemble_dens_forces(force_head: Tensor, noise_head: Tensor, noise_mask: Tensor | None) -> Tensor:
    """DeNS output: the noise prediction on corrupted atoms, the force prediction elsewhere.

    With ``noise_mask=None`` every atom is corrupted (DeNS without partial corruption).
    """
    if noise_mask is None:
        return noise_head
    return torch.where(noise_mask[:, None], noise_head, force_head)
