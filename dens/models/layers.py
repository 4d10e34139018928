"""Equivariant normalisation, radial functions and regularisation layers.

All layers take irreps features ``[N, (lmax+1)**2, C]`` in the l-major layout of :mod:`dens.models.so3`.
Parameter names and shapes follow the official EquiformerV2 modules so that weights import exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "EquivariantDropout",
    "EquivariantLayerNorm",
    "GaussianSmearing",
    "GraphDropPath",
    "LayerNormSH",
    "RMSNormSH",
    "RadialMLP",
    "SmoothLeakyReLU",
    "get_normalization",
    "smooth_leaky_relu",
]


def smooth_leaky_relu(x: Tensor, negative_slope: float = 0.2) -> Tensor:
    """``((1+a)/2) x + ((1-a)/2) x (2 sigmoid(x) - 1)``: a smooth leaky ReLU with slope ``a`` at -inf
    (the attention activation of Equiformer and EquiformerV2)."""
    a = negative_slope
    return 0.5 * (1 + a) * x + 0.5 * (1 - a) * x * (2 * torch.sigmoid(x) - 1)


class SmoothLeakyReLU(nn.Module):
    """:func:`smooth_leaky_relu` as a module (no parameters)."""

    def __init__(self, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.alpha = negative_slope

    def forward(self, x: Tensor) -> Tensor:
        return smooth_leaky_relu(x, self.alpha)


def _balance_degree_weight(lmax: int, include_l0: bool) -> Tensor:
    """Weight ``1 / ((2l+1) * n_degrees)`` per coefficient, so every degree counts equally."""
    first = 0 if include_l0 else 1
    n_degrees = lmax + 1 - first
    w = [1.0 / ((2 * l + 1) * n_degrees) for l in range(first, lmax + 1) for _ in range(2 * l + 1)]
    return torch.tensor(w)[:, None]


class LayerNormSH(nn.Module):
    """EquiformerV2's ``layer_norm_sh``: a LayerNorm on ``l = 0``; one RMS over all ``l > 0``.

    ``l = 0`` uses ``nn.LayerNorm(C)`` (``norm_l0``). For ``l > 0``,
    ``s = mean_c sum_i w_i x_ic^2`` with ``w_i = 1 / ((2l+1) lmax)`` and
    ``x_l <- x_l (s + eps)^(-1/2) * affine_weight[l-1]``; there is no ``l > 0`` bias.

    Examples
    --------
    >>> norm = LayerNormSH(lmax=2, channels=4)
    >>> norm(torch.randn(3, 9, 4)).shape
    torch.Size([3, 9, 4])
    """

    def __init__(self, lmax: int, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.lmax, self.channels, self.eps = lmax, channels, eps
        self.norm_l0 = nn.LayerNorm(channels, eps=eps)
        self.affine_weight = nn.Parameter(torch.ones(lmax, channels))
        self.register_buffer("balance_degree_weight", _balance_degree_weight(lmax, False), persistent=False)
        degrees = [l - 1 for l in range(1, lmax + 1) for _ in range(2 * l + 1)]
        self.register_buffer("expand_index", torch.tensor(degrees, dtype=torch.long), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        out_l0 = self.norm_l0(x[:, 0])[:, None]
        if self.lmax == 0:
            return out_l0
        rest = x[:, 1:]
        s = torch.einsum("nic,ia->nac", rest.pow(2), self.balance_degree_weight.to(x.dtype))
        s = s.mean(dim=2, keepdim=True)
        weight = self.affine_weight.index_select(0, self.expand_index)[None]
        return torch.cat([out_l0, rest * (s + self.eps).rsqrt() * weight], dim=1)


class RMSNormSH(nn.Module):
    """EquiformerV2's ``rms_norm_sh``: one balanced RMS over all degrees, per-degree affine weights.

    With ``centering``, the ``l = 0`` channels are centred first and a bias is added to ``l = 0``.
    """

    def __init__(self, lmax: int, channels: int, eps: float = 1e-5, centering: bool = True) -> None:
        super().__init__()
        self.lmax, self.channels, self.eps, self.centering = lmax, channels, eps, centering
        self.affine_weight = nn.Parameter(torch.ones(lmax + 1, channels))
        self.affine_bias = nn.Parameter(torch.zeros(channels)) if centering else None
        self.register_buffer("balance_degree_weight", _balance_degree_weight(lmax, True), persistent=False)
        degrees = [l for l in range(lmax + 1) for _ in range(2 * l + 1)]
        self.register_buffer("expand_index", torch.tensor(degrees, dtype=torch.long), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.centering:
            x0 = x[:, :1]
            x = torch.cat([x0 - x0.mean(dim=2, keepdim=True), x[:, 1:]], dim=1)
        s = torch.einsum("nic,ia->nac", x.pow(2), self.balance_degree_weight.to(x.dtype))
        s = s.mean(dim=2, keepdim=True)
        weight = self.affine_weight.index_select(0, self.expand_index)[None]
        out = x * (s + self.eps).rsqrt() * weight
        if self.affine_bias is not None:
            out = torch.cat([out[:, :1] + self.affine_bias, out[:, 1:]], dim=1)
        return out


class EquivariantLayerNorm(nn.Module):
    """Per-degree equivariant layer norm (EquiformerV2's ``layer_norm``).

    ``l = 0`` is centred; every degree is divided by its RMS over orders and channels
    ('component': mean over the ``2l+1`` orders, 'norm': sum) and scaled per channel.
    """

    def __init__(self, lmax: int, channels: int, eps: float = 1e-5, normalization: str = "component") -> None:
        super().__init__()
        if normalization not in ("component", "norm"):
            raise ValueError(f"normalization must be 'component' or 'norm', got {normalization!r}")
        self.lmax, self.channels, self.eps, self.normalization = lmax, channels, eps, normalization
        self.affine_weight = nn.Parameter(torch.ones(lmax + 1, channels))
        self.affine_bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        out = []
        for l in range(self.lmax + 1):
            feature = x[:, l * l : (l + 1) ** 2]
            if l == 0:
                feature = feature - feature.mean(dim=2, keepdim=True)
            sq = feature.pow(2)
            s = sq.sum(dim=1, keepdim=True) if self.normalization == "norm" else sq.mean(dim=1, keepdim=True)
            s = s.mean(dim=2, keepdim=True)
            feature = feature * (s + self.eps).rsqrt() * self.affine_weight[l]
            if l == 0:
                feature = feature + self.affine_bias
            out.append(feature)
        return torch.cat(out, dim=1)


def get_normalization(norm_type: str, lmax: int, channels: int) -> nn.Module:
    """The norm named by an EquiformerV2 config: 'layer_norm', 'layer_norm_sh' or 'rms_norm_sh'."""
    if norm_type == "layer_norm":
        return EquivariantLayerNorm(lmax, channels)
    if norm_type == "layer_norm_sh":
        return LayerNormSH(lmax, channels)
    if norm_type == "rms_norm_sh":
        return RMSNormSH(lmax, channels)
    raise ValueError(f"unknown norm_type {norm_type!r}: use 'layer_norm', 'layer_norm_sh' or 'rms_norm_sh'")


class GaussianSmearing(nn.Module):
    """Gaussian radial basis: ``exp(-((d - o_k) / (2 width))^2 / 2)`` with ``o_k`` evenly spaced.

    Parameters
    ----------
    start, stop : float
        Range of the centres (``stop`` is the cutoff).
    num_gaussians : int
        Number of centres (600 over 12 Å in the official models).
    basis_width_scalar : float
        Width in units of the centre spacing (2.0 officially).

    Examples
    --------
    >>> GaussianSmearing(0.0, 12.0, 600)(torch.tensor([1.0, 2.5])).shape
    torch.Size([2, 600])
    """

    def __init__(
        self,
        start: float = 0.0,
        stop: float = 12.0,
        num_gaussians: int = 600,
        basis_width_scalar: float = 2.0,
    ) -> None:
        super().__init__()
        offset = torch.linspace(start, stop, num_gaussians)
        self.coeff = -0.5 / (basis_width_scalar * (offset[1] - offset[0])).item() ** 2
        self.register_buffer("offset", offset)

    def forward(self, dist: Tensor) -> Tensor:
        return torch.exp(self.coeff * (dist[..., None] - self.offset.to(dist.dtype)) ** 2)


class RadialMLP(nn.Module):
    """Radial MLP ``Linear -> LayerNorm -> SiLU -> ... -> Linear`` over ``channels_list``.

    State-dict keys are ``net.{0,1,3,4,6}`` for three layers, as the official ``RadialFunction``.

    Examples
    --------
    >>> RadialMLP([16, 8, 8, 4])(torch.randn(5, 16)).shape
    torch.Size([5, 4])
    """

    def __init__(self, channels_list: list[int]) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        for i in range(len(channels_list) - 1):
            if i > 0:
                modules += [nn.LayerNorm(channels_list[i]), nn.SiLU()]
            modules.append(nn.Linear(channels_list[i], channels_list[i + 1]))
        self.net = nn.Sequential(*modules)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class EquivariantDropout(nn.Module):
    """Dropout of whole channels: one Bernoulli mask per (node or edge, channel), shared by all orders.

    Dropping a channel of every coefficient together keeps the layer equivariant.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * mask / (1 - self.p)


class GraphDropPath(nn.Module):
    """Stochastic depth per structure: a residual branch is dropped for all atoms of a structure.

    Parameters
    ----------
    p : float
        Drop probability; kept branches are scaled by ``1 / (1 - p)``.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        """``x``: ``[N, ...]``; ``batch``: ``[N]`` structure index; ``num_graphs``: number of structures."""
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty(num_graphs, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p) / (1 - self.p)
        return x * keep[batch].reshape((-1,) + (1,) * (x.dim() - 1))
