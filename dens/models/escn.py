"""eSCN: equivariant spherical channel network (Passaro & Zitnick, ICML 2023), as used in DeNS Table 1a.

The model in one pass (read against Sec. 3 of the eSCN paper and the DeNS paper, Sec. 4):

1. **Embedding.** Every atom starts with ``x = [N, (lmax+1)**2, C]`` in the l-major layout of
   :mod:`dens.models.so3`; only ``l = 0`` is filled, from ``sphere_embedding[Z]``. An optional extra
   embedding (the DeNS force encoding, Eq. 5) is added here, before the first layer.
2. **Layers** (:class:`LayerBlock`). For every edge ``j -> i`` (``edge_index[0] = j`` source,
   ``edge_index[1] = i`` target):

   a. edge scalars ``h = SiLU(fc1_edge_attr(SiLU(fc1_dist(gauss(d)) + src_emb[Z_j] + dst_emb[Z_i])))``;
   b. ``x_j`` and ``x_i`` are rotated into the edge frame (edge on ``+y``), keeping ``|m| <= mmax``;
   c. each passes its own SO(2) block (:class:`SO2Block`): per order ``m`` a two-layer complex-linear
      map whose hidden units are gated by ``SiLU(fc1_dist(h))``; the two results are summed;
   d. SiLU is applied point-wise on the ``[lmax][mmax]`` sphere grid (``2(lmax+1) x (2 mmax+1)``
      points), still in the edge frame, and the message is rotated back;
   e. messages are summed into the target, with no degree normalisation;
   f. ``x`` and the aggregated message are sampled on the ``[lmax][lmax]`` grid, concatenated per point
      and passed through a point-wise MLP (``fc1_sphere``, ``fc2_sphere``, ``fc3_sphere``, no biases);
      the result is projected back to coefficients.

   Layer 0 replaces ``x`` by its output; every later layer adds it to ``x`` (residual).
3. **Readout.** ``x`` is sampled at ``num_sphere_samples`` roughly uniform points ``p`` (frozen
   ``sphere_points``; not exactly unit length) through the frozen ``sphharm_weights = Y(p)``
   (unnormalised inputs, 'integral' normalisation). Each point value goes through an MLP
   ``C -> C -> C -> 1``:

   - energy: ``E = 0.001 * sum_atoms mean_p MLP_E(x(p))``;
   - forces (direct): ``F_i = mean_p MLP_F(x_i(p)) * p``;
   - DeNS noise head (``dens_heads``): a second force block ``denoising_pos_block``.

The Wigner matrices of the edge frames are detached, as in the official code (the direct force head
does not need their gradient; ``detach_frames=False`` keeps it). Both grids use e3nn's 'integral'
normalisation, as the official eSCN ``SO3_Grid``: with it the official float64 fixture outputs are
reproduced to 7e-8 (energy) / 6e-7 (forces); with 'component' the errors would be 3e-2 / 0.9.

Parameter names follow the official ``eSCN`` / ``eSCN_DenoisingPos`` modules, except
``layer_blocks -> layers``, ``message_block -> message``, ``edge_block -> edge``,
``so2_block_{source,target} -> so2_{source,target}``, ``sphharm_weights.0 -> sphharm_weights`` and
``force_embedding -> force_encoder.linear``; :mod:`dens.models.official.escn` maps them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..ops import scatter_sum
from .force_encoder import ForceEncoder
from .heads import assemble_dens_forces
from .interface import dens_embedding, resolve_dens_heads
from .layers import GaussianSmearing
from .s2 import S2Activation, SphereGrid
from .so2 import EdgeRotation
from .so3 import CoefficientLayout, precompute, spherical_harmonics
from .so3 import edge_frames as deterministic_edge_frames

__all__ = ["ESCN", "ESCN_PRESETS", "sphere_sample_points"]


# Table 1a of the DeNS paper (OC20 S2EF-2M, eSCN): 12 layers, L = 6, M = 2, 128 / 256 / 128 channels.
ESCN_PRESETS: dict[str, dict[str, Any]] = {
    "oc20_2m": {
        "num_layers": 12,
        "lmax": 6,
        "mmax": 2,
        "sphere_channels": 128,
        "hidden_channels": 256,
        "edge_channels": 128,
        "num_sphere_samples": 128,
        "cutoff": 12.0,
        "max_neighbors": 20,
        "basis_width_scalar": 2.0,
        "distance_resolution": 0.02,
        "max_num_elements": 90,
    },
}


def sphere_sample_points(num_points: int) -> Tensor:
    """Roughly uniform points on the sphere for the readout, weighted by their inverse local density.

    A Fibonacci spiral (polar axis z) gives ``num_points`` unit vectors; each is then scaled by the
    inverse of a Gaussian kernel density estimate (bandwidth ``exp(-|p - q|^2 / 0.15)``), normalised to
    a mean of 1. The norms therefore deviate from 1 by a few percent, as in the official model.

    Parameters
    ----------
    num_points : int
        Number of samples.

    Returns
    -------
    Tensor
        ``[num_points, 3]`` float32.
    """
    golden_ratio = (1 + math.sqrt(5)) / 2
    i = torch.arange(num_points, dtype=torch.float32)[:, None]
    azimuth = 2 * math.pi * i / golden_ratio
    polar = torch.arccos(1 - 2 * (i + 0.5) / num_points)
    points = torch.cat(
        [torch.cos(azimuth) * torch.sin(polar), torch.sin(azimuth) * torch.sin(polar), torch.cos(polar)],
        dim=1,
    )
    sq_dist = (points[None, :, :] - points[:, None, :]).pow(2).sum(-1)
    inverse_density = 1.0 / torch.exp(-sq_dist / 0.15).sum(dim=1)
    weight = num_points * inverse_density / inverse_density.sum()
    return points * weight[:, None]


# --------------------------------------------------------------------------------------------------
# Edge scalars
# --------------------------------------------------------------------------------------------------
class EdgeBlock(nn.Module):
    """Invariant edge features from the distance and the two atomic numbers.

    ``h = SiLU(fc1_edge_attr(SiLU(fc1_dist(gauss(d)) + source_embedding[Z_j] + target_embedding[Z_i])))``.

    Parameters
    ----------
    edge_channels : int
        Width ``E_c`` of the edge features.
    distance_expansion : GaussianSmearing
        The radial basis (shared by all layers).
    max_num_elements : int
        Size of the atomic-number embeddings.
    """

    def __init__(
        self, edge_channels: int, distance_expansion: GaussianSmearing, max_num_elements: int
    ) -> None:
        super().__init__()
        self.distance_expansion = distance_expansion
        num_basis = int(distance_expansion.offset.numel())
        self.fc1_dist = nn.Linear(num_basis, edge_channels)
        self.source_embedding = nn.Embedding(max_num_elements, edge_channels)
        self.target_embedding = nn.Embedding(max_num_elements, edge_channels)
        nn.init.uniform_(self.source_embedding.weight, -0.001, 0.001)
        nn.init.uniform_(self.target_embedding.weight, -0.001, 0.001)
        self.fc1_edge_attr = nn.Linear(edge_channels, edge_channels)
        self.act = nn.SiLU()

    def forward(self, distance: Tensor, source_z: Tensor, target_z: Tensor) -> Tensor:
        """``distance``: ``[E]``; ``source_z``, ``target_z``: ``[E]`` -> ``[E, E_c]``."""
        h = self.fc1_dist(self.distance_expansion(distance))
        h = self.act(h + self.source_embedding(source_z) + self.target_embedding(target_z))
        return self.act(self.fc1_edge_attr(h))


# --------------------------------------------------------------------------------------------------
# SO(2) convolution of eSCN
# --------------------------------------------------------------------------------------------------
class SO2OrderConv(nn.Module):
    """eSCN's SO(2) convolution for one order ``m > 0`` (official ``SO2Conv``).

    The ``+m`` and ``-m`` coefficients of degrees ``l = m .. lmax`` form ``x_+`` and ``x_-``
    (``[n * C]`` each, degree-major, channel-fastest). With ``f_r(x) = fc2_r(fc1_r(x) * g_r)`` and
    ``f_i(x) = fc2_i(fc1_i(x) * g_i)``, where ``[g_r, g_i] = SiLU(fc1_dist(h))``::

        out_+ = f_r(x_+) - f_i(x_-)        out_- = f_r(x_-) + f_i(x_+)

    i.e. a complex-linear map of ``x_+ + i x_-``, which commutes with rolls about the edge axis.
    """

    def __init__(self, num_features: int, hidden_channels: int, edge_channels: int) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        self.fc1_dist = nn.Linear(edge_channels, 2 * hidden_channels)
        self.fc1_r = nn.Linear(num_features, hidden_channels, bias=False)
        self.fc2_r = nn.Linear(hidden_channels, num_features, bias=False)
        self.fc1_i = nn.Linear(num_features, hidden_channels, bias=False)
        self.fc2_i = nn.Linear(hidden_channels, num_features, bias=False)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, x_edge: Tensor) -> Tensor:
        """``x``: ``[E, 2, n * C]`` (rows ``+m``, ``-m``); ``x_edge``: ``[E, E_c]`` -> ``[E, 2, n * C]``."""
        gate_r, gate_i = self.act(self.fc1_dist(x_edge)).chunk(2, dim=-1)
        r_plus, r_minus = self.fc2_r(self.fc1_r(x) * gate_r[:, None]).unbind(1)
        i_plus, i_minus = self.fc2_i(self.fc1_i(x) * gate_i[:, None]).unbind(1)
        return torch.stack([r_plus - i_minus, r_minus + i_plus], dim=1)


class SO2Block(nn.Module):
    """All orders ``m = 0 .. mmax`` of eSCN's SO(2) convolution, on edge-frame features (m-major).

    ``m = 0``: ``fc2_m0(fc1_m0(x_0) * SiLU(fc1_dist0(h)))`` on the ``(lmax+1) * C`` real coefficients;
    ``m > 0``: :class:`SO2OrderConv`.

    Parameters
    ----------
    channels : int
        Sphere channels ``C``.
    hidden_channels : int
        Hidden width of every order's map.
    edge_channels : int
        Width of the edge features.
    layout : CoefficientLayout
        ``lmax`` and ``mmax``.
    """

    def __init__(
        self, channels: int, hidden_channels: int, edge_channels: int, layout: CoefficientLayout
    ) -> None:
        super().__init__()
        self.channels = channels
        self.m_size = layout.m_size
        self.fc1_dist0 = nn.Linear(edge_channels, hidden_channels)
        self.fc1_m0 = nn.Linear(self.m_size[0] * channels, hidden_channels, bias=False)
        self.fc2_m0 = nn.Linear(hidden_channels, self.m_size[0] * channels, bias=False)
        self.so2_conv = nn.ModuleList(
            SO2OrderConv(n * channels, hidden_channels, edge_channels) for n in self.m_size[1:]
        )
        self.act = nn.SiLU()

    def forward(self, x: Tensor, x_edge: Tensor) -> Tensor:
        """``x``: ``[E, R, C]`` m-major reduced; ``x_edge``: ``[E, E_c]`` -> ``[E, R, C]``."""
        num_edges = x.shape[0]
        n0 = self.m_size[0]
        # split, not slices: the backward of a split concatenates, that of a slice zero-fills the input
        blocks = x.split([n0, *(2 * n for n in self.m_size[1:])], dim=1)
        x0 = blocks[0].reshape(num_edges, n0 * self.channels)
        y0 = self.fc2_m0(self.fc1_m0(x0) * self.act(self.fc1_dist0(x_edge)))
        out = [y0.reshape(num_edges, n0, self.channels)]
        for n, xm, conv in zip(self.m_size[1:], blocks[1:], self.so2_conv, strict=True):
            xm = xm.reshape(num_edges, 2, n * self.channels)
            out.append(conv(xm, x_edge).reshape(num_edges, 2 * n, self.channels))
        return torch.cat(out, dim=1)


# --------------------------------------------------------------------------------------------------
# Message passing and the layer
# --------------------------------------------------------------------------------------------------
class MessageBlock(nn.Module):
    """Messages ``j -> i`` in the edge frame, summed into the target ``i`` (steps 2a-2e).

    Parameters
    ----------
    channels, hidden_channels, edge_channels : int
        Sphere, hidden and edge widths.
    layout : CoefficientLayout
        ``lmax`` and ``mmax``.
    distance_expansion : GaussianSmearing
        Shared radial basis.
    max_num_elements : int
        Size of the atomic-number embeddings.
    message_grid : SphereGrid
        The ``[lmax][mmax]`` grid with m-major columns (shared by all layers).
    """

    def __init__(
        self,
        *,
        channels: int,
        hidden_channels: int,
        edge_channels: int,
        layout: CoefficientLayout,
        distance_expansion: GaussianSmearing,
        max_num_elements: int,
        message_grid: SphereGrid,
    ) -> None:
        super().__init__()
        self.edge = EdgeBlock(edge_channels, distance_expansion, max_num_elements)
        self.so2_source = SO2Block(channels, hidden_channels, edge_channels, layout)
        self.so2_target = SO2Block(channels, hidden_channels, edge_channels, layout)
        self.s2_act = S2Activation(message_grid)

    def forward(
        self,
        x: Tensor,
        atomic_numbers: Tensor,
        distance: Tensor,
        edge_index: Tensor,
        rotation: EdgeRotation,
    ) -> Tensor:
        """``x``: ``[N, (L+1)^2, C]`` -> aggregated messages ``[N, (L+1)^2, C]``."""
        source, target = edge_index[0], edge_index[1]
        x_edge = self.edge(distance, atomic_numbers[source], atomic_numbers[target])
        message = self.so2_source(rotation.rotate(x.index_select(0, source)), x_edge)
        message = message + self.so2_target(rotation.rotate(x.index_select(0, target)), x_edge)
        message = self.s2_act(message)
        message = rotation.rotate_back(message)
        return scatter_sum(message, target, x.shape[0])


class LayerBlock(nn.Module):
    """One eSCN layer: messages, then a point-wise MLP on the ``[lmax][lmax]`` grid of ``[x, message]``.

    Returns the layer's output, which the model uses in place of ``x`` (layer 0) or adds to ``x``.
    """

    def __init__(
        self,
        *,
        channels: int,
        hidden_channels: int,
        edge_channels: int,
        layout: CoefficientLayout,
        distance_expansion: GaussianSmearing,
        max_num_elements: int,
        message_grid: SphereGrid,
        sphere_grid: SphereGrid,
    ) -> None:
        super().__init__()
        self.message = MessageBlock(
            channels=channels,
            hidden_channels=hidden_channels,
            edge_channels=edge_channels,
            layout=layout,
            distance_expansion=distance_expansion,
            max_num_elements=max_num_elements,
            message_grid=message_grid,
        )
        self.sphere_grid = sphere_grid
        self.fc1_sphere = nn.Linear(2 * channels, channels, bias=False)
        self.fc2_sphere = nn.Linear(channels, channels, bias=False)
        self.fc3_sphere = nn.Linear(channels, channels, bias=False)
        self.act = nn.SiLU()

    def forward(
        self,
        x: Tensor,
        atomic_numbers: Tensor,
        distance: Tensor,
        edge_index: Tensor,
        rotation: EdgeRotation,
    ) -> Tensor:
        """``x``: ``[N, (L+1)^2, C]`` -> ``[N, (L+1)^2, C]``."""
        message = self.message(x, atomic_numbers, distance, edge_index, rotation)
        grid = self.sphere_grid
        values = torch.cat([grid.to_grid(x), grid.to_grid(message)], dim=-1)  # [N, points, 2C]
        values = self.act(self.fc1_sphere(values))
        values = self.act(self.fc2_sphere(values))
        return grid.from_grid(self.fc3_sphere(values))


# --------------------------------------------------------------------------------------------------
# Readout
# --------------------------------------------------------------------------------------------------
class SpherePointHead(nn.Module):
    """The point-wise readout MLP ``C -> C -> C -> 1`` (official ``EnergyBlock`` / ``ForceBlock``).

    :meth:`scalar` averages the point values (energy per atom); :meth:`vector` averages them times the
    sample points (a direct force or noise prediction per atom).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, channels)
        self.fc2 = nn.Linear(channels, channels)
        self.fc3 = nn.Linear(channels, 1, bias=False)
        self.act = nn.SiLU()

    def forward(self, x_points: Tensor) -> Tensor:
        """``x_points``: ``[N, P, C]`` -> ``[N, P]``."""
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x_points))))).squeeze(-1)

    def scalar(self, x_points: Tensor) -> Tensor:
        """``[N, P, C]`` -> ``[N]``: the mean over the points."""
        return self(x_points).mean(dim=1)

    def vector(self, x_points: Tensor, points: Tensor) -> Tensor:
        """``[N, P, C]``, points ``[P, 3]`` -> ``[N, 3]``: ``mean_p value_p * point_p``."""
        return self(x_points) @ points / points.shape[0]


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
class ESCN(nn.Module):
    """eSCN backbone with its energy and direct-force heads, and the DeNS noise head.

    Parameters
    ----------
    num_layers : int
        Number of :class:`LayerBlock` s.
    lmax, mmax : int
        Maximum degree of the node features and maximum order kept in the edge frame.
    sphere_channels : int
        Channels ``C`` per coefficient.
    hidden_channels : int
        Hidden width of the SO(2) maps.
    edge_channels : int
        Width of the invariant edge features.
    num_sphere_samples : int
        Points of the readout.
    cutoff : float
        Radial cutoff in Å (the graph is built outside; the Gaussian basis spans ``[0, cutoff]``).
    max_neighbors : int
        Max-neighbour rule of the graph (kept for the data pipeline; the model does not build graphs).
    max_num_elements : int
        Size of the atomic-number embeddings.
    basis_width_scalar : float
        Gaussian width in units of the centre spacing.
    distance_resolution : float
        Centre spacing target: ``int(cutoff / distance_resolution)`` Gaussians.
    regress_forces : bool
        Build the direct force head ``force_block`` (the official switch; without it the model predicts
        energies only: eSCN has no gradient forces).
    dens_heads : bool
        DeNS: build :attr:`force_encoder` (the caller passes its output as ``extra_embedding``) and the
        noise head ``denoising_pos_block`` (``use_force_encoding``: the deprecated name, still accepted).
    encode_forces : bool
        With ``dens_heads``: build the force encoder too (default). False is the official
        ``use_force_encoding=False`` ablation: the noise head without a force encoder.
    detach_frames : bool
        Detach the edge frames (and so the Wigner matrices) from the graph, as the official code does.
        Set False to differentiate the energy with respect to positions exactly.

    Examples
    --------
    >>> model = ESCN(num_layers=1, lmax=2, mmax=1, sphere_channels=8, hidden_channels=8, edge_channels=8,
    ...              num_sphere_samples=16)
    >>> z = torch.tensor([1, 8, 1])
    >>> pos = torch.tensor([[0.0, 0.6, 0.8], [0.0, 0.0, 0.0], [0.9, 0.1, 0.4]])
    >>> edge_index = torch.tensor([[1, 0, 2, 1], [0, 1, 1, 2]])  # source (neighbour) row first
    >>> out = model(z, pos, torch.zeros(3, dtype=torch.long), edge_index, torch.zeros(4, 3), num_graphs=1)
    >>> out["energy"].shape, out["forces"].shape
    (torch.Size([1]), torch.Size([3, 3]))

    :meth:`forward_edges` takes the edge vectors ``pos[j] + shift - pos[i]`` instead of positions:

    >>> vec = pos[edge_index[0]] - pos[edge_index[1]]
    >>> edges = model.forward_edges(z, edge_index, vec, torch.zeros(3, dtype=torch.long), num_graphs=1)
    >>> torch.equal(edges["energy"], out["energy"])
    True
    """

    def __init__(
        self,
        num_layers: int = 12,
        lmax: int = 6,
        mmax: int = 2,
        sphere_channels: int = 128,
        hidden_channels: int = 256,
        edge_channels: int = 128,
        num_sphere_samples: int = 128,
        cutoff: float = 12.0,
        max_neighbors: int = 20,
        max_num_elements: int = 90,
        basis_width_scalar: float = 2.0,
        distance_resolution: float = 0.02,
        regress_forces: bool = True,
        dens_heads: bool = False,
        encode_forces: bool = True,
        detach_frames: bool = True,
        use_force_encoding: bool | None = None,
    ) -> None:
        super().__init__()
        dens_heads = resolve_dens_heads(dens_heads, use_force_encoding, "ESCN")
        self.num_layers, self.lmax, self.mmax = num_layers, lmax, mmax
        self.sphere_channels, self.hidden_channels, self.edge_channels = (
            sphere_channels,
            hidden_channels,
            edge_channels,
        )
        self.num_sphere_samples = num_sphere_samples
        self.cutoff, self.max_neighbors, self.max_num_elements = cutoff, max_neighbors, max_num_elements
        self.regress_forces = regress_forces
        self.detach_frames = detach_frames
        self.layout = CoefficientLayout(lmax, mmax)
        precompute(lmax)  # so3 constants, before any compiled forward

        # 1. Embedding (and the DeNS force encoding that the caller adds as an extra embedding).
        self.sphere_embedding = nn.Embedding(max_num_elements, sphere_channels)
        self.force_encoder: ForceEncoder | None = None
        if dens_heads and encode_forces:
            self.force_encoder = ForceEncoder(lmax, sphere_channels)
            nn.init.uniform_(self.force_encoder.linear.weight, -0.001, 0.001)

        # 2. Layers. The radial basis and the two grids are shared by all layers.
        num_gaussians = int(cutoff / distance_resolution)
        self.distance_expansion = GaussianSmearing(0.0, cutoff, num_gaussians, basis_width_scalar)
        self.message_grid = SphereGrid(lmax, mmax, normalization="integral", m_major=True)
        self.sphere_grid = SphereGrid(lmax, lmax, normalization="integral")
        self.layers = nn.ModuleList(
            LayerBlock(
                channels=sphere_channels,
                hidden_channels=hidden_channels,
                edge_channels=edge_channels,
                layout=self.layout,
                distance_expansion=self.distance_expansion,
                max_num_elements=max_num_elements,
                message_grid=self.message_grid,
                sphere_grid=self.sphere_grid,
            )
            for _ in range(num_layers)
        )

        # 3. Readout: frozen sample points and the spherical harmonics at those points.
        points = sphere_sample_points(num_sphere_samples)
        self.sphere_points = nn.Parameter(points, requires_grad=False)
        sh = spherical_harmonics(lmax, points.double(), normalize=False, normalization="integral")
        self.sphharm_weights = nn.Parameter(sh.float(), requires_grad=False)
        self.energy_block = SpherePointHead(sphere_channels)
        self.force_block = SpherePointHead(sphere_channels) if regress_forces else None
        self.denoising_pos_block = SpherePointHead(sphere_channels) if dens_heads else None

    @classmethod
    def from_preset(cls, name: str, dens_heads: bool = False, **overrides: Any) -> ESCN:
        """Build a named configuration (see :data:`ESCN_PRESETS`); ``dens_heads`` adds the DeNS parts.

        ``ESCN.from_preset('oc20_2m')`` has 51,844,608 parameters, with ``dens_heads=True`` 51,878,784.
        """
        if name not in ESCN_PRESETS:
            raise ValueError(f"unknown eSCN preset {name!r}; available: {sorted(ESCN_PRESETS)}")
        dens_heads = resolve_dens_heads(dens_heads, overrides.pop("dens", None), "from_preset", "dens")
        return cls(**{**ESCN_PRESETS[name], "dens_heads": dens_heads, **overrides})

    # the backbone contract (dens.models.Backbone)
    #: forces come from the force head (eSCN has no gradient forces)
    direct_forces = True
    #: the heads read per-atom sphere samples, no edges: there is nothing to split
    splits_heads = False
    #: no stress head
    stress_head = None

    @property
    def has_dens_heads(self) -> bool:
        """Whether the model has the DeNS noise head (and, unless built with ``encode_forces=False``, the
        force encoder)."""
        return self.denoising_pos_block is not None

    def compile_regions(self) -> list[nn.Module]:
        """The layers and the two vector heads (compiled one at a time)."""
        heads = [m for m in (self.force_block, self.denoising_pos_block) if m is not None]
        return [*self.layers, *heads]

    def forward(
        self,
        atomic_numbers: Tensor,
        pos: Tensor,
        batch: Tensor,
        edge_index: Tensor,
        edge_shift: Tensor,
        num_graphs: int,
        extra_embedding: Tensor | None = None,
        edge_frames: Tensor | None = None,
        noise_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The dens backbone interface (as :class:`~dens.models.EquiformerV2`).

        The edge vectors are ``pos[j] + edge_shift - pos[i]``. Returns ``energy [B]``,
        ``node_energy [N]``, ``forces [N, 3]`` (the noise prediction on ``noise_mask`` atoms),
        ``force_head`` and, for DeNS models, ``noise_head``; see :meth:`forward_edges` for the rest.
        """
        src, dst = edge_index
        edge_vec = pos[src] + edge_shift.to(pos.dtype) - pos[dst]
        return self.forward_edges(
            atomic_numbers, edge_index, edge_vec, batch, num_graphs, extra_embedding, edge_frames, noise_mask
        )

    def forward_edges(
        self,
        atomic_numbers: Tensor,
        edge_index: Tensor,
        edge_vec: Tensor,
        batch: Tensor,
        num_graphs: int,
        extra_embedding: Tensor | None = None,
        edge_frames: Tensor | None = None,
        noise_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Energy, direct forces and (DeNS) noise predictions: :meth:`node_features`, then :meth:`heads`.

        Parameters
        ----------
        atomic_numbers : Tensor
            ``[N]`` long.
        edge_index : Tensor
            ``[2, E]``: row 0 the source (neighbour) ``j``, row 1 the target (centre) ``i``.
        edge_vec : Tensor
            ``[E, 3]`` ``pos[j] + shift - pos[i]``; its dtype is the compute dtype.
        batch : Tensor
            ``[N]`` structure index of every atom.
        num_graphs : int
            Number of structures ``B``.
        extra_embedding : Tensor, optional
            ``[N, (lmax+1)**2, C]`` added to the initial embedding: the DeNS force encoding
            ``self.force_encoder(forces, mask)``. If None and the model has a force encoder, the
            encoding of "no atom" (only the encoder's ``l = 0`` bias) is added, as the official DeNS
            model does in S2EF mode.
        edge_frames : Tensor, optional
            ``[E, 3, 3]`` rotations taking each edge to ``+y``; by default the deterministic
            :func:`~dens.models.so3.edge_frames`. Pass the official frames to reproduce official outputs.
        noise_mask : Tensor, optional
            ``[N]`` bool: atoms whose output ``forces`` are the noise prediction (DeNS).

        Returns
        -------
        dict[str, Tensor]
            ``energy [B]``, ``node_energy [N]`` (before the 0.001 scale and the sum); with
            ``regress_forces`` ``force_head [N, 3]`` and ``forces`` (the force head, or on ``noise_mask``
            atoms the noise head); ``noise_head [N, 3]`` with ``dens_heads``.
        """
        x = self.node_features(atomic_numbers, edge_index, edge_vec, extra_embedding, edge_frames)
        out = self.heads(x, batch, num_graphs)
        if "force_head" in out:
            out["forces"] = out["force_head"]
            if "noise_head" in out and noise_mask is not None:
                out["forces"] = assemble_dens_forces(out["force_head"], out["noise_head"], noise_mask)
        return out

    def node_features(
        self,
        atomic_numbers: Tensor,
        edge_index: Tensor,
        edge_vec: Tensor,
        extra_embedding: Tensor | None = None,
        edge_frames: Tensor | None = None,
    ) -> Tensor:
        """Node features ``[N, (lmax+1)**2, C]`` after the last layer (steps 1 and 2); arguments as
        :meth:`forward`."""
        num_atoms = atomic_numbers.shape[0]
        distance = edge_vec.norm(dim=-1)
        frames = edge_frames if edge_frames is not None else deterministic_edge_frames(edge_vec)
        frames = frames.to(edge_vec.dtype)
        if self.detach_frames:
            frames = frames.detach()
        rotation = EdgeRotation(frames, self.layout)

        # 1. Embedding: l = 0 from the atomic number, plus the (DeNS) extra embedding.
        x0 = self.sphere_embedding(atomic_numbers).to(edge_vec.dtype)
        rest = x0.new_zeros(num_atoms, self.layout.num_coefficients - 1, self.sphere_channels)
        x = torch.cat([x0[:, None], rest], dim=1)
        extra_embedding = dens_embedding(self.force_encoder, extra_embedding, num_atoms, x.dtype, x.device)
        if extra_embedding is not None:
            x = x + extra_embedding.to(x.dtype)

        # 2. Layers: the first replaces x, the others are residual.
        for i, layer in enumerate(self.layers):
            update = layer(x, atomic_numbers, distance, edge_index, rotation)
            x = update if i == 0 else x + update
        return x

    def heads(self, x: Tensor, batch: Tensor, num_graphs: int) -> dict[str, Tensor]:
        """Readout on the sample points (step 3): ``energy``, ``node_energy``, ``force_head`` and
        ``noise_head`` (those the model has)."""
        x_points = torch.einsum("pi,nic->npc", self.sphharm_weights.to(x.dtype), x)
        node_energy = self.energy_block.scalar(x_points)
        out = {"energy": 0.001 * scatter_sum(node_energy, batch, num_graphs), "node_energy": node_energy}
        points = self.sphere_points.to(x.dtype)
        if self.force_block is not None:
            out["force_head"] = self.force_block.vector(x_points, points)
        if self.denoising_pos_block is not None:
            out["noise_head"] = self.denoising_pos_block.vector(x_points, points)
        return out

    def extra_repr(self) -> str:
        return (
            f"num_layers={self.num_layers}, lmax={self.lmax}, mmax={self.mmax}, "
            f"channels={self.sphere_channels}/{self.hidden_channels}/{self.edge_channels}, "
            f"dens_heads={self.has_dens_heads}"
        )
