"""EquiformerV2 (Liao, Wood, Das, Smidt; ICLR 2024) as the DeNS paper trains it on OC20 and OC22.

Read it top to bottom against the paper: atoms are embedded into the ``l = 0`` channels, an
edge-degree embedding spreads radial information to all degrees, ``num_layers`` pre-norm Transformer
blocks alternate SO(2)-equivariant graph attention and a grid-MLP feed-forward network, and after a
final norm three heads read the node features: energy (an FFN, summed over atoms), direct forces (an
attention block with one output channel read at ``l = 1``) and, for DeNS, the noise (a second such
block). The DeNS force encoding enters as an extra initial node embedding (``extra_embedding``).

Parameter names and shapes are the official ones (``atomicarchitects/DeNS``), so official weights
import exactly (:mod:`dens.models.official.equiformer_v2`); buffers (grids, index maps) are computed, not stored.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..ops import scatter_sum, segment_softmax
from .force_encoder import ForceEncoder
from .heads import assemble_dens_forces, gradient_forces, reduce_energy
from .interface import dens_embedding, resolve_dens_heads
from .layers import (
    EquivariantDropout,
    GaussianSmearing,
    GraphDropPath,
    RadialMLP,
    SmoothLeakyReLU,
    get_normalization,
)
from .s2 import SeparableS2Activation, SphereGrid
from .so2 import EdgeRotation, SO2Convolution, degree_rescale
from .so3 import CoefficientLayout, SO3Linear, precompute
from .so3 import edge_frames as default_edge_frames
from .stress import EquivariantRank2Head, FairchemRank2Head

__all__ = ["PRESETS", "EquiformerV2"]

#: Average number of neighbours of OC20 S2EF-2M (the official EquiformerV2 normaliser of summed messages).
AVG_DEGREE = 23.395238876342773


# Paper configurations (Tables 7 and 8; `../shared/OFFICIAL_SETTINGS.md` for what the paper leaves out).
PRESETS: dict[str, dict[str, Any]] = {
    # Table 7, left: OC20 S2EF-2M, 83M (89M with DeNS)
    "oc20_2m": dict(num_layers=12, lmax=6, mmax=2, drop_path_rate=0.05),
    # Table 7, right: OC20 S2EF-All+MD, 153M (160M with DeNS)
    "oc20_all_md": dict(num_layers=20, lmax=6, mmax=3, drop_path_rate=0.1),
    # Table 2: the 31M EquiformerV2 (official all_md/equiformer_v2_N@8_L@4_M@2_31M)
    "oc20_31m": dict(num_layers=8, lmax=4, mmax=2, drop_path_rate=0.1),
    # Table 8: OC22, 122M (127M with DeNS)
    "oc22": dict(num_layers=18, lmax=6, mmax=2, drop_path_rate=0.1),
}

# fairchem 1.x materials models (OMat24 paper, Barroso-Luque et al. 2024): sizes S/M/L = 8/10/20 layers,
# lmax 4/6/6, mmax 2/4/3, widths 128/64/8/64/16/128/128, 96 elements, 12 Å, 20 neighbours (non-strict),
# fairchem's rank-2 stress head (FAIR-Chem/fairchem configs/omat24/all/eqV2_{31M,86M,153M}.yml and
# configs/omat24/mptrj/eqV2_{31M,86M,153M}_dens_mptrj.yml). Parameter counts: 31,207,434 / 86,589,068 /
# 153,769,868 (the published 31M / 86M / 153M); with DeNS 34,339,083 / 94,033,933 / 160,673,293.
_OMAT24_SIZES = {"s": (8, 4, 2), "m": (10, 6, 4), "l": (20, 6, 3)}
for _size, (_layers, _lmax, _mmax) in _OMAT24_SIZES.items():
    _common = dict(num_layers=_layers, lmax=_lmax, mmax=_mmax, max_num_elements=96, drop_path_rate=0.1,
                   alpha_drop=0.1, stress_head="fairchem")  # fmt: skip
    # configs/omat24/all/eqV2_{31M,86M}.yml: avg_num_nodes 31.17, avg_degree 61.95
    PRESETS[f"omat24_{_size}"] = dict(_common, avg_num_nodes=31.17, avg_degree=61.95)
    # configs/omat24/mptrj/eqV2_{31M,86M,153M}_dens_mptrj.yml: MPtrj statistics and no stress training on DeNS
    # batches (use_denoising False).
    PRESETS[f"mptrj_dens_{_size}"] = dict(
        _common, avg_num_nodes=31.16592360068011, avg_degree=61.94676351484548, stress_use_denoising=False
    )


def _atom_edge_embedding(num_elements: int, channels: int) -> nn.Embedding:
    emb = nn.Embedding(num_elements, channels)
    nn.init.uniform_(emb.weight, -0.001, 0.001)
    return emb


class EdgeDegreeEmbedding(nn.Module):
    """Radial MLP -> ``m = 0`` coefficients in each edge frame -> rotated back and summed per target.

    The sum is divided by a fixed average degree (``avg_degree``), as in the official model.
    """

    def __init__(
        self,
        channels: int,
        lmax: int,
        mmax: int,
        edge_channels_list: list[int],
        num_elements: int,
        avg_degree: float,
    ) -> None:
        super().__init__()
        self.channels, self.lmax, self.avg_degree = channels, lmax, avg_degree
        self.source_embedding = _atom_edge_embedding(num_elements, edge_channels_list[-1])
        self.target_embedding = _atom_edge_embedding(num_elements, edge_channels_list[-1])
        self.rad_func = RadialMLP(
            [
                edge_channels_list[0] + 2 * edge_channels_list[-1],
                *edge_channels_list[1:],
                (lmax + 1) * channels,
            ]
        )

    def forward(
        self, atomic_numbers: Tensor, rbf: Tensor, edge_index: Tensor, rotation: EdgeRotation
    ) -> Tensor:
        src, dst = edge_index
        x_edge = torch.cat(
            [rbf, self.source_embedding(atomic_numbers[src]), self.target_embedding(atomic_numbers[dst])],
            dim=1,
        )
        m0 = self.rad_func(x_edge).reshape(-1, self.lmax + 1, self.channels)  # the m = 0 rows (m-major)
        out = rotation.rotate_back(m0)
        return scatter_sum(out, dst, atomic_numbers.shape[0]) / self.avg_degree


class SO2GraphAttention(nn.Module):
    """SO(2)-equivariant graph attention with attention re-normalisation and separable S2 activation.

    For each edge ``j -> i``: the concatenated source and target features are rotated into the edge
    frame, an SO(2) convolution with radial weights gives the value hidden features plus invariant
    attention features and gates, a separable S2 activation and a second SO(2) convolution give
    ``num_heads`` value vectors, weighted by a softmax over the incoming edges of ``i``, rotated back,
    summed and projected by an SO(3) linear.
    """

    def __init__(
        self,
        *,
        channels: int,
        hidden_channels: int,
        num_heads: int,
        alpha_channels: int,
        value_channels: int,
        output_channels: int,
        lmax: int,
        mmax: int,
        edge_channels_list: list[int],
        num_elements: int,
        grid_resolution: int,
        alpha_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads, self.alpha_channels, self.value_channels = num_heads, alpha_channels, value_channels
        self.source_embedding = _atom_edge_embedding(num_elements, edge_channels_list[-1])
        self.target_embedding = _atom_edge_embedding(num_elements, edge_channels_list[-1])
        rad_channels = [edge_channels_list[0] + 2 * edge_channels_list[-1], *edge_channels_list[1:]]
        self.so2_conv_1 = SO2Convolution(
            2 * channels,
            hidden_channels,
            lmax,
            mmax,
            edge_channels_list=rad_channels,
            extra_m0_output_channels=num_heads * alpha_channels + hidden_channels,
        )
        self.alpha_norm = nn.LayerNorm(alpha_channels)
        self.alpha_act = SmoothLeakyReLU(0.2)
        self.alpha_dot = nn.Parameter(torch.empty(num_heads, alpha_channels))
        nn.init.uniform_(self.alpha_dot, -1 / math.sqrt(alpha_channels), 1 / math.sqrt(alpha_channels))
        self.alpha_dropout = nn.Dropout(alpha_drop) if alpha_drop > 0 else nn.Identity()
        grid = SphereGrid(lmax, mmax, resolution=grid_resolution, rescale=True, m_major=True)
        self.s2_act = SeparableS2Activation(grid)
        self.so2_conv_2 = SO2Convolution(hidden_channels, num_heads * value_channels, lmax, mmax)
        self.proj = SO3Linear(num_heads * value_channels, output_channels, lmax)

    def forward(
        self,
        x: Tensor,
        atomic_numbers: Tensor,
        rbf: Tensor,
        edge_index: Tensor,
        rotation: EdgeRotation,
    ) -> Tensor:
        src, dst = edge_index
        x_edge = torch.cat(
            [rbf, self.source_embedding(atomic_numbers[src]), self.target_embedding(atomic_numbers[dst])],
            dim=1,
        )
        # rotate source and target features apart, then concatenate the smaller edge-frame tensors: a
        # gather's backward (index_add_) is some 10x slower on the non-contiguous gradient slices of a cat
        message = torch.cat(
            [rotation.rotate(x.index_select(0, src)), rotation.rotate(x.index_select(0, dst))], dim=2
        )
        message, extra = self.so2_conv_1(message, x_edge)
        alpha, gates = extra.split(
            [self.num_heads * self.alpha_channels, extra.shape[1] - self.num_heads * self.alpha_channels],
            dim=1,
        )
        message = self.s2_act(gates, message)
        message, _ = self.so2_conv_2(message)

        alpha = self.alpha_act(self.alpha_norm(alpha.reshape(-1, self.num_heads, self.alpha_channels)))
        alpha = torch.einsum("eha,ha->eh", alpha, self.alpha_dot)
        alpha = self.alpha_dropout(segment_softmax(alpha, dst, x.shape[0]))
        num_edges, num_rows = message.shape[:2]
        message = (
            message.reshape(num_edges, num_rows, self.num_heads, self.value_channels)
            * alpha[:, None, :, None]
        )
        message = rotation.rotate_back(
            message.reshape(num_edges, num_rows, self.num_heads * self.value_channels)
        )
        return self.proj(scatter_sum(message, dst, x.shape[0]))


class FeedForward(nn.Module):
    """Grid-MLP feed-forward network with a separable gate: SO(3) linear -> MLP at every point of the
    ``lmax x lmax`` sphere grid (``l = 0`` from a scalar MLP instead) -> SO(3) linear."""

    def __init__(
        self, channels: int, hidden_channels: int, output_channels: int, lmax: int, grid_resolution: int
    ) -> None:
        super().__init__()
        self.so3_linear_1 = SO3Linear(channels, hidden_channels, lmax)
        self.scalar_mlp = nn.Sequential(nn.Linear(channels, hidden_channels), nn.SiLU())
        self.grid = SphereGrid(lmax, lmax, resolution=grid_resolution)
        self.grid_mlp = nn.Sequential(
            nn.Linear(hidden_channels, hidden_channels, bias=False),
            nn.SiLU(),
            nn.Linear(hidden_channels, hidden_channels, bias=False),
            nn.SiLU(),
            nn.Linear(hidden_channels, hidden_channels, bias=False),
        )
        self.so3_linear_2 = SO3Linear(hidden_channels, output_channels, lmax)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.scalar_mlp(x[:, :1])
        y = self.grid.from_grid(self.grid_mlp(self.grid.to_grid(self.so3_linear_1(x))))
        return self.so3_linear_2(torch.cat([gate, y.split([1, y.shape[1] - 1], dim=1)[1]], dim=1))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x += attention(norm_1(x)); x += ffn(norm_2(x))`` with graph-wise drop path."""

    def __init__(
        self,
        *,
        channels: int,
        hidden_channels: int,
        num_heads: int,
        alpha_channels: int,
        value_channels: int,
        ffn_hidden_channels: int,
        lmax: int,
        mmax: int,
        edge_channels_list: list[int],
        num_elements: int,
        grid_resolution: int,
        norm_type: str,
        alpha_drop: float,
        drop_path_rate: float,
        proj_drop: float,
    ) -> None:
        super().__init__()
        self.norm_1 = get_normalization(norm_type, lmax, channels)
        self.ga = SO2GraphAttention(
            channels=channels,
            hidden_channels=hidden_channels,
            num_heads=num_heads,
            alpha_channels=alpha_channels,
            value_channels=value_channels,
            output_channels=channels,
            lmax=lmax,
            mmax=mmax,
            edge_channels_list=edge_channels_list,
            num_elements=num_elements,
            grid_resolution=grid_resolution,
            alpha_drop=alpha_drop,
        )
        self.norm_2 = get_normalization(norm_type, lmax, channels)
        self.ffn = FeedForward(channels, ffn_hidden_channels, channels, lmax, grid_resolution)
        self.drop_path = GraphDropPath(drop_path_rate)
        self.proj_drop = EquivariantDropout(proj_drop)

    def forward(
        self,
        x: Tensor,
        atomic_numbers: Tensor,
        rbf: Tensor,
        edge_index: Tensor,
        rotation: EdgeRotation,
        batch: Tensor,
        num_graphs: int,
    ) -> Tensor:
        h = self.ga(self.norm_1(x), atomic_numbers, rbf, edge_index, rotation)
        x = x + self.proj_drop(self.drop_path(h, batch, num_graphs))
        h = self.ffn(self.norm_2(x))
        return x + self.proj_drop(self.drop_path(h, batch, num_graphs))


class EquiformerV2(nn.Module):
    """EquiformerV2 with energy, direct-force and (optional) DeNS noise heads.

    Parameters
    ----------
    num_layers, lmax, mmax : int
        Transformer blocks, maximum degree, maximum order in edge frames.
    sphere_channels, attn_hidden_channels, num_heads, attn_alpha_channels, attn_value_channels,
    ffn_hidden_channels, edge_channels : int
        Widths (paper: 128, 64, 8, 64, 16, 128, 128).
    norm_type : str
        'layer_norm_sh' (every paper configuration), 'layer_norm' or 'rms_norm_sh'.
    grid_resolution : int
        Sphere-grid resolution of the activations (18).
    max_num_elements : int
        Size of the atom embeddings (90).
    cutoff, num_distance_basis : float, int
        Radial cutoff in Å and number of Gaussians (12 Å, 600).
    alpha_drop, drop_path_rate, proj_drop : float
        Attention dropout, graph-wise drop path, dropout after each block branch.
    avg_num_nodes, avg_degree : float
        Fixed normalisation constants of the energy sum and the edge-degree embedding.
    dens_heads : bool
        DeNS: build the force encoder (Eq. 5) and the noise head (``use_force_encoding``: the deprecated
        name of this switch, still accepted).
    encode_forces : bool
        With ``dens_heads``: build the force encoder too (default). False is the official
        ``use_force_encoding=False`` ablation (Table 6, Index 3): the noise head without a force encoder.
    direct_forces : bool
        Forces from the force head; if False, forces are ``-dE/dpos`` (``pos`` must require grad).
    stress_head : {None, 'equivariant', 'fairchem'}
        A direct rank-2 stress head (:mod:`dens.models.stress`): dens's equivariant one, or fairchem
        1.x's (not equivariant; for the OMat24 / MPtrj checkpoints). Its outputs are
        ``stress_isotropic [B, 1]`` and ``stress_anisotropic [B, 5]`` in normalised units.
    stress_use_denoising : bool
        If False the stress outputs are zero on DeNS batches (fairchem's ``use_denoising: False``).

    Examples
    --------
    >>> model = EquiformerV2(num_layers=1, lmax=2, mmax=1, sphere_channels=8, attn_hidden_channels=8,
    ...                      num_heads=2, attn_alpha_channels=4, attn_value_channels=4, ffn_hidden_channels=8,
    ...                      edge_channels=8, grid_resolution=8)
    >>> pos = torch.randn(4, 3)
    >>> edge_index = torch.tensor([[1, 2, 3, 0], [0, 0, 1, 2]])
    >>> out = model(torch.tensor([1, 6, 8, 1]), pos, torch.zeros(4, dtype=torch.long), edge_index,
    ...             torch.zeros(4, 3), num_graphs=1)
    >>> out["energy"].shape, out["forces"].shape
    (torch.Size([1]), torch.Size([4, 3]))
    """

    def __init__(
        self,
        num_layers: int = 12,
        lmax: int = 6,
        mmax: int = 2,
        sphere_channels: int = 128,
        attn_hidden_channels: int = 64,
        num_heads: int = 8,
        attn_alpha_channels: int = 64,
        attn_value_channels: int = 16,
        ffn_hidden_channels: int = 128,
        edge_channels: int = 128,
        norm_type: str = "layer_norm_sh",
        grid_resolution: int = 18,
        max_num_elements: int = 90,
        cutoff: float = 12.0,
        num_distance_basis: int = 600,
        alpha_drop: float = 0.1,
        drop_path_rate: float = 0.05,
        proj_drop: float = 0.0,
        avg_num_nodes: float = 77.81317,
        avg_degree: float = AVG_DEGREE,
        dens_heads: bool = False,
        encode_forces: bool = True,
        direct_forces: bool = True,
        stress_head: str | None = None,
        stress_use_denoising: bool = True,
        use_force_encoding: bool | None = None,
    ) -> None:
        super().__init__()
        dens_heads = resolve_dens_heads(dens_heads, use_force_encoding, "EquiformerV2")
        self.lmax, self.mmax, self.sphere_channels = lmax, mmax, sphere_channels
        self.cutoff, self.avg_num_nodes, self.direct_forces = cutoff, avg_num_nodes, direct_forces
        self.max_num_elements = max_num_elements
        self.layout = CoefficientLayout(lmax, mmax)
        precompute(lmax)  # so3 constants, before any compiled forward
        self.register_buffer("rescale", degree_rescale(self.layout), persistent=False)

        self.sphere_embedding = nn.Embedding(max_num_elements, sphere_channels)
        self.distance_expansion = GaussianSmearing(0.0, cutoff, num_distance_basis, 2.0)
        edge_channels_list = [num_distance_basis, edge_channels, edge_channels]
        self.edge_degree_embedding = EdgeDegreeEmbedding(
            sphere_channels, lmax, mmax, edge_channels_list, max_num_elements, avg_degree
        )
        shared = dict(
            channels=sphere_channels,
            hidden_channels=attn_hidden_channels,
            num_heads=num_heads,
            alpha_channels=attn_alpha_channels,
            value_channels=attn_value_channels,
            lmax=lmax,
            mmax=mmax,
            edge_channels_list=edge_channels_list,
            num_elements=max_num_elements,
            grid_resolution=grid_resolution,
        )
        self.blocks = nn.ModuleList(
            TransformerBlock(
                **shared,
                ffn_hidden_channels=ffn_hidden_channels,
                norm_type=norm_type,
                alpha_drop=alpha_drop,
                drop_path_rate=drop_path_rate,
                proj_drop=proj_drop,
            )
            for _ in range(num_layers)
        )
        self.norm = get_normalization(norm_type, lmax, sphere_channels)
        self.energy_block = FeedForward(sphere_channels, ffn_hidden_channels, 1, lmax, grid_resolution)

        def attention_head() -> SO2GraphAttention:
            return SO2GraphAttention(**shared, output_channels=1, alpha_drop=0.0)

        self.force_block = attention_head() if direct_forces else None
        self.force_encoder = ForceEncoder(lmax, sphere_channels) if dens_heads and encode_forces else None
        self.denoising_pos_block = attention_head() if dens_heads else None
        if stress_head == "fairchem":
            self.stress_head = FairchemRank2Head(lmax, sphere_channels, stress_use_denoising)
        elif stress_head == "equivariant":
            self.stress_head = EquivariantRank2Head(sphere_channels, use_denoising=stress_use_denoising)
        elif stress_head is None:
            self.stress_head = None
        else:
            raise ValueError(f"stress_head must be None, 'equivariant' or 'fairchem', got {stress_head!r}")
        self._init_weights()

    def _init_weights(self) -> None:
        """Official 'uniform' initialisation: zero biases, unit LayerNorms, uniform radial weights."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RadialMLP):
                for lin in module.modules():
                    if isinstance(lin, nn.Linear):
                        bound = 1 / math.sqrt(lin.in_features)
                        nn.init.uniform_(lin.weight, -bound, bound)

    @staticmethod
    def _head(
        block: SO2GraphAttention,
        x: Tensor,
        atomic_numbers: Tensor,
        rbf: Tensor,
        edge_index: Tensor,
        rotation: EdgeRotation,
        edges: Tensor | None,
    ) -> Tensor:
        """A vector head (one output channel read at ``l = 1``) on all edges or on ``edges`` only."""
        if edges is not None:
            rbf, edge_index, rotation = (
                rbf.index_select(0, edges),
                edge_index.index_select(1, edges),
                rotation.select(edges),
            )
        return block(x, atomic_numbers, rbf, edge_index, rotation)[:, 1:4, 0]

    @classmethod
    def from_preset(cls, name: str, dens_heads: bool = False, **overrides: Any) -> EquiformerV2:
        """A paper configuration ('oc20_2m', 'oc20_all_md', 'oc20_31m', 'oc22') or a fairchem materials
        size ('omat24_s' / '_m' / '_l'; 'mptrj_dens_s' / '_m' / '_l' for the MPtrj DeNS models).

        ``dens_heads=True`` adds the force encoder and the noise head (the DeNS models of Tables 1-3).
        """
        if name not in PRESETS:
            raise KeyError(f"unknown EquiformerV2 preset {name!r}; choose from {sorted(PRESETS)}")
        dens_heads = resolve_dens_heads(dens_heads, overrides.pop("dens", None), "from_preset", "dens")
        return cls(**{**PRESETS[name], "dens_heads": dens_heads, **overrides})

    # the backbone contract (dens.models.Backbone)
    @property
    def splits_heads(self) -> bool:
        """Whether ``forward`` accepts ``head_edges`` (direct forces; see ``ForceField(split_heads=)``)."""
        return self.direct_forces

    @property
    def has_dens_heads(self) -> bool:
        """Whether the model has the DeNS noise head (and, unless built with ``encode_forces=False``, the
        force encoder)."""
        return self.denoising_pos_block is not None

    def compile_regions(self) -> list[nn.Module]:
        """The Transformer blocks and the two attention heads (compiled one at a time)."""
        heads = [m for m in (self.force_block, self.denoising_pos_block) if m is not None]
        return [*self.blocks, *heads]

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
        head_edges: tuple[Tensor | None, Tensor | None] | None = None,
        denoising: bool | Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Energy, forces, (DeNS models) noise and (with a stress head) stress of a batch of structures.

        Parameters
        ----------
        atomic_numbers : Tensor
            ``[N]`` atomic numbers.
        pos : Tensor
            ``[N, 3]`` positions (Å).
        batch : Tensor
            ``[N]`` structure index of each atom.
        edge_index : Tensor
            ``[2, E]``: row 0 the source j (neighbour), row 1 the target i (centre).
        edge_shift : Tensor
            ``[E, 3]`` periodic-image shift ``n @ cell`` of the source; the edge vector is
            ``pos[j] + shift - pos[i]``.
        num_graphs : int
            Number of structures in the batch.
        extra_embedding : Tensor, optional
            ``[N, (lmax+1)**2, C]`` added to the atom embedding before the edge-degree embedding: the
            DeNS force encoding (``self.force_encoder(forces, mask)``). A DeNS model given none adds the
            encoder's bias alone, as the official DeNS model does in S2EF mode.
        edge_frames : Tensor, optional
            ``[E, 3, 3]`` rotations taking each edge to ``+y`` (default: the deterministic frames).
        noise_mask : Tensor, optional
            ``[N]`` bool: atoms whose output ``forces`` are the noise prediction (DeNS partial
            corruption). Both heads are always returned as well.
        head_edges : (Tensor, Tensor), optional
            Indices of the edges on which the force head and the noise head run, None for all (see
            :func:`~dens.models.heads.split_head_edges`). A head is exact on the targets of its edges and
            zero elsewhere: in DeNS training each atom needs only one of the two, so this halves the
            cost of the heads.
        denoising : bool or Tensor, optional
            Whether this is a DeNS batch (or a ``[B]`` bool mask of its DeNS structures), for
            ``stress_use_denoising=False``; default: whether a force encoding (``extra_embedding``) is
            given.

        Returns
        -------
        dict
            ``energy [B]``, ``node_energy [N]``, ``forces [N, 3]`` (the noise prediction on
            ``noise_mask`` atoms), ``force_head [N, 3]`` with direct forces, and ``noise_head [N, 3]``
            for DeNS models; ``stress_isotropic [B, 1]`` and ``stress_anisotropic [B, 5]`` with a stress
            head.
        """
        num_atoms = atomic_numbers.shape[0]
        denoising = extra_embedding is not None if denoising is None else denoising
        src, dst = edge_index
        edge_vec = pos[src] + edge_shift.to(pos.dtype) - pos[dst]
        rbf = self.distance_expansion(edge_vec.norm(dim=-1))
        frames = default_edge_frames(edge_vec) if edge_frames is None else edge_frames
        rotation = EdgeRotation(frames, self.layout, self.rescale)

        x = pos.new_zeros(num_atoms, self.layout.num_coefficients, self.sphere_channels)
        x[:, 0] = self.sphere_embedding(atomic_numbers)
        extra_embedding = dens_embedding(
            self.force_encoder, extra_embedding, num_atoms, pos.dtype, pos.device
        )
        if extra_embedding is not None:
            x = x + extra_embedding
        x = x + self.edge_degree_embedding(atomic_numbers, rbf, edge_index, rotation)
        for block in self.blocks:
            x = block(x, atomic_numbers, rbf, edge_index, rotation, batch, num_graphs)
        x = self.norm(x)

        node_energy = self.energy_block(x)[:, 0, 0]
        out = {
            "node_energy": node_energy,
            "energy": reduce_energy(node_energy, batch, num_graphs, self.avg_num_nodes),
        }
        force_edges, noise_edges = (None, None) if head_edges is None else head_edges
        if self.force_block is not None:
            out["force_head"] = self._head(
                self.force_block, x, atomic_numbers, rbf, edge_index, rotation, force_edges
            )
            out["forces"] = out["force_head"]
        else:
            out["forces"] = gradient_forces(out["energy"], pos, create_graph=self.training)
        if self.denoising_pos_block is not None:
            out["noise_head"] = self._head(
                self.denoising_pos_block, x, atomic_numbers, rbf, edge_index, rotation, noise_edges
            )
            if noise_mask is not None:
                out["forces"] = assemble_dens_forces(out["forces"], out["noise_head"], noise_mask)
        if self.stress_head is not None:
            out.update(self.stress_head(x, edge_vec, edge_index, batch, num_graphs, denoising=denoising))
        return out
