"""Sphere grids and the activations that act on them (S2, separable S2, gate).

A feature ``x`` of degrees ``0..lmax`` is the band-limited function ``f(r) = sum_i x_i Y_i(r)`` on the
sphere. Sampling ``f`` on a grid, applying a point-wise non-linearity and projecting back is equivariant
up to the grid's quadrature error (exactly so for rotations that map the grid onto itself).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .so3 import CoefficientLayout, spherical_harmonics

__all__ = ["S2Activation", "SeparableS2Activation", "SphereGrid", "set_grid_activation"]


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


def _chunk_rows(x: Tensor, num_points: int) -> int:
    """Rows per chunk of the fused grid activation: about 128k grid values (0.5 MB in float32) per CPU
    thread, so each thread's share of a chunk's grid stays in its core's cache, and 16M on accelerators,
    where launches cost more. Scaling with the threads keeps the parallel regions (each ends in a barrier
    where threads wait for the slowest, badly so when another process holds a core) as few as the cache
    allows."""
    budget = (1 << 17) * torch.get_num_threads() if x.device.type == "cpu" else 1 << 24
    return max(1, budget // num_points)


def _grid_silu_chunks(x: Tensor, to_grid: Tensor, from_grid: Tensor) -> Tensor:
    """``silu(x @ to_grid) @ from_grid`` one cache-sized chunk of rows at a time."""
    chunk = _chunk_rows(x, to_grid.shape[1])
    return _cat([F.silu(part @ to_grid) @ from_grid for part in x.split(chunk)])


def _grid_silu_backward_chunks(x: Tensor, grad: Tensor, to_grid: Tensor, from_grid: Tensor) -> Tensor:
    """The gradient of :func:`_grid_silu_chunks` with respect to ``x``, each chunk's grid recomputed."""
    chunk = _chunk_rows(x, to_grid.shape[1])
    parts = zip(x.split(chunk), grad.split(chunk), strict=True)
    # aten's fused silu_backward: one pass over each chunk's grid instead of six
    return _cat(
        [torch.ops.aten.silu_backward(gp @ from_grid.T, xp @ to_grid) @ to_grid.T for xp, gp in parts]
    )


# ``silu(x @ to_grid) @ from_grid`` for rows ``x`` ``[N, K]``, chunked, the grid never stored: the backward
# recomputes each chunk's grid from the saved input (one extra ``[n, K] x [K, G]`` product), which is faster
# on the CPU than storing it, as the ``[N, G]`` grid is some 11 times larger than ``x`` and every pass over
# it is memory-bound. As operators, torch.compile keeps them whole: traced, the activation would be a graph
# that stores the grid (25 % more peak memory in an EquiformerV2 OC20-2M training step). Under
# create_graph the backward is the differentiable formula, so second derivatives (gradient-force
# training) work.
@torch.library.custom_op("dens::grid_silu", mutates_args=())
def _grid_silu_op(x: Tensor, to_grid: Tensor, from_grid: Tensor) -> Tensor:
    return _grid_silu_chunks(x, to_grid, from_grid)


@_grid_silu_op.register_fake
def _(x: Tensor, to_grid: Tensor, from_grid: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], from_grid.shape[1]))


@torch.library.custom_op("dens::grid_silu_backward", mutates_args=())
def _grid_silu_backward_op(x: Tensor, grad: Tensor, to_grid: Tensor, from_grid: Tensor) -> Tensor:
    return _grid_silu_backward_chunks(x, grad, to_grid, from_grid)


@_grid_silu_backward_op.register_fake
def _(x: Tensor, grad: Tensor, to_grid: Tensor, from_grid: Tensor) -> Tensor:
    return x.new_empty(x.shape)  # row-major, as the products return it, whatever x's strides


def _grid_silu_op_setup(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _grid_silu_op_backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
    x, to_grid, from_grid = ctx.saved_tensors
    if torch.is_grad_enabled():
        return _silu_grid_backward(x, grad, to_grid, from_grid), None, None
    return _grid_silu_backward_op(x, grad, to_grid, from_grid), None, None


_grid_silu_op.register_autograd(_grid_silu_op_backward, setup_context=_grid_silu_op_setup)


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _silu_grid_backward(x: Tensor, grad: Tensor, to_grid: Tensor, from_grid: Tensor) -> Tensor:
    h = x @ to_grid
    sig = torch.sigmoid(h)
    # silu'(h) = sig (1 + h (1 - sig))
    return ((grad @ from_grid.T) * sig * (1 + h * (1 - sig))) @ to_grid.T


_FUSED = True  # set_grid_activation


def set_grid_activation(mode: str) -> None:
    """Compute the SiLU grid activations ``"fused"`` (default: cache-sized chunks, grid recomputed in the
    backward) or ``"plain"`` (one product per stage over all rows, grid stored, as the official models).

    Both give the same numbers; ``"plain"`` is the reference design of ``benchmarks.equiformer_v2
    --design``. The setting is process-wide.
    """
    global _FUSED
    if mode not in ("fused", "plain"):
        raise ValueError(f"grid activation mode must be 'fused' or 'plain', got {mode!r}")
    _FUSED = mode == "fused"


def _grid_silu(x: Tensor, grid: SphereGrid, first_row: int = 0) -> Tensor:
    """``from_grid(silu(to_grid(x)))[:, first_row:]`` for ``x`` ``[N, K, C]`` through one matrix product per
    chunk of ``N * C`` rows (instead of ``N`` small ones). The result is a transposed (non-contiguous) view."""
    num, rows, channels = x.shape
    to_grid = grid.to_grid_mat.to(x.dtype).T
    from_grid = grid.from_grid_mat[first_row:].to(x.dtype).T
    x_rows = x.transpose(1, 2).reshape(num * channels, rows)
    if not _FUSED or x_rows.shape[0] == 0:  # the reference design; an empty input, nothing to fuse
        y = F.silu(x_rows @ to_grid) @ from_grid
        return y.reshape(num, channels, from_grid.shape[1]).transpose(1, 2)
    if to_grid.requires_grad or from_grid.requires_grad:
        raise ValueError("the fused grid activation does not train the grid matrices")
    # autocast does not see into the operator: cast as it would (it casts float32 only)
    if torch.is_autocast_enabled(x.device.type) and x.dtype == torch.float32:
        half = torch.get_autocast_dtype(x.device.type)
        x_rows, to_grid, from_grid = x_rows.to(half), to_grid.to(half), from_grid.to(half)
    y = _grid_silu_op(x_rows, to_grid, from_grid)
    return y.reshape(num, channels, from_grid.shape[1]).transpose(1, 2)


class S2Activation(nn.Module):
    """Point-wise activation of the function on the sphere: ``from_grid(act(to_grid(x)))``.

    With the default SiLU the grid is processed in cache-sized chunks and not stored for the backward
    (recomputed instead): the same function with much less memory traffic.

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

    def forward(self, x: Tensor, first_row: int = 0) -> Tensor:
        """``[..., K, C]`` -> ``[..., K - first_row, C]`` (rows before ``first_row`` are not computed)."""
        if type(self.act) is nn.SiLU and x.dim() == 3:
            return _grid_silu(x, self.grid, first_row)
        y = self.grid.from_grid(self.act(self.grid.to_grid(x)))
        return y[..., first_row:, :] if first_row else y


class SeparableS2Activation(nn.Module):
    """EquiformerV2's separable S2 activation: ``l = 0`` from ``act(scalars)``, ``l > 0`` from the S2
    activation of the tensors (its ``l = 0`` output is not computed).

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
        return torch.cat([self.act(scalars)[:, None], self.s2(tensors, first_row=1)], dim=1)
