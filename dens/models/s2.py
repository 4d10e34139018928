"""Sphere grids and the activations that act on them (S2, separable S2, gate).

A feature ``x`` of degrees ``0..lmax`` is the band-limited function ``f(r) = sum_i x_i Y_i(r)`` on the
sphere. Sampling ``f`` on a grid, applying a point-wise non-linearity and projecting back is equivariant
up to the grid's quadrature error (exactly so for rotations that map the grid onto itself).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .so3 import CoefficientLayout, spherical_harmonics

__all__ = ["GateActivation", "S2Activation", "SeparableS2Activation", "SphereGrid"]


def _beta_quadrature(res_beta: int) -> Tensor:
    """Weights on ``beta_b = pi (b + 1/2) / res_beta`` exact for polynomials in ``cos beta`` of degree
    below ``res_beta`` (the integral of ``sin beta d beta``); float64."""
    cos_b = torch.cos((torch.arange(res_beta, dtype=torch.float64) + 0.5) / res_beta * math.pi)
    powers = torch.arange(res_beta, dtype=torch.float64)
    vandermonde = cos_b[None, :] ** powers[:, None]
    moments = (1 - (-1) ** (powers + 1)) / (powers + 1)  # int_{-1}^{1} t^k dt
    return torch.linalg.solve(vandermonde, moments)


class SphereGrid(nn.Module):
    """Projections between irreps coefficients and values on a ``res_beta x res_alpha`` sphere grid.

    Parameters
    ----------
    lmax : int
        Maximum degree.
    mmax : int, optional
        Keep only the coefficients with ``|m| <= mmax`` (default: all).
    resolution : int or (int, int), optional
        ``(res_beta, res_alpha)``; an int gives a square grid. Default: ``res_beta = 2 (lmax + 1)``,
        ``res_alpha = 2 mmax + 1`` (``2 (mmax + 1) + 1`` when ``mmax == lmax``), eSCN's choice.
    normalization : {'component', 'integral'}
        Scaling of the sampled functions, as e3nn's ``ToS2Grid`` / ``FromS2Grid``.
        'component' (EquiformerV2) samples ``sum_i x_i Y^norm_i / sqrt(lmax + 1)``.
    rescale : bool
        Multiply the columns of degrees ``l > mmax`` by ``sqrt((2l+1)/(2 mmax+1))`` in both
        directions (EquiformerV2's grids for truncated orders).
    m_major : bool
        Order the coefficient columns m-major (the edge-frame layout) instead of l-major.

    Notes
    -----
    Grid points are ``beta_b = pi (b + 1/2) / res_beta``, ``alpha_a = 2 pi a / res_alpha`` with direction
    ``(sin a sin b, cos b, cos a sin b)``: y is the polar axis. ``from_grid`` uses quadrature weights that
    are exact for band-limited functions, so ``from_grid(to_grid(x)) == x`` when the grid is fine enough.
    The matrices equal e3nn's and the official EquiformerV2 buffers (tested).

    Examples
    --------
    >>> grid = SphereGrid(lmax=3, resolution=(12, 12))
    >>> x = torch.randn(2, 16, 5)
    >>> torch.allclose(grid.from_grid(grid.to_grid(x)), x, atol=1e-5)
    True
    """

    def __init__(
        self,
        lmax: int,
        mmax: int | None = None,
        resolution: int | tuple[int, int] | None = None,
        normalization: str = "component",
        rescale: bool = False,
        m_major: bool = False,
    ) -> None:
        super().__init__()
        layout = CoefficientLayout(lmax, mmax)
        mmax = layout.mmax
        if resolution is None:
            res_beta = 2 * (lmax + 1)
            res_alpha = 2 * (mmax + 1) + 1 if mmax == lmax else 2 * mmax + 1
        elif isinstance(resolution, int):
            res_beta = res_alpha = resolution
        else:
            res_beta, res_alpha = resolution
        self.lmax, self.mmax, self.resolution, self.m_major = lmax, mmax, (res_beta, res_alpha), m_major

        beta = (torch.arange(res_beta, dtype=torch.float64) + 0.5) / res_beta * math.pi
        alpha = torch.arange(res_alpha, dtype=torch.float64) / res_alpha * 2 * math.pi
        b, a = torch.meshgrid(beta, alpha, indexing="ij")
        points = torch.stack([torch.sin(a) * torch.sin(b), torch.cos(b), torch.cos(a) * torch.sin(b)], dim=-1)
        sh = spherical_harmonics(lmax, points.reshape(-1, 3), normalization="integral")  # [G, (L+1)^2]
        degree = layout.l.to(torch.float64)
        if normalization == "component":
            scale = torch.sqrt(4 * math.pi / (2 * degree + 1) / (lmax + 1))
        elif normalization == "integral":
            scale = torch.ones_like(degree)
        else:
            raise ValueError(f"normalization must be 'component' or 'integral', got {normalization!r}")
        weights = (_beta_quadrature(res_beta) * 2 * math.pi / res_alpha).repeat_interleave(res_alpha)
        to_grid = sh * scale
        from_grid = sh / scale * weights[:, None]
        if rescale and mmax < lmax:
            factor = torch.where(degree > mmax, torch.sqrt((2 * degree + 1) / (2 * mmax + 1)), 1.0)
            to_grid, from_grid = to_grid * factor, from_grid * factor
        columns = layout.m_major if m_major else layout.reduced
        self.register_buffer(
            "to_grid_mat", to_grid[:, columns].to(torch.get_default_dtype()).contiguous(), persistent=False
        )
        self.register_buffer(
            "from_grid_mat",
            from_grid[:, columns].T.to(torch.get_default_dtype()).contiguous(),
            persistent=False,
        )

    def load_official(self, to_grid: Tensor, from_grid: Tensor, atol: float = 1e-5) -> None:
        """Adopt an official checkpoint's grid buffers (``[res_beta, res_alpha, n]``, l-major columns).

        The official models computed their grids in float32 through e3nn; using those exact numbers
        removes a ~5e-7 relative difference from parity checks. They must agree with this grid to
        ``atol``, which catches a mismatched ``lmax``, ``mmax`` or resolution.
        """
        to_grid = to_grid.reshape(-1, to_grid.shape[-1])
        from_grid = from_grid.reshape(-1, from_grid.shape[-1]).T
        if self.m_major:
            layout = CoefficientLayout(self.lmax, self.mmax)
            position = {int(i): k for k, i in enumerate(layout.reduced)}
            perm = torch.tensor([position[int(i)] for i in layout.m_major])
            to_grid, from_grid = to_grid[:, perm], from_grid[perm]
        for name, new in (("to_grid_mat", to_grid), ("from_grid_mat", from_grid)):
            old = getattr(self, name)
            if new.shape != old.shape or not torch.allclose(new.to(old), old, atol=atol):
                raise ValueError(
                    f"official {name} {tuple(new.shape)} does not match this sphere grid "
                    f"(lmax {self.lmax}, mmax {self.mmax}, resolution {self.resolution})"
                )
            setattr(self, name, new.to(old).clone())

    @property
    def num_points(self) -> int:
        return self.resolution[0] * self.resolution[1]

    def to_grid(self, x: Tensor) -> Tensor:
        """``[N, num_coefficients, C]`` -> ``[N, res_beta * res_alpha, C]`` (beta slowest)."""
        return torch.matmul(self.to_grid_mat.to(x.dtype), x)

    def from_grid(self, grid: Tensor) -> Tensor:
        """``[N, res_beta * res_alpha, C]`` -> ``[N, num_coefficients, C]``."""
        return torch.matmul(self.from_grid_mat.to(grid.dtype), grid)

    def extra_repr(self) -> str:
        return f"lmax={self.lmax}, mmax={self.mmax}, resolution={self.resolution}"


class S2Activation(nn.Module):
    """Point-wise activation of the function on the sphere: ``from_grid(act(to_grid(x)))``.

    Examples
    --------
    >>> act = S2Activation(SphereGrid(2, resolution=12))
    >>> act(torch.randn(3, 9, 4)).shape
    torch.Size([3, 9, 4])
    """

    def __init__(self, grid: SphereGrid, activation: nn.Module | None = None) -> None:
        super().__init__()
        self.grid = grid
        self.act = activation if activation is not None else nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.grid.from_grid(self.act(self.grid.to_grid(x)))


class SeparableS2Activation(nn.Module):
    """EquiformerV2's separable S2 activation: ``l = 0`` from ``act(scalars)``, ``l > 0`` from the S2
    activation of the tensors (its ``l = 0`` output is discarded).

    Parameters
    ----------
    grid : SphereGrid
        Grid matching the layout of the tensors (its first column must be ``l = 0``).
    """

    def __init__(self, grid: SphereGrid, activation: nn.Module | None = None) -> None:
        super().__init__()
        self.act = activation if activation is not None else nn.SiLU()
        self.s2 = S2Activation(grid, self.act)

    def forward(self, scalars: Tensor, tensors: Tensor) -> Tensor:
        """``scalars``: ``[N, C]``; ``tensors``: ``[N, num_coefficients, C]``."""
        y = self.s2(tensors)
        return torch.cat([self.act(scalars)[:, None], y.split([1, y.shape[1] - 1], dim=1)[1]], dim=1)


class GateActivation(nn.Module):
    """Gate activation: ``act`` on ``l = 0``; each degree ``l > 0`` scaled by a sigmoid gate per channel.

    Parameters
    ----------
    lmax : int
        Maximum degree (the layout is l-major, ``(lmax+1)**2`` rows, or the l-major ``|m| <= mmax`` set).
    mmax : int, optional
        If given, the tensors hold only ``|m| <= mmax`` (l-major reduced layout).
    channels : int
        Channels per coefficient; ``gates`` has ``lmax * channels`` entries.
    """

    def __init__(self, lmax: int, channels: int, mmax: int | None = None) -> None:
        super().__init__()
        layout = CoefficientLayout(lmax, mmax)
        self.lmax, self.channels = lmax, channels
        degree = layout.l[layout.reduced][1:] - 1  # gate row for every l > 0 coefficient
        self.register_buffer("expand_index", degree, persistent=False)
        self.act = nn.SiLU()

    def forward(self, gates: Tensor, tensors: Tensor) -> Tensor:
        """``gates``: ``[N, lmax * C]``; ``tensors``: ``[N, R, C]``."""
        g = torch.sigmoid(gates).reshape(-1, self.lmax, self.channels).index_select(1, self.expand_index)
        return torch.cat([self.act(tensors[:, :1]), tensors[:, 1:] * g], dim=1)
