"""SO(2) convolutions in edge frames (eSCN, Passaro & Zitnick 2023; EquiformerV2, Liao et al. 2024).

A node feature is rotated into the frame of each edge (edge direction on the polar axis ``+y``); there
an SO(3) tensor product with the edge's spherical harmonics reduces to independent linear maps per
order ``m``, and only ``|m| <= mmax`` is kept. In the edge frame features are in the m-major reduced
layout of :class:`~dens.models.so3.CoefficientLayout`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .layers import RadialMLP
from .so3 import CoefficientLayout, wigner_D

__all__ = ["EdgeRotation", "SO2Convolution"]


class EdgeRotation:
    """Rotations of irreps features into and out of a batch of edge frames.

    Parameters
    ----------
    frames : Tensor
        ``[E, 3, 3]`` rotation matrices taking each edge direction to ``+y``
        (:func:`~dens.models.so3.edge_frames`).
    layout : CoefficientLayout
        ``lmax`` and ``mmax`` of the rotated features.
    scale : Tensor, optional
        ``[(L+1)^2]`` factors applied to the rows of every :meth:`rotate_back` output.

    Notes
    -----
    The Wigner matrices are built once per forward pass and shared by every block; their rows are those
    of the m-major reduced layout, so no permutation is needed in the edge frame.

    Examples
    --------
    >>> from dens.models.so3 import edge_frames
    >>> lay = CoefficientLayout(2, 1)
    >>> rot = EdgeRotation(edge_frames(torch.randn(7, 3)), lay)
    >>> rot.rotate(torch.randn(7, 9, 4)).shape
    torch.Size([7, 7, 4])
    """

    def __init__(self, frames: Tensor, layout: CoefficientLayout, scale: Tensor | None = None) -> None:
        self.layout = layout
        self.wigner = wigner_D(frames, layout.lmax, rows=layout.m_major)  # [E, R, (L+1)^2]
        # the inverse rotation with the output rescaling folded in once, not multiplied in every block
        back = self.wigner.transpose(1, 2)
        self.wigner_back = back if scale is None else back * scale.to(back.dtype)[:, None]

    def select(self, edges: Tensor) -> EdgeRotation:
        """The rotations of a subset of the edges (``edges``: indices)."""
        subset = object.__new__(EdgeRotation)
        subset.layout = self.layout
        subset.wigner = self.wigner.index_select(0, edges)
        subset.wigner_back = self.wigner_back.index_select(0, edges)
        return subset

    def rotate(self, x: Tensor) -> Tensor:
        """``[E, (L+1)^2, C]`` global frame -> ``[E, R, C]`` edge frame (m-major, ``|m| <= mmax``)."""
        return torch.bmm(self.wigner, x)

    def rotate_back(self, x: Tensor) -> Tensor:
        """``[E, R', C]`` edge frame (the first ``R'`` m-major rows) -> ``[E, (L+1)^2, C]`` global frame.

        The rows of the output are multiplied by the ``scale`` given at construction (e.g.
        EquiformerV2's degree rescaling).
        """
        return torch.bmm(self.wigner_back[:, :, : x.shape[1]], x)


def degree_rescale(layout: CoefficientLayout) -> Tensor:
    """EquiformerV2's factor ``sqrt((2l+1)/(2 mmax+1))`` for degrees ``l > mmax`` (1 otherwise).

    It compensates for the ``2l+1 - (2 mmax+1)`` orders dropped by the truncation to ``|m| <= mmax``.
    """
    m = layout.mmax
    return torch.tensor([math.sqrt((2 * l + 1) / (2 * m + 1)) if l > m else 1.0 for l in layout.l.tolist()])


class _OrderLinear(nn.Module):
    """The complex-linear map of one order ``m > 0`` (official ``SO2_m_Convolution``)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, 2 * out_features, bias=False)
        self.fc.weight.data.mul_(1 / math.sqrt(2))

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[E, 2, F_in]`` (rows +m, -m) -> ``[E, 2, F_out]``.

        ``out_{+m} = W_r x_{+m} - W_i x_{-m}`` and ``out_{-m} = W_r x_{-m} + W_i x_{+m}`` with Gauss's
        three products (``k1 = W_r (x_{+m} + x_{-m})``, ``k2 = (W_i - W_r) x_{+m}``, ``k3 = (W_r + W_i)
        x_{-m}``; ``out_{+m} = k1 - k3``, ``out_{-m} = k1 + k2``) instead of the official model's one product
        with both rows and both parts, which is four: a quarter fewer multiply-adds in forward and backward,
        where these products are the largest of an EquiformerV2 step. On the CPU the same under bf16
        autocast: on the official EquiformerV2 fixtures its errors against float64 equal the official
        form's (forces 1.3-2.7e-2 of the largest, against 1.5-2.7e-2), and a step is 7.7 % faster. In half
        precision on accelerators (fp16 AMP, tensor cores) it keeps the official form, not measured there.
        """
        half = x.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(x.device.type)
        if half and x.device.type != "cpu":
            # (real, imaginary) parts of the +m and -m rows; unbind, whose backward does not zero-fill. The
            # rows go in as one matrix: inductor computes a linear of a 3-d bf16 input whose rows are not
            # one view as a bmm with the weight copied for every edge (10x slower compiled inference)
            y = self.fc(x.reshape(2 * x.shape[0], x.shape[2]))
            r_plus, i_plus, r_minus, i_minus = y.reshape(x.shape[0], 4, self.fc.out_features // 2).unbind(1)
            return torch.stack([r_plus - i_minus, r_minus + i_plus], dim=1)
        w_r, w_i = self.fc.weight.chunk(2, dim=0)  # [F_out, F_in] views
        x_plus, x_minus = x.unbind(1)  # strided views: the products read them in place
        k1 = F.linear(x_plus + x_minus, w_r)
        k2 = F.linear(x_plus, w_i - w_r)
        k3 = F.linear(x_minus, w_r + w_i)
        return torch.stack([k1 - k3, k1 + k2], dim=1)


class SO2Convolution(nn.Module):
    """SO(2)-equivariant convolution in the edge frame (EquiformerV2's ``SO2_Convolution``).

    Parameters
    ----------
    in_channels, out_channels : int
        Channels per coefficient.
    lmax, mmax : int
        Degrees and orders of the m-major reduced input and output.
    edge_channels_list : list[int], optional
        If given, a radial MLP ``[in, hidden, hidden]`` whose output (one weight per input feature of
        every order, shared by ``+m`` and ``-m``) multiplies the inputs before the linear maps.
    extra_m0_output_channels : int
        Extra invariant outputs of the ``m = 0`` map (attention logits, gates), returned separately.

    Notes
    -----
    For order ``m`` the map is complex-linear in ``x_{+m} + i x_{-m}``: ``out_{+m} = W_r x_{+m} - W_i
    x_{-m}``, ``out_{-m} = W_r x_{-m} + W_i x_{+m}``. It therefore commutes with rotations about the edge
    axis (see :func:`~dens.models.so3.edge_frames`). Parameter names and shapes are the official ones:
    ``fc_m0`` (with bias) for ``m = 0`` and ``so2_m_conv.{m-1}.fc`` (no bias) for ``m > 0``; inputs are
    flattened degree-major, channel-fastest.

    Examples
    --------
    >>> conv = SO2Convolution(8, 4, lmax=3, mmax=2, edge_channels_list=[16, 8, 8], extra_m0_output_channels=5)
    >>> x = torch.randn(10, CoefficientLayout(3, 2).num_reduced, 8)
    >>> out, extra = conv(x, torch.randn(10, 16))
    >>> out.shape, extra.shape
    (torch.Size([10, 14, 4]), torch.Size([10, 5]))
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        lmax: int,
        mmax: int,
        edge_channels_list: list[int] | None = None,
        extra_m0_output_channels: int = 0,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.layout = CoefficientLayout(lmax, mmax)
        self.extra_m0_output_channels = extra_m0_output_channels
        m_size = self.layout.m_size
        self.fc_m0 = nn.Linear(m_size[0] * in_channels, extra_m0_output_channels + m_size[0] * out_channels)
        self.so2_m_conv = nn.ModuleList(_OrderLinear(n * in_channels, n * out_channels) for n in m_size[1:])
        self.rad_func = None
        if edge_channels_list is not None:
            num_rad = sum(m_size) * in_channels
            self.rad_func = RadialMLP([*list(edge_channels_list), num_rad])

    def forward(self, x: Tensor, x_edge: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``x``: ``[E, R, in]`` (m-major) -> (``[E, R, out]``, extra ``[E, extra]`` or None)."""
        num_edges = x.shape[0]
        m_size = self.layout.m_size
        # split, not slices: the backward of a split concatenates, that of a slice zero-fills the input
        blocks = x.split([m_size[0], *(2 * n for n in m_size[1:])], dim=1)
        radial: list[Tensor | None] = [None] * len(m_size)
        if self.rad_func is not None:
            radial = list(self.rad_func(x_edge).split([n * self.in_channels for n in m_size], dim=1))

        x0 = blocks[0].reshape(num_edges, m_size[0] * self.in_channels)
        if radial[0] is not None:
            x0 = x0 * radial[0]
        y0 = self.fc_m0(x0)
        extra = None
        if self.extra_m0_output_channels:
            extra, y0 = y0.split([self.extra_m0_output_channels, m_size[0] * self.out_channels], dim=1)
        outputs = [y0.reshape(num_edges, m_size[0], self.out_channels)]
        for n, xm, rad, conv in zip(m_size[1:], blocks[1:], radial[1:], self.so2_m_conv, strict=True):
            xm = xm.reshape(num_edges, 2, n * self.in_channels)
            if rad is not None:
                xm = xm * rad[:, None]
            outputs.append(conv(xm).reshape(num_edges, 2 * n, self.out_channels))
        return torch.cat(outputs, dim=1), extra
