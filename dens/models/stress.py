"""Rank-2 (stress) heads and the l = 0 ⊕ l = 2 <-> Cartesian change of basis.

A symmetric 3x3 stress is an isotropic part (``l = 0``, one number) and an anisotropic part (``l = 2``,
five numbers in e3nn's real basis with polar axis y). Two heads predict these parts from EquiformerV2's
node features:

* :class:`FairchemRank2Head`: fairchem 1.x's ``Rank2SymmetricTensorHead`` (``decompose=True``), needed
  for the OMat24 / MPtrj EquiformerV2 checkpoints. Its ``l = 2`` MLP (Linear + bias, SiLU, Linear + bias)
  acts on each of the five components separately, so it is **not rotation equivariant**: under a generic
  rotation its assembled stress differs from ``R S R^T`` by 33-100 % of its size (fairchem fixtures'
  README). It is reproduced exactly, for imported checkpoints.
* :class:`EquivariantRank2Head`: dens's default for new training. ``l = 0`` from an MLP of the scalar
  features; ``l = 2`` from a channel-mixing linear map of the ``l = 2`` features (no bias) gated by
  sigmoids of the scalars, so it rotates exactly as ``R S R^T``.

Both return ``stress_isotropic [B, 1]`` and ``stress_anisotropic [B, 5]`` (means over each structure's
atoms, an intensive quantity); :func:`assemble_stress` makes the 3x3 tensor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops import scatter_mean
from .layers import LayerNormSH
from .so3 import spherical_harmonics

__all__ = [
    "EquivariantRank2Head",
    "FairchemRank2Head",
    "assemble_stress",
    "decompose_stress",
    "rank2_change_of_basis",
    "stress_from_voigt",
    "stress_to_voigt",
]


def rank2_change_of_basis(dtype: torch.dtype = torch.float64) -> Tensor:
    """The orthonormal ``[9, 9]`` matrix ``C`` from flattened 3x3 tensors to ``l = 0 ⊕ 1 ⊕ 2``.

    ``d = C @ vec(S)`` (row-major ``vec``): row 0 is the trace part ``(xx+yy+zz)/sqrt(3)``, rows 1-3 the
    antisymmetric part, rows 4-8 the ``l = 2`` part in e3nn's order for polar axis y:
    ``(xz+zx)/sqrt(2), (xy+yx)/sqrt(2), (2yy-xx-zz)/sqrt(6), (yz+zy)/sqrt(2), (zz-xx)/sqrt(2)``. This is
    the matrix fairchem's ``cg_change_mat(2)`` holds (tested against the fixtures) and the one its
    trainer assembles stress with (``vec(S) = C^T d``).
    """
    xx, xy, xz, yx, yy, yz, zx, zy, zz = range(9)
    s2, s3, s6 = math.sqrt(2), math.sqrt(3), math.sqrt(6)
    rows = [
        {xx: 1 / s3, yy: 1 / s3, zz: 1 / s3},
        {yz: 1 / s2, zy: -1 / s2},
        {xz: -1 / s2, zx: 1 / s2},
        {xy: 1 / s2, yx: -1 / s2},
        {xz: 1 / s2, zx: 1 / s2},
        {xy: 1 / s2, yx: 1 / s2},
        {xx: -1 / s6, yy: 2 / s6, zz: -1 / s6},
        {yz: 1 / s2, zy: 1 / s2},
        {xx: -1 / s2, zz: 1 / s2},
    ]
    change = torch.zeros(9, 9, dtype=torch.float64)
    for r, row in enumerate(rows):
        for c, value in row.items():
            change[r, c] = value
    return change.to(dtype)


def assemble_stress(isotropic: Tensor, anisotropic: Tensor) -> Tensor:
    """The 3x3 tensors ``[B, 3, 3]`` of ``isotropic [B, 1]`` and ``anisotropic [B, 5]``.

    Examples
    --------
    >>> s = assemble_stress(torch.tensor([[3 ** 0.5]]), torch.zeros(1, 5))
    >>> torch.allclose(s, torch.eye(3).expand(1, 3, 3))
    True
    """
    change = rank2_change_of_basis(isotropic.dtype).to(isotropic.device)
    zeros = isotropic.new_zeros(isotropic.shape[0], 3)
    d = torch.cat([isotropic.reshape(-1, 1), zeros, anisotropic.reshape(-1, 5)], dim=1)
    return (d @ change).reshape(-1, 3, 3)


def decompose_stress(stress: Tensor) -> tuple[Tensor, Tensor]:
    """``(isotropic [B, 1], anisotropic [B, 5])`` of 3x3 tensors ``[B, 3, 3]`` (the inverse of
    :func:`assemble_stress` on symmetric tensors; an antisymmetric part is dropped)."""
    change = rank2_change_of_basis(stress.dtype).to(stress.device)
    d = stress.reshape(-1, 9) @ change.T
    return d[:, :1], d[:, 4:9]


_VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


def stress_to_voigt(stress: Tensor) -> Tensor:
    """``[..., 3, 3]`` -> ASE's Voigt order ``[..., 6]``: xx, yy, zz, yz, xz, xy."""
    return torch.stack([stress[..., i, j] for i, j in _VOIGT], dim=-1)


def stress_from_voigt(voigt: Tensor) -> Tensor:
    """ASE's Voigt order ``[..., 6]`` (xx, yy, zz, yz, xz, xy) -> symmetric ``[..., 3, 3]``."""
    xx, yy, zz, yz, xz, xy = voigt.unbind(-1)
    rows = [torch.stack(r, dim=-1) for r in ((xx, xy, xz), (xy, yy, yz), (xz, yz, zz))]
    return torch.stack(rows, dim=-2)


def _zero_on_denoising(
    out: dict[str, Tensor], denoising: bool | Tensor, use_denoising: bool
) -> dict[str, Tensor]:
    """fairchem's ``use_denoising=False``: outputs times 0 on DeNS structures (a bool, or a ``[B]`` mask)."""
    if use_denoising:
        return out
    if isinstance(denoising, Tensor):
        keep = (~denoising.to(torch.bool)).to(out["stress_isotropic"].dtype)[:, None]
        return {k: v * keep for k, v in out.items()}
    return {k: v * 0.0 for k, v in out.items()} if denoising else out


def _mlp(channels: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, out))


class _Rank2Block(nn.Module):
    """fairchem's ``Rank2DecompositionEdgeBlock`` (node level, intensive): edge -> node means -> MLPs."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scalar_MLP = _mlp(channels, 1)
        self.irrep2_MLP = _mlp(channels, 1)

    def forward(
        self, x_edge: Tensor, edge_vec: Tensor, target: Tensor, num_nodes: int
    ) -> tuple[Tensor, Tensor]:
        y2 = spherical_harmonics(2, edge_vec, normalize=True, normalization="integral")[:, 4:9]
        node_scalar = scatter_mean(x_edge, target, num_nodes)
        node_irrep2 = scatter_mean(y2[:, :, None] * x_edge[:, None, :], target, num_nodes)
        # the same MLP on each of the five components: fairchem's (non-equivariant) design
        return self.scalar_MLP(node_scalar).reshape(-1, 1), self.irrep2_MLP(node_irrep2).reshape(-1, 5)


class FairchemRank2Head(nn.Module):
    """fairchem 1.x ``Rank2SymmetricTensorHead`` with ``decompose=True``, ``edge_level_mlp=False``,
    ``extensive=False``, ``use_source_target_embedding=True`` (the OMat24 / MPtrj configurations).

    Per edge ``j -> i``: the (unnormalised, 'integral') spherical harmonics of the edge vector, normalised
    by an ``l``-balanced RMS norm (``sphharm_norm``), weight the concatenated source and target features
    (``x_edge = sum_lm w_lm [x_j, x_i]_lm``), followed by a LayerNorm; the edge features and their
    products with ``Y2(edge)`` are averaged over the edges into each atom, passed through the scalar and
    the (component-wise) ``l = 2`` MLPs and averaged over each structure's atoms.

    Parameters
    ----------
    lmax, channels : int
        The backbone's maximum degree and sphere channels.
    use_denoising : bool
        fairchem's ``DeNSRank2Head`` flag: if False the outputs are multiplied by 0 on DeNS batches
        (``eqV2_31M_dens_mptrj.yml``), so the stress is not trained on corrupted structures. The forward's
        ``denoising`` is a bool (the batch) or a ``[B]`` bool mask (DeNS structures of the batch).

    Notes
    -----
    Not rotation equivariant (module docstring). State-dict names are fairchem's (below
    ``output_heads.stress.``); ``sphharm_norm.balance_degree_weight`` is computed, not stored.
    """

    def __init__(self, lmax: int, channels: int, use_denoising: bool = True) -> None:
        super().__init__()
        self.lmax, self.use_denoising = lmax, use_denoising
        self.sphharm_norm = LayerNormSH(lmax, 1)
        self.xedge_layer_norm = nn.LayerNorm(2 * channels)
        self.block = _Rank2Block(2 * channels)

    def forward(
        self,
        x: Tensor,
        edge_vec: Tensor,
        edge_index: Tensor,
        batch: Tensor,
        num_graphs: int,
        denoising: bool | Tensor = False,
    ) -> dict[str, Tensor]:
        src, dst = edge_index
        sh = spherical_harmonics(self.lmax, edge_vec, normalize=False, normalization="integral")
        weights = self.sphharm_norm(sh[:, :, None])[:, :, 0]
        x_edge = torch.einsum("eic,ei->ec", torch.cat([x[src], x[dst]], dim=2), weights)
        x_edge = self.xedge_layer_norm(x_edge)
        iso, aniso = self.block(x_edge, edge_vec, dst, x.shape[0])
        iso, aniso = scatter_mean(iso, batch, num_graphs), scatter_mean(aniso, batch, num_graphs)
        out = {"stress_isotropic": iso, "stress_anisotropic": aniso}
        return _zero_on_denoising(out, denoising, self.use_denoising)


class EquivariantRank2Head(nn.Module):
    """dens's rotation-equivariant rank-2 head on the node features ``[N, (lmax+1)**2, C]``.

    ``iso = mean_atoms MLP(x_0)``; ``aniso = mean_atoms W_out (sigmoid(G x_0) * (W_in x_2))``, where
    ``x_2`` are the five ``l = 2`` rows and the linear maps mix channels only (no bias), so the ``l = 2``
    output is an ``l = 2`` irrep and the assembled stress rotates as ``R S R^T`` (tested).

    Parameters
    ----------
    channels : int
        The backbone's sphere channels (``lmax >= 2`` needed).
    hidden_channels : int
        Width of the MLP and of the gated ``l = 2`` features.
    use_denoising : bool
        If False, zero outputs on DeNS batches (the stress of a corrupted structure is not trained).
    """

    def __init__(self, channels: int, hidden_channels: int | None = None, use_denoising: bool = True) -> None:
        super().__init__()
        hidden = hidden_channels or channels
        self.use_denoising = use_denoising
        self.scalar_mlp = _mlp(channels, 1) if hidden == channels else nn.Sequential(
            nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, 1)
        )  # fmt: skip
        self.gate = nn.Linear(channels, hidden)
        self.irrep2_in = nn.Linear(channels, hidden, bias=False)
        self.irrep2_out = nn.Linear(hidden, 1, bias=False)

    def forward(
        self,
        x: Tensor,
        edge_vec: Tensor,
        edge_index: Tensor,
        batch: Tensor,
        num_graphs: int,
        denoising: bool | Tensor = False,
    ) -> dict[str, Tensor]:
        if x.shape[1] < 9:
            raise ValueError("EquivariantRank2Head needs node features with lmax >= 2")
        scalars = x[:, 0]
        iso = self.scalar_mlp(scalars)
        aniso = self.irrep2_out(self.irrep2_in(x[:, 4:9]) * torch.sigmoid(self.gate(scalars))[:, None])[
            ..., 0
        ]
        iso, aniso = scatter_mean(iso, batch, num_graphs), scatter_mean(aniso, batch, num_graphs)
        out = {"stress_isotropic": iso, "stress_anisotropic": aniso}
        return _zero_on_denoising(out, denoising, self.use_denoising)
