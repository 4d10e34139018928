"""Equiformer (Liao & Smidt, ICLR 2023) for MD17, with gradient forces and the DeNS additions.

Read it top to bottom against the Equiformer paper and §D of the DeNS paper:

1. **Embeddings.** A linear map of the one-hot atom type gives the ``l = 0`` channels of the node
   features; an *edge-degree embedding* adds, for every atom, a sum over its edges of a depth-wise tensor
   product of a constant vector with the edge's spherical harmonics, weighted by a radial MLP of the
   ExpNormal radial basis. DeNS models add the *force encoding* (Eq. 5) of the corrupted atoms.
2. **Blocks.** ``num_layers`` pre-norm Transformer blocks: ``x += attention(norm_1(x))``, then
   ``x += ffn(norm_2(x))``. The last block widens the features to ``irreps_feature`` (its residual goes
   through a linear shortcut).
3. **Equivariant graph attention** (MLP attention, non-linear messages). The source and target features
   are merged linearly; a depth-wise tensor product with the edge spherical harmonics, weighted per edge
   by a radial MLP, gives the message. Its scalars give the attention logits (SmoothLeakyReLU and a dot
   product per head, softmax over the edges of each target atom); a gate activation and a second
   depth-wise tensor product give the values. The weighted values are summed per target and projected.
4. **Heads.** After a final layer norm, a two-layer MLP on the scalars gives per-atom energies; their sum
   divided by ``sqrt(avg_num_nodes)`` is the energy and the forces are ``-dE/dpos``. DeNS models add a
   noise head: one more equivariant graph-attention block with a single ``1x1e`` output per atom.

Table 5 variants: ``attention=False`` replaces attention by linear messages (one depth-wise tensor product)
summed over neighbours, ``layer_norm=False`` removes every layer norm; with both off the network is
SEGNN-like. ``weight_init='uniform'`` draws the tensor-product weights from a uniform instead of a normal
distribution (§D.2: the variant without attention and layer norm diverges otherwise).

The irreps layers (linear maps, depth-wise tensor products, layer norm, gate, radial profile) are in
:mod:`dens.models.irreps`; this module holds the presets, the attention and Transformer blocks, the
embeddings, the force encoder and the model. Features use e3nn's flat irreps layout ``[N, irreps.dim]`` (each ``mul x l`` block stored as
``[mul, 2l+1]``, e3nn's real spherical-harmonics basis), because the multiplicities differ per degree.
Every tensor-product weight is stored flat in the official order, so official weights import by renaming
(:mod:`dens.models.official.equiformer`). The Clebsch-Gordan coefficients are e3nn's ``wigner_3j``.

Symmetry: the edge spherical harmonics are all labelled parity "e" (as in the official MD17 models), so
the network is equivariant under rotations and translations (SE(3)) but not under reflections: a
molecule and its mirror image get different energies in general (the model is chirality-aware).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from e3nn import o3
from torch import Tensor, nn

from ..ops import scatter_sum, segment_softmax
from .force_encoder import IrrepsForceEncoder
from .gemm_layout import inductor_options
from .heads import assemble_dens_forces, edge_gradient_forces, gradient_forces, reduce_energy
from .interface import dens_embedding, resolve_dens_heads
from .irreps import (
    DepthwiseTensorProduct,
    ExpNormalSmearing,
    Gate,
    IrrepsDropout,
    IrrepsLayerNorm,
    IrrepsLinear,
    RadialProfile,
    is_scalar,
    second_moment_constant,
    sort_even_first,
)
from .layers import GraphDropPath, smooth_leaky_relu

__all__ = [
    "AVG_DEGREE",
    "AVG_NUM_NODES",
    "PRESETS",
    "DepthwiseTensorProduct",
    "Equiformer",
    "EquivariantGraphAttention",
    "IrrepsForceEncoder",
    "IrrepsLayerNorm",
    "IrrepsLinear",
]  # DepthwiseTensorProduct, IrrepsLayerNorm and IrrepsLinear live in dens.models.irreps

# Fixed normalisation constants of the official MD17 models (QM9 statistics at a 5 Å cutoff).
AVG_NUM_NODES = 18.03065905448718
AVG_DEGREE = 15.57930850982666

_L2 = dict(
    irreps_node_embedding="128x0e+64x1e+32x2e",
    irreps_sh="1x0e+1x1e+1x2e",
    irreps_head="32x0e+16x1e+8x2e",
    irreps_mlp_mid="384x0e+192x1e+96x2e",
)
_L3 = dict(
    irreps_node_embedding="128x0e+64x1e+64x2e+32x3e",
    irreps_sh="1x0e+1x1e+1x2e+1x3e",
    irreps_head="32x0e+16x1e+16x2e+8x3e",
    irreps_mlp_mid="384x0e+192x1e+192x2e+96x3e",
)
# Table 4 of the DeNS paper: the official `graph_attention_transformer_nonlinear_exp_l{2,3}_md17` models
# (3.50M / 5.50M parameters) and, with DeNS, `equiformer_dens_N@6_L@{2,3}_...yml` (4.00M / 6.35M).
PRESETS: dict[str, dict[str, Any]] = {
    "md17_l2": dict(_L2, irreps_feature="512x0e"),
    "md17_l3": dict(_L3, irreps_feature="512x0e"),
}
# DeNS configurations: wider final features (x4 in every degree), explicit pre-attention irreps and a
# force encoding of the same degrees as the edge spherical harmonics.
DENS_PRESETS: dict[str, dict[str, Any]] = {
    "md17_l2": dict(
        irreps_feature="512x0e+256x1e+128x2e",
        irreps_pre_attn=_L2["irreps_node_embedding"],
        irreps_force_encoding="1x0e+1x1e+1x2e",
    ),
    "md17_l3": dict(
        irreps_feature="512x0e+256x1e+256x2e+128x3e",
        irreps_pre_attn=_L3["irreps_node_embedding"],
        irreps_force_encoding="1x0e+1x1e+1x2e+1x3e",
    ),
}


class EquivariantGraphAttention(nn.Module):
    """Equivariant graph attention with MLP attention and non-linear messages (official ``GraphAttention``).

    Parameters
    ----------
    irreps_in, irreps_out : str or Irreps
        Node features in and out.
    irreps_sh : str or Irreps
        Edge spherical harmonics.
    fc_neurons : list of int
        Radial MLP widths, starting with the number of radial basis functions.
    irreps_head, num_heads :
        Irreps of one head's value, number of heads. Each head's attention logit is computed from as many
        scalars as the head's value has even scalars.
    irreps_pre_attn : str or Irreps, optional
        Irreps after merging source and target (default ``irreps_in``).
    nonlinear_message : bool
        Gate and a second depth-wise tensor product for the values (the MD17 models); otherwise one
        tensor product gives both the logits' inputs and linear values.
    attention : bool
        False: no attention weights; linear messages (one depth-wise tensor product) summed over the edges
        of each target (Table 5). ``nonlinear_message`` is then ignored.
    rescale_degree : bool
        Multiply the aggregated messages by the in-degree.
    alpha_drop, proj_drop : float
        Dropout on the attention weights and (equivariant) on the output.
    """

    def __init__(
        self,
        *,
        irreps_in: str | o3.Irreps,
        irreps_sh: str | o3.Irreps,
        irreps_out: str | o3.Irreps,
        fc_neurons: list[int],
        irreps_head: str | o3.Irreps,
        num_heads: int,
        irreps_pre_attn: str | o3.Irreps | None = None,
        nonlinear_message: bool = True,
        attention: bool = True,
        rescale_degree: bool = False,
        alpha_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        irreps_in, irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        pre = irreps_in if irreps_pre_attn is None else o3.Irreps(irreps_pre_attn)
        irreps_head = o3.Irreps(irreps_head)
        self.num_heads, self.attention, self.rescale_degree = num_heads, attention, rescale_degree
        self.nonlinear_message = nonlinear_message and attention
        self.merge_src = IrrepsLinear(irreps_in, pre, bias=True)
        self.merge_dst = IrrepsLinear(irreps_in, pre, bias=False)

        heads = sort_even_first(o3.Irreps([(m * num_heads, ir) for m, ir in irreps_head]))[0].simplify()
        mul_alpha = sum(m for m, ir in heads if is_scalar(ir))
        self.alpha_per_head = mul_alpha // num_heads
        # (mul, 2l+1) per block of `heads`; each block's channels are head-major
        self.head_blocks = tuple((mul, ir.dim) for mul, ir in heads)

        if self.nonlinear_message:
            self.message_tp = DepthwiseTensorProduct(pre, irreps_sh, pre)
            self.message_radial = RadialProfile([*fc_neurons, self.message_tp.weight_numel])
            self.message_gate = Gate(pre)
            self.message_linear = IrrepsLinear(
                self.message_tp.irreps_out.simplify(), self.message_gate.irreps_in
            )
            self.alpha_linear = IrrepsLinear(self.message_tp.irreps_out, f"{mul_alpha}x0e")
            self.value_tp = DepthwiseTensorProduct(pre, irreps_sh, heads, internal_weights=True)
            self.value_linear = IrrepsLinear(self.value_tp.irreps_out.simplify(), heads)
        else:
            target = (o3.Irreps(f"{mul_alpha}x0e") + heads).simplify() if attention else heads
            self.message_tp = DepthwiseTensorProduct(pre, irreps_sh, target)
            self.message_radial = RadialProfile([*fc_neurons, self.message_tp.weight_numel])
            self.message_linear = IrrepsLinear(self.message_tp.irreps_out.simplify(), target)
            if attention:
                # The official code splits this output into heads of (alpha + value scalars, ...).
                width = self.alpha_per_head + (heads[0].mul // num_heads if is_scalar(heads[0].ir) else 0)
                alpha_index = [h * width + a for h in range(num_heads) for a in range(self.alpha_per_head)]
                value_index = [
                    h * width + self.alpha_per_head + c
                    for h in range(num_heads)
                    for c in range(width - self.alpha_per_head)
                ]
                value_index += list(range(num_heads * width, target.dim))
                self.register_buffer("alpha_index", torch.tensor(alpha_index), persistent=False)
                self.register_buffer("value_index", torch.tensor(value_index), persistent=False)
        if attention:
            self.alpha_dot = nn.Parameter(torch.empty(1, num_heads, self.alpha_per_head))
            self.leaky_cst = second_moment_constant("smooth_leaky_relu")
        self.alpha_dropout = nn.Dropout(alpha_drop) if attention and alpha_drop > 0 else None
        self.proj = IrrepsLinear(heads, irreps_out)
        self.proj_drop = IrrepsDropout(irreps_out, proj_drop) if proj_drop > 0 else None
        self.reset_parameters()

    def reset_parameters(self, weight_init: str = "normal") -> None:
        for module in self.modules():
            if isinstance(module, IrrepsLinear | DepthwiseTensorProduct):
                module.reset_parameters(weight_init)
            elif isinstance(module, RadialProfile):
                module.reset_parameters()
        self.reset_alpha_dot()

    def reset_alpha_dot(self) -> None:
        if self.attention:
            bound = math.sqrt(6.0 / (self.num_heads + self.alpha_per_head))  # Glorot, as GATv2
            nn.init.uniform_(self.alpha_dot, -bound, bound)

    def forward(
        self, x: Tensor, edge_index: Tensor, sh: Tensor, radial_basis: Tensor, num_nodes: int | None = None
    ) -> Tensor:
        """``x [N, irreps_in.dim]`` -> ``[N, irreps_out.dim]``; edges as in :meth:`Equiformer.forward`."""
        src, dst = edge_index
        num_nodes = x.shape[0] if num_nodes is None else num_nodes
        message = self.merge_src(x)[src] + self.merge_dst(x)[dst]
        alpha = None
        if self.nonlinear_message:
            message = self._message_tp(message, sh, radial_basis)
            alpha = self.alpha_linear(message)
            value = self.message_gate(self.message_linear(message))
            value = self.value_linear(*self.value_tp.unweighted_blocks(value, sh))
        else:
            message = self._message_tp(message, sh, radial_basis)
            message = self.message_linear(message)
            if self.attention:
                alpha, value = message[:, self.alpha_index], message[:, self.value_index]
            else:
                value = message
        if alpha is not None:
            alpha = smooth_leaky_relu(alpha.view(-1, self.num_heads, self.alpha_per_head)) * self.leaky_cst
            logits = (alpha * self.alpha_dot).sum(dim=-1)  # [E, heads]
            weights = segment_softmax(logits, dst, num_nodes)
            if self.alpha_dropout is not None:
                weights = self.alpha_dropout(weights)
            value = self._weight_heads(value, weights)
        out = scatter_sum(value, dst, num_nodes)
        if self.rescale_degree:
            degree = torch.bincount(dst, minlength=num_nodes).to(out.dtype)
            out = out * degree.unsqueeze(-1)
        out = self.proj(out)
        if self.proj_drop is not None:
            out = self.proj_drop(out)
        return out

    def _message_tp(self, message: Tensor, sh: Tensor, radial_basis: Tensor) -> list[Tensor]:
        """The message tensor product's blocks, weighted per edge by the radial MLP (in group order)."""
        weight = self.message_radial(radial_basis, self.message_tp.weight_order)
        return self.message_tp(message, sh, weight, as_blocks=True, grouped_weight=True)

    def _weight_heads(self, value: Tensor, weights: Tensor) -> Tensor:
        """``value [E, heads.dim]`` times each head's attention weight ``weights [E, heads]``.

        Per block by broadcasting: an index per component (and its scatter in backward) costs more.
        """
        n, h = value.shape[0], self.num_heads
        blocks = value.split([mul * dim for mul, dim in self.head_blocks], dim=1)
        parts = [
            (block.reshape(n, h, mul // h, dim) * weights.view(n, h, 1, 1)).reshape(n, mul * dim)
            for block, (mul, dim) in zip(blocks, self.head_blocks, strict=True)
        ]
        return torch.cat(parts, dim=1)


class FeedForward(nn.Module):
    """Linear -> gate -> linear (official ``FeedForwardNetwork``)."""

    def __init__(
        self, irreps_in: o3.Irreps, irreps_mid: o3.Irreps, irreps_out: o3.Irreps, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        self.gate = Gate(irreps_mid)
        self.linear_1 = IrrepsLinear(irreps_in, self.gate.irreps_in)
        self.linear_2 = IrrepsLinear(self.gate.irreps_out, irreps_out)
        self.proj_drop = IrrepsDropout(irreps_out, proj_drop) if proj_drop > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear_2(self.gate(self.linear_1(x)))
        return self.proj_drop(x) if self.proj_drop is not None else x


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x += attention(norm_1(x))``; ``x = shortcut(x) + ffn(norm_2(x))``."""

    def __init__(
        self,
        *,
        irreps_in: o3.Irreps,
        irreps_out: o3.Irreps,
        irreps_sh: o3.Irreps,
        fc_neurons: list[int],
        irreps_head: o3.Irreps,
        num_heads: int,
        irreps_pre_attn: o3.Irreps | None,
        irreps_mlp_mid: o3.Irreps,
        nonlinear_message: bool,
        attention: bool,
        layer_norm: bool,
        rescale_degree: bool,
        alpha_drop: float,
        proj_drop: float,
        drop_path_rate: float,
    ) -> None:
        super().__init__()
        self.norm_1 = IrrepsLayerNorm(irreps_in) if layer_norm else nn.Identity()
        self.attention = EquivariantGraphAttention(
            irreps_in=irreps_in,
            irreps_sh=irreps_sh,
            irreps_out=irreps_in,
            fc_neurons=fc_neurons,
            irreps_head=irreps_head,
            num_heads=num_heads,
            irreps_pre_attn=irreps_pre_attn,
            nonlinear_message=nonlinear_message,
            attention=attention,
            rescale_degree=rescale_degree,
            alpha_drop=alpha_drop,
            proj_drop=proj_drop,
        )
        self.drop_path = GraphDropPath(drop_path_rate) if drop_path_rate > 0 else None
        self.norm_2 = IrrepsLayerNorm(irreps_in) if layer_norm else nn.Identity()
        self.ffn = FeedForward(irreps_in, irreps_mlp_mid, irreps_out, proj_drop)
        self.ffn_shortcut = IrrepsLinear(irreps_in, irreps_out) if irreps_in != irreps_out else None

    def forward(
        self, x: Tensor, edge_index: Tensor, sh: Tensor, radial_basis: Tensor, batch: Tensor, num_graphs: int
    ) -> Tensor:
        y = self.attention(self.norm_1(x), edge_index, sh, radial_basis, x.shape[0])
        if self.drop_path is not None:
            y = self.drop_path(y, batch, num_graphs)
        x = x + y
        y = self.ffn(self.norm_2(x))
        if self.ffn_shortcut is not None:
            x = self.ffn_shortcut(x)
        if self.drop_path is not None:
            y = self.drop_path(y, batch, num_graphs)
        return x + y


class EdgeDegreeEmbedding(nn.Module):
    """``sum_j proj(DTP(c, Y(r_ij), radial(|r_ij|))) / sqrt(avg_degree)`` with a learned constant ``c``."""

    def __init__(
        self, irreps_node: o3.Irreps, irreps_sh: o3.Irreps, fc_neurons: list[int], avg_degree: float
    ) -> None:
        super().__init__()
        self.avg_degree = avg_degree
        self.constant = IrrepsLinear("1x0e", irreps_node)
        self.tp = DepthwiseTensorProduct(irreps_node, irreps_sh, irreps_node)
        self.radial = RadialProfile([*fc_neurons, self.tp.weight_numel])
        self.proj = IrrepsLinear(self.tp.irreps_out.simplify(), irreps_node)

    def forward(self, edge_index: Tensor, sh: Tensor, radial_basis: Tensor, num_nodes: int) -> Tensor:
        constant = self.constant(sh.new_ones(1, 1)).expand(sh.shape[0], -1)
        weight = self.radial(radial_basis, self.tp.weight_order)  # in group order: no per-edge reordering
        edge_features = self.proj(self.tp(constant, sh, weight, as_blocks=True, grouped_weight=True))
        return scatter_sum(edge_features, edge_index[1], num_nodes) / math.sqrt(self.avg_degree)


class Equiformer(nn.Module):
    """Equiformer for energies and gradient forces (MD17), optionally with the DeNS heads.

    Parameters
    ----------
    irreps_node_embedding : str
        Node irreps inside the network (``128x0e+64x1e+32x2e`` for Lmax 2).
    num_layers : int
        Transformer blocks (6).
    irreps_sh : str
        Edge spherical harmonics, all of parity "e" as in the official models (``1x0e+1x1e+1x2e``).
    max_radius, number_of_basis : float, int
        Cutoff in Å of the ExpNormal radial basis and its size (5.0, 32).
    fc_neurons : sequence of int
        Hidden widths of every radial MLP ([64, 64]).
    irreps_feature : str
        Output irreps of the last block (``512x0e``; DeNS: ``512x0e+256x1e+128x2e``).
    irreps_head, num_heads : str, int
        Irreps of one attention head's value and number of heads (``32x0e+16x1e+8x2e``, 4).
    irreps_pre_attn : str, optional
        Irreps after merging source and target in attention (default: the block input).
    irreps_mlp_mid : str
        Hidden irreps of the feed-forward networks (``384x0e+192x1e+96x2e``).
    nonlinear_message : bool
        Non-linear messages (gate and a second tensor product) in attention (True).
    attention : bool
        Table 5 switch. False: linear messages summed over neighbours, no attention weights.
    layer_norm : bool
        Table 5 switch. False: no layer norms (blocks and final norm become identities).
    rescale_degree : bool
        Multiply aggregated messages by the in-degree (False).
    alpha_drop, proj_drop, out_drop, drop_path_rate : float
        Attention-weight dropout, equivariant dropout after attention/FFN and on the final features, and
        graph-wise stochastic depth (all 0 for MD17).
    max_atom_type : int
        Size of the atom-type one-hot (64): atomic numbers must be below it.
    avg_num_nodes, avg_degree : float
        Fixed normalisation of the energy sum (divided by ``sqrt(avg_num_nodes)``) and of the edge-degree
        embedding (by ``sqrt(avg_degree)``).
    dens_heads : bool
        DeNS: build ``force_encoder`` and the noise head (``use_force_encoding``: the deprecated name,
        still accepted).
    encode_forces : bool
        With ``dens_heads``: build the force encoder too (default). False is the official
        ``use_force_encoding=False`` ablation (Table 6, Index 3): the noise head without a force encoder.
    irreps_force_encoding : str
        Spherical-harmonic degrees of the force encoding (``1x0e+1x1e+1x2e``).
    weight_init : {'normal', 'uniform'}
        Tensor-product weights ``N(0, 1/fan_in)`` (official) or ``U(+-1/sqrt(fan_in))`` (§D.2, for the
        variant without attention and layer norm).

    Examples
    --------
    >>> model = Equiformer(irreps_node_embedding="8x0e+4x1e+2x2e", num_layers=1, fc_neurons=[8],
    ...                    irreps_feature="16x0e", irreps_head="4x0e+2x1e+1x2e", num_heads=2,
    ...                    irreps_mlp_mid="8x0e+4x1e+2x2e", number_of_basis=8)
    >>> pos = torch.randn(4, 3)
    >>> edge_index = torch.tensor([[1, 2, 3, 0], [0, 0, 1, 2]])
    >>> out = model(torch.tensor([1, 6, 8, 1]), pos, torch.zeros(4, dtype=torch.long), edge_index,
    ...             torch.zeros(4, 3), num_graphs=1)
    >>> out["energy"].shape, out["forces"].shape
    (torch.Size([1]), torch.Size([4, 3]))
    """

    def __init__(
        self,
        irreps_node_embedding: str = "128x0e+64x1e+32x2e",
        num_layers: int = 6,
        irreps_sh: str = "1x0e+1x1e+1x2e",
        max_radius: float = 5.0,
        number_of_basis: int = 32,
        fc_neurons: tuple[int, ...] | list[int] = (64, 64),
        irreps_feature: str = "512x0e",
        irreps_head: str = "32x0e+16x1e+8x2e",
        num_heads: int = 4,
        irreps_pre_attn: str | None = None,
        irreps_mlp_mid: str = "384x0e+192x1e+96x2e",
        nonlinear_message: bool = True,
        attention: bool = True,
        layer_norm: bool = True,
        rescale_degree: bool = False,
        alpha_drop: float = 0.0,
        proj_drop: float = 0.0,
        out_drop: float = 0.0,
        drop_path_rate: float = 0.0,
        max_atom_type: int = 64,
        avg_num_nodes: float = AVG_NUM_NODES,
        avg_degree: float = AVG_DEGREE,
        dens_heads: bool = False,
        encode_forces: bool = True,
        irreps_force_encoding: str = "1x0e+1x1e+1x2e",
        weight_init: str = "normal",
        use_force_encoding: bool | None = None,
    ) -> None:
        super().__init__()
        dens_heads = resolve_dens_heads(dens_heads, use_force_encoding, "Equiformer")
        node, feature = o3.Irreps(irreps_node_embedding), o3.Irreps(irreps_feature)
        sh = o3.Irreps(irreps_sh)
        if any(mul != 1 or ir.p != 1 for mul, ir in sh):
            raise ValueError(f"irreps_sh must be '1x0e+1x1e+...' (one even irrep per degree), got {sh}")
        self.irreps_node, self.irreps_feature, self.irreps_sh = node, feature, sh
        self.sh_degrees = [ir.l for _, ir in sh]
        self.max_radius, self.max_atom_type, self.avg_num_nodes = max_radius, max_atom_type, avg_num_nodes
        self.weight_init = weight_init
        fc = [number_of_basis, *fc_neurons]
        pre = None if irreps_pre_attn is None else o3.Irreps(irreps_pre_attn)

        self.atom_embedding = IrrepsLinear(f"{max_atom_type}x0e", node)
        self.radial_basis = ExpNormalSmearing(max_radius, number_of_basis)
        self.edge_degree_embedding = EdgeDegreeEmbedding(node, sh, fc, avg_degree)
        self.force_encoder = (
            IrrepsForceEncoder(irreps_force_encoding, node) if dens_heads and encode_forces else None
        )
        self.blocks = nn.ModuleList(
            TransformerBlock(
                irreps_in=node,
                irreps_out=feature if i == num_layers - 1 else node,
                irreps_sh=sh,
                fc_neurons=fc,
                irreps_head=o3.Irreps(irreps_head),
                num_heads=num_heads,
                irreps_pre_attn=pre,
                irreps_mlp_mid=o3.Irreps(irreps_mlp_mid),
                nonlinear_message=nonlinear_message,
                attention=attention,
                layer_norm=layer_norm,
                rescale_degree=rescale_degree,
                alpha_drop=alpha_drop,
                proj_drop=proj_drop,
                drop_path_rate=drop_path_rate,
            )
            for i in range(num_layers)
        )
        self.norm = IrrepsLayerNorm(feature) if layer_norm else nn.Identity()
        self.out_dropout = IrrepsDropout(feature, out_drop) if out_drop > 0 else None
        scalars = o3.Irreps([(m, ir) for m, ir in feature if is_scalar(ir)]).simplify()
        self.energy_head = nn.ModuleDict(
            {"linear_1": IrrepsLinear(feature, scalars), "linear_2": IrrepsLinear(scalars, "1x0e")}
        )
        self.silu_cst = second_moment_constant("silu")
        self.noise_head = None
        if dens_heads:
            self.noise_head = EquivariantGraphAttention(
                irreps_in=feature,
                irreps_sh=sh,
                irreps_out="1x1e",
                fc_neurons=fc,
                irreps_head=o3.Irreps(irreps_head),
                num_heads=num_heads,
                irreps_pre_attn=pre,
                nonlinear_message=nonlinear_message,
                attention=attention,
                rescale_degree=rescale_degree,
                alpha_drop=alpha_drop,
                proj_drop=proj_drop,
            )
        # set by `compile_gradient`: plain functions, so deepcopy and state dicts are unaffected
        self._compiled_gradient: Callable[..., tuple[Tensor, ...]] | None = None
        self._compiled_noise_head: Callable[..., Tensor] | None = None
        self.reset_parameters(weight_init)

    def reset_parameters(self, weight_init: str | None = None) -> None:
        """Re-draw all weights: official init (``'normal'``) or ``'uniform'`` tensor-product weights."""
        weight_init = self.weight_init if weight_init is None else weight_init
        for module in self.modules():
            if isinstance(module, IrrepsLinear | DepthwiseTensorProduct):
                module.reset_parameters(weight_init)
            elif isinstance(module, RadialProfile):
                module.reset_parameters()
            elif isinstance(module, EquivariantGraphAttention):
                module.reset_alpha_dot()
            elif isinstance(module, IrrepsLayerNorm):
                nn.init.ones_(module.affine_weight)
                nn.init.zeros_(module.affine_bias)
        # The official atom embedding is scaled by sqrt(num types): unit-variance embeddings.
        with torch.no_grad():
            self.atom_embedding.weight.mul_(math.sqrt(self.max_atom_type))

    @classmethod
    def from_preset(cls, name: str, dens_heads: bool = False, **overrides: Any) -> Equiformer:
        """A Table 4 configuration: ``'md17_l2'`` or ``'md17_l3'``, ``dens_heads=True`` for the DeNS model.

        ``dens_heads=True`` adds the force encoder and the noise head and widens the final features, as the
        official DeNS configurations do (4,000,577 and 6,354,241 parameters; 3,496,001 and 5,500,865
        without DeNS). Keyword overrides are applied last, e.g. the Table 5 variants
        ``attention=False, layer_norm=False, weight_init='uniform'``.
        """
        if name not in PRESETS:
            raise KeyError(f"unknown Equiformer preset {name!r}; choose from {sorted(PRESETS)}")
        dens_heads = resolve_dens_heads(dens_heads, overrides.pop("dens", None), "from_preset", "dens")
        config = dict(PRESETS[name])
        if dens_heads:
            config.update(DENS_PRESETS[name])
        return cls(**{**config, "dens_heads": dens_heads, **overrides})

    # the backbone contract (dens.models.Backbone)
    #: forces are -dE/dpos
    direct_forces = False
    #: the noise head runs on the edges into the corrupted atoms (``head_edges``); the forces are the
    #: energy's gradient, so there is no force head to split
    splits_heads = True
    #: no stress head
    stress_head = None

    @property
    def cutoff(self) -> float:
        """The cutoff (Å) of the radial basis: ``max_radius``."""
        return self.max_radius

    @property
    def max_num_elements(self) -> int:
        """Size of the atom-type one-hot: ``max_atom_type``."""
        return self.max_atom_type

    @property
    def has_dens_heads(self) -> bool:
        """Whether the model has the DeNS noise head (and, unless built with ``encode_forces=False``, the
        force encoder)."""
        return self.noise_head is not None

    def compile_regions(self) -> list[nn.Module]:
        """The Transformer blocks (compiled one at a time)."""
        return list(self.blocks)

    def compile_gradient(self, **options: Any) -> None:
        """Compile the energy *and its gradient* as one graph, for training steps.

        Training with gradient forces differentiates twice (the loss on ``-dE/dpos`` is differentiated
        for the weights), and a compiled graph cannot be differentiated twice. Here the gradient is taken
        inside the compiled function (``torch.func.grad_and_value`` of :meth:`energy_from_edges` with
        respect to the edge vectors), so the forces are an *output* of the graph and the training backward
        is its single backward. The noise head, whose loss is differentiated once, is compiled on its own
        (a batch without corrupted atoms, whose noise head has no edges, runs it eager: no graph for a
        size-0 input). ``options`` go to ``torch.compile`` over the defaults of
        :func:`~dens.models.gemm_layout.inductor_options` (``dynamic=True``, narrow products transposed).
        Only training-mode calls use the compiled functions; evaluation stays eager (no second
        compilation for ``eval()``).
        """
        options = inductor_options(options)
        self._compiled_gradient = torch.compile(_energy_and_edge_gradient, **options)
        if self.noise_head is not None:
            self._compiled_noise_head = torch.compile(_call_module, **options)

    def energy_from_edges(
        self,
        atomic_numbers: Tensor,
        edge_vec: Tensor,
        edge_index: Tensor,
        batch: Tensor,
        num_graphs: int,
        extra_embedding: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The network from the edge vectors to the energy: everything but the forces and the noise head.

        Returns ``energy [B]``, ``node_energy [N]``, the final node features ``[N, irreps_feature.dim]``
        and the edge spherical harmonics and radial basis (the noise head's inputs).
        """
        num_atoms = atomic_numbers.shape[0]
        sh = o3.spherical_harmonics(self.sh_degrees, edge_vec, normalize=True, normalization="component")
        radial_basis = self.radial_basis(edge_vec.norm(dim=-1))
        one_hot = torch.nn.functional.one_hot(atomic_numbers, self.max_atom_type).to(edge_vec.dtype)
        x = self.atom_embedding(one_hot)
        x = x + self.edge_degree_embedding(edge_index, sh, radial_basis, num_atoms)
        if extra_embedding is not None:
            x = x + extra_embedding
        for block in self.blocks:
            x = block(x, edge_index, sh, radial_basis, batch, num_graphs)
        x = self.norm(x)
        if self.out_dropout is not None:
            x = self.out_dropout(x)
        hidden = torch.nn.functional.silu(self.energy_head["linear_1"](x)) * self.silu_cst
        node_energy = self.energy_head["linear_2"](hidden).squeeze(-1)
        energy = reduce_energy(node_energy, batch, num_graphs, math.sqrt(self.avg_num_nodes))
        return energy, node_energy, x, sh, radial_basis

    def forward(
        self,
        atomic_numbers: Tensor,
        pos: Tensor,
        batch: Tensor,
        edge_index: Tensor,
        edge_shift: Tensor,
        num_graphs: int,
        extra_embedding: Tensor | None = None,
        noise_mask: Tensor | None = None,
        head_edges: tuple[Tensor | None, Tensor | None] | None = None,
    ) -> dict[str, Tensor]:
        """Energy, forces ``-dE/dpos`` and (DeNS models) the noise prediction of a batch of structures.

        Parameters
        ----------
        atomic_numbers : Tensor
            ``[N]`` long, below ``max_atom_type``.
        pos : Tensor
            ``[N, 3]`` positions (Å). Gradients are taken with respect to it (a copy requiring grad is
            used when it does not require grad).
        batch : Tensor
            ``[N]`` structure index per atom.
        edge_index : Tensor
            ``[2, E]``: row 0 the source j (neighbour), row 1 the target i (centre, where messages are
            summed and attention is normalised).
        edge_shift : Tensor
            ``[E, 3]`` periodic shift of the source (zeros for molecules); edge vector
            ``pos[j] + shift - pos[i]``.
        num_graphs : int
            Structures in the batch.
        extra_embedding : Tensor, optional
            ``[N, irreps_node.dim]`` added to the initial node features: the DeNS force encoding
            (``self.force_encoder(forces, mask)``). A DeNS model given none adds the encoder's bias only.
        noise_mask : Tensor, optional
            ``[N]`` bool: atoms whose ``forces`` output is the noise prediction (DeNS).
        head_edges : (Tensor or None, Tensor), optional
            Indices of the edges of the force head and of the noise head
            (:func:`~dens.models.heads.split_head_edges`). The forces are the gradient of the energy, so
            the first is ignored; the noise head runs on the second only, the edges into the atoms where
            the DeNS loss reads it: exact there, zero elsewhere (an atom without edges gets no message).

        Returns
        -------
        dict
            ``energy [B]``, ``node_energy [N]`` (per-atom head output; ``energy`` is their sum per
            structure over ``sqrt(avg_num_nodes)``), ``forces [N, 3]`` and, for DeNS models,
            ``noise_head [N, 3]`` for every atom.
        """
        num_atoms = atomic_numbers.shape[0]
        src, dst = edge_index
        extra_embedding = dens_embedding(
            self.force_encoder, extra_embedding, num_atoms, pos.dtype, pos.device
        )
        args = (edge_index, batch, num_graphs, extra_embedding)
        compiled = self._compiled_gradient is not None and self.training
        with torch.enable_grad():
            if not compiled and not pos.requires_grad:  # the compiled function differentiates itself
                pos = pos.detach().requires_grad_(True)
            edge_vec = pos[src] + edge_shift.to(pos.dtype) - pos[dst]
            if compiled:
                *outputs, edge_grad = self._compiled_gradient(self, atomic_numbers, edge_vec, *args)
                energy, node_energy, x, sh, radial_basis = outputs
                forces = edge_gradient_forces(edge_grad, edge_index, num_atoms)
            else:
                energy, node_energy, x, sh, radial_basis = self.energy_from_edges(
                    atomic_numbers, edge_vec, *args
                )
                forces = gradient_forces(energy, pos, create_graph=self.training)
        out = {"energy": energy, "node_energy": node_energy, "forces": forces}
        if self.noise_head is not None:
            if head_edges is not None and head_edges[1] is not None:
                noise_edges = head_edges[1]
                edge_index, sh = edge_index.index_select(1, noise_edges), sh.index_select(0, noise_edges)
                radial_basis = radial_basis.index_select(0, noise_edges)
            if compiled and self._compiled_noise_head is not None and edge_index.shape[1] > 1:
                out["noise_head"] = self._compiled_noise_head(
                    self.noise_head, x, edge_index, sh, radial_basis, num_atoms
                )
            else:
                out["noise_head"] = self.noise_head(x, edge_index, sh, radial_basis, num_atoms)
            if noise_mask is not None:
                out["forces"] = assemble_dens_forces(forces, out["noise_head"], noise_mask)
        return out


def _energy_and_edge_gradient(
    model: Equiformer,
    atomic_numbers: Tensor,
    edge_vec: Tensor,
    edge_index: Tensor,
    batch: Tensor,
    num_graphs: int,
    extra_embedding: Tensor | None,
) -> tuple[Tensor, ...]:
    """:meth:`Equiformer.energy_from_edges`'s outputs and ``dE/d(edge_vec)`` (compiled by ``compile_gradient``).

    A module-level function taking the model, not a closure: one compiled function serves every instance
    and copies of it (``copy.deepcopy`` keeps functions by reference).
    """

    def total_energy(vectors: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        outputs = model.energy_from_edges(
            atomic_numbers, vectors, edge_index, batch, num_graphs, extra_embedding
        )
        return outputs[0].sum(), outputs

    edge_grad, (_, outputs) = torch.func.grad_and_value(total_energy, has_aux=True)(edge_vec)
    return (*outputs, edge_grad)


def _call_module(module: nn.Module, *args: Any) -> Tensor:
    """``module(*args)``: compiled by ``compile_gradient`` for the noise head (a function taking the module,
    like :func:`_energy_and_edge_gradient`, so copies of the model share it)."""
    return module(*args)
