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

    def __init__(self, frames: Tensor, layout: CoefficientLayout) -> None:
        self.layout = layout
        self.wigner = wigner_D(frames, layout.lmax, rows=layout.m_major)  # [E, R, (L+1)^2]

    def rotate(self, x: Tensor) -> Tensor:
        """``[E, (L+1)^2, C]`` global frame -> ``[E, R, C]`` edge frame (m-major, ``|m| <= mmax``)."""
        return torch.bmm(self.wigner, x)

    def rotate_back(self, x: Tensor, scale: Tensor | None = None) -> Tensor:
        """``[E, R', C]`` edge frame (the first ``R'`` m-major rows) -> ``[E, (L+1)^2, C]`` global frame.

        ``scale`` (``[(L+1)^2]``) multiplies the output rows, e.g. EquiformerV2's degree rescaling.
        """
        wigner = self.wigner[:, : x.shape[1]]
        out = torch.bmm(wigner.transpose(1, 2), x)
        return out if scale is None else out * scale[:, None]


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
        """``x``: ``[E, 2, F_in]`` (rows +m, -m) -> ``[E, 2, F_out]``."""
        y = self.fc(x)
        y_r, y_i = y.chunk(2, dim=-1)
        plus = y_r[:, 0] - y_i[:, 1]
        minus = y_r[:, 1] + y_i[:, 0]
        return torch.stack([plus, minus], dim=1)


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
        radial = self.rad_func(x_edge) if self.rad_func is not None else None

        x0 = x[:, : m_size[0]].reshape(num_edges, m_size[0] * self.in_channels)
        if radial is not None:
            x0 = x0 * radial[:, : x0.shape[1]]
        y0 = self.fc_m0(x0)
        extra = y0[:, : self.extra_m0_output_channels] if self.extra_m0_output_channels else None
        outputs = [y0[:, self.extra_m0_output_channels :].reshape(num_edges, m_size[0], self.out_channels)]

        row, rad_offset = m_size[0], x0.shape[1]
        for n, conv in zip(m_size[1:], self.so2_m_conv, strict=True):
            xm = x[:, row : row + 2 * n].reshape(num_edges, 2, n * self.in_channels)
            if radial is not None:
                xm = xm * radial[:, None, rad_offset : rad_offset + n * self.in_channels]
            outputs.append(conv(xm).reshape(num_edges, 2 * n, self.out_channels))
            row, rad_offset = row + 2 * n, rad_offset + n * self.in_channels
        return torch.cat(outputs, dim=1), extra
