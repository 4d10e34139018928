"""Output heads shared by the backbones: energy reduction, gradient forces, DeNS force assembly.

The backbone-specific read-out blocks (EquiformerV2's FFN energy block and attention force block,
eSCN's sphere-point MLPs) live with their backbone; this module holds what every backbone shares.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from ..ops import scatter_sum

__all__ = [
    "assemble_dens_forces",
    "gradient_forces",
    "reduce_energy",
    "retain_energy_graph",
    "split_head_edges",
]

_retain_graph = False


@contextmanager
def retain_energy_graph() -> Iterator[None]:
    """Keep the energy's autograd graph after :func:`gradient_forces`, for a second derivative of the
    same energy (the conservative stress ``dE/d strain``)."""
    global _retain_graph
    previous, _retain_graph = _retain_graph, True
    try:
        yield
    finally:
        _retain_graph = previous


def reduce_energy(node_energy: Tensor, batch: Tensor, num_graphs: int, scale: float = 1.0) -> Tensor:
    """Per-structure energy ``sum_i e_i / scale`` (the official models divide by a fixed constant)."""
    return scatter_sum(node_energy.reshape(-1), batch, num_graphs) / scale


def gradient_forces(energy: Tensor, pos: Tensor, create_graph: bool) -> Tensor:
    """Conservative forces ``-dE/dpos``; ``create_graph=True`` when the forces enter a training loss."""
    (grad,) = torch.autograd.grad(
        energy.sum(), pos, create_graph=create_graph, retain_graph=create_graph or _retain_graph
    )
    return -grad


def edge_gradient_forces(edge_grad: Tensor, edge_index: Tensor, num_atoms: int) -> Tensor:
    """Forces ``-dE/dpos`` from the gradient of the energy with respect to the edge vectors.

    An edge vector is ``pos[src] + shift - pos[dst]``, so atom ``i`` collects ``+dE/dv`` from the edges it
    is the source of and ``-dE/dv`` from those it is the target of (and the force is minus their sum).
    """
    src, dst = edge_index
    return scatter_sum(edge_grad, dst, num_atoms) - scatter_sum(edge_grad, src, num_atoms)


def assemble_dens_forces(force_head: Tensor, noise_head: Tensor, noise_mask: Tensor | None) -> Tensor:
    """DeNS output: the noise prediction on corrupted atoms, the force prediction elsewhere.

    With ``noise_mask=None`` every atom is corrupted (DeNS without partial corruption).
    """
    if noise_mask is None:
        return noise_head
    return torch.where(noise_mask[:, None], noise_head, force_head)


def split_head_edges(edge_index: Tensor, noise_mask: Tensor | None) -> tuple[Tensor | None, Tensor]:
    """Edges of the force head (targets outside ``noise_mask``) and of the noise head (targets in it).

    A head's output at an atom depends only on the edges into that atom, and DeNS training reads the
    force head on uncorrupted atoms and the noise head on corrupted ones; running each head on its own
    edges gives those outputs exactly, at the cost of one head. ``noise_mask=None``: no atom is
    corrupted, and the force head keeps every edge (``None``, no index to apply). This synchronises with the device (the index sizes); call it outside a compiled region.

    Examples
    --------
    >>> edge_index = torch.tensor([[1, 2, 0, 0], [0, 0, 1, 2]])
    >>> force_edges, noise_edges = split_head_edges(edge_index, torch.tensor([False, True, False]))
    >>> force_edges.tolist(), noise_edges.tolist()
    ([0, 1, 3], [2])
    """
    if noise_mask is None:
        return None, edge_index.new_zeros(0)
    to_noise = noise_mask.index_select(0, edge_index[1])
    return (~to_noise).nonzero().reshape(-1), to_noise.nonzero().reshape(-1)
