"""SO(3) utilities: coefficient layout, real spherical harmonics, Wigner-D matrices, edge frames.

Conventions (shared by every model in :mod:`dens.models`)
-----------------------------------------------------------
* Irreps features are ``[num_nodes, (lmax+1)**2, channels]`` in the **l-major** layout: degree ``l``
  occupies rows ``l**2 .. l**2 + 2l`` in the order ``m = -l .. +l``.
* The basis is e3nn's real spherical-harmonics basis, whose **polar axis is y**: the ``l = 1`` rows are
  ``(x, y, z)`` for ``m = (-1, 0, +1)``. Positive ``m`` carries ``cos(m alpha)``, negative ``m`` carries
  ``sin(|m| alpha)``, with the azimuth ``alpha = atan2(x, z)`` and no Condon-Shortley phase.
* A rotation ``R`` acts on features by the block-diagonal Wigner matrix ``D(R)``: ``x -> D(R) x``, with
  ``Y(R v) = D(R) Y(v)`` and ``D^1(R) = R``.
* In an edge frame (a rotation taking the edge direction to ``+y``) the SO(2) convolution works on the
  coefficients with ``|m| <= mmax`` in the **m-major** order ``[(l, 0) for l] + [(l, +1) for l >= 1] +
  [(l, -1) for l >= 1] + [(l, +2) for l >= 2] + ...`` (the order of the official EquiformerV2 / eSCN).

These choices make the import of the official EquiformerV2 and eSCN weights exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CoefficientLayout",
    "SO3Linear",
    "edge_frames",
    "edge_frames_official",
    "precompute",
    "spherical_harmonics",
    "wigner_D",
]


# --------------------------------------------------------------------------------------------------
# Coefficient layout
# --------------------------------------------------------------------------------------------------
class CoefficientLayout:
    """Index bookkeeping for the coefficients ``(l, m)`` up to ``lmax`` with ``|m| <= mmax``.

    Parameters
    ----------
    lmax : int
        Maximum degree.
    mmax : int, optional
        Maximum order kept in the edge frame (defaults to ``lmax``).

    Attributes
    ----------
    l, m : Tensor
        Degree and order of every coefficient of the full l-major layout, ``[(lmax+1)**2]``.
    reduced : Tensor
        l-major indices of the coefficients with ``|m| <= mmax``.
    m_major : Tensor
        l-major indices of the reduced coefficients in m-major order (see the module docstring).
    m_size : list[int]
        Number of degrees per order ``m = 0 .. mmax``: ``[lmax+1, lmax, lmax-1, ...]``.

    Examples
    --------
    >>> lay = CoefficientLayout(4, 2)
    >>> lay.num_coefficients, lay.num_reduced
    (25, 19)
    >>> lay.m_major[:6].tolist()  # (l, 0) for l = 0..4, then (1, +1)
    [0, 2, 6, 12, 20, 3]
    """

    def __init__(self, lmax: int, mmax: int | None = None) -> None:
        mmax = lmax if mmax is None else mmax
        if not 0 <= mmax <= lmax:
            raise ValueError(f"need 0 <= mmax <= lmax, got lmax={lmax}, mmax={mmax}")
        self.lmax, self.mmax = lmax, mmax
        ls = [l for l in range(lmax + 1) for _ in range(2 * l + 1)]
        ms = [m for l in range(lmax + 1) for m in range(-l, l + 1)]
        self.l = torch.tensor(ls, dtype=torch.long)
        self.m = torch.tensor(ms, dtype=torch.long)
        self.reduced = torch.tensor([i for i, m in enumerate(ms) if abs(m) <= mmax], dtype=torch.long)
        order = [(l, 0) for l in range(lmax + 1)]
        for m in range(1, mmax + 1):
            order += [(l, m) for l in range(m, lmax + 1)] + [(l, -m) for l in range(m, lmax + 1)]
        self.m_major = torch.tensor([self.index(l, m) for l, m in order], dtype=torch.long)
        self.m_size = [lmax + 1 - m for m in range(mmax + 1)]

    @staticmethod
    def index(l: int, m: int) -> int:
        """l-major index of the coefficient ``(l, m)``."""
        return l * l + l + m

    @property
    def num_coefficients(self) -> int:
        return (self.lmax + 1) ** 2

    @property
    def num_reduced(self) -> int:
        return int(self.reduced.numel())


# --------------------------------------------------------------------------------------------------
# Real spherical harmonics
# --------------------------------------------------------------------------------------------------
_CACHE: dict[tuple[str, int], Any] = {}


def _cached(name: str, lmax: int, compute: Callable[[int], Any]) -> Any:
    """A per-degree constant, computed once. Not ``functools.cache``: torch.compile traces through that
    (into the graph, recomputed every call), while it reads a filled dict as constants."""
    if (name, lmax) not in _CACHE:
        _CACHE[name, lmax] = compute(lmax)
    return _CACHE[name, lmax]


def precompute(lmax: int) -> None:
    """Fill the constants of :func:`spherical_harmonics` and :func:`wigner_D` up to ``lmax`` (models do
    it at construction, so that a compiled forward finds them and does not trace their computation)."""
    _wigner_sampling(lmax)


def _sh_coefficients(lmax: int) -> tuple[dict, dict]:
    return _cached("sh", lmax, _compute_sh_coefficients)


def _compute_sh_coefficients(lmax: int) -> tuple[dict, dict]:
    """Recurrence constants for the normalised associated Legendre part (float64, computed once).

    ``P[l, m](y, r2)`` is ``N_lm * Q_lm`` where ``Q_lm = P_l^m(cos b) / sin^m b`` written as a
    homogeneous polynomial in ``(y, r2)``; ``N_lm = sqrt((2l+1) (2 - delta_m0) (l-m)! / (l+m)!)`` gives
    e3nn's 'component' normalisation (``sum_m Y_lm^2 = 2l+1`` on the unit sphere).
    """

    def norm(l: int, m: int) -> float:
        return math.sqrt((2 * l + 1) * (1 if m == 0 else 2) * math.factorial(l - m) / math.factorial(l + m))

    diag, rec = {}, {}
    for m in range(lmax + 1):
        dfact = math.prod(range(2 * m - 1, 0, -2)) if m > 0 else 1
        diag[m] = norm(m, m) * dfact
        if m + 1 <= lmax:
            rec[(m + 1, m)] = ((2 * m + 1) * norm(m + 1, m) / norm(m, m), 0.0)
        for l in range(m + 2, lmax + 1):
            a = (2 * l - 1) / (l - m) * norm(l, m) / norm(l - 1, m)
            b = (l + m - 1) / (l - m) * norm(l, m) / norm(l - 2, m)
            rec[(l, m)] = (a, b)
    return diag, rec


def spherical_harmonics(
    lmax: int,
    vectors: Tensor,
    normalize: bool = True,
    normalization: str = "component",
) -> Tensor:
    """Real spherical harmonics of degrees ``0..lmax`` in e3nn's basis (polar axis y).

    Parameters
    ----------
    lmax : int
        Maximum degree (any; tested against e3nn up to 10).
    vectors : Tensor
        ``[..., 3]`` input vectors.
    normalize : bool
        If True, evaluate on ``v / |v|``; otherwise return the homogeneous polynomials
        ``|v|**l Y(v / |v|)`` (smooth everywhere, zero at the origin for ``l > 0``).
    normalization : {'component', 'norm', 'integral'}
        'component': ``sum_m Y_lm^2 = 2l+1``; 'norm': ``= 1``; 'integral': ``int Y_lm^2 dOmega = 1``.

    Returns
    -------
    Tensor
        ``[..., (lmax+1)**2]`` in the l-major layout.

    Examples
    --------
    >>> y = spherical_harmonics(1, torch.tensor([0.0, 0.0, 2.0]))
    >>> torch.allclose(y, torch.tensor([1.0, 0.0, 0.0, 3 ** 0.5]))
    True
    """
    if vectors.shape[-1] != 3:
        raise ValueError(f"vectors must have a last dimension of 3, got shape {tuple(vectors.shape)}")
    if normalize:
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
    x, y, z = vectors.unbind(-1)
    r2 = torch.ones_like(x) if normalize else x * x + y * y + z * z
    diag, rec = _sh_coefficients(lmax)

    # Azimuthal parts: c_m + i s_m = (z + i x)^m, so c_m ~ cos(m alpha), s_m ~ sin(m alpha).
    cos_m, sin_m = [torch.ones_like(x)], [torch.zeros_like(x)]
    for _ in range(1, lmax + 1):
        c, s = cos_m[-1], sin_m[-1]
        cos_m.append(c * z - s * x)
        sin_m.append(s * z + c * x)

    # Normalised Legendre parts P[l][m], by the stable recurrence in l for each m.
    legendre: list[list[Tensor | None]] = [[None] * (l + 1) for l in range(lmax + 1)]
    for m in range(lmax + 1):
        legendre[m][m] = torch.full_like(x, diag[m])
        for l in range(m + 1, lmax + 1):
            a, b = rec[(l, m)]
            p = a * y * legendre[l - 1][m]
            if l >= m + 2:
                p = p - b * r2 * legendre[l - 2][m]
            legendre[l][m] = p

    out = []
    for l in range(lmax + 1):
        for m in range(-l, l + 1):
            p = legendre[l][abs(m)]
            out.append(p if m == 0 else p * (cos_m[m] if m > 0 else sin_m[-m]))
    sh = torch.stack(out, dim=-1)
    if normalization == "component":
        return sh
    if normalization == "norm":
        scale = torch.tensor([1 / math.sqrt(2 * l + 1) for l in range(lmax + 1) for _ in range(2 * l + 1)])
    elif normalization == "integral":
        scale = torch.full(((lmax + 1) ** 2,), 1 / math.sqrt(4 * math.pi))
    else:
        raise ValueError(f"normalization must be 'component', 'norm' or 'integral', got {normalization!r}")
    return sh * scale.to(sh)


# --------------------------------------------------------------------------------------------------
# Wigner-D matrices
# --------------------------------------------------------------------------------------------------
def _wigner_sampling(lmax: int) -> tuple[Tensor, Tensor]:
    return _cached("wigner", lmax, _compute_wigner_sampling)


def _compute_wigner_sampling(lmax: int) -> tuple[Tensor, Tensor]:
    """Fixed sample directions X and the block-diagonal pseudo-inverse of Y(X), in float64.

    ``Y(R x) = D(R) Y(x)`` for every direction x, so with K >= 2 lmax + 1 well spread directions,
    ``D^l(R) = Y^l(R X)^T pinv(Y^l(X))^T`` exactly. The directions are a Fibonacci lattice whose
    sampling matrices are well conditioned for every degree (condition numbers are checked in tests).
    """
    k = 2 * (2 * lmax + 1) + 2
    i = torch.arange(k, dtype=torch.float64) + 0.5
    y = 1 - 2 * i / k
    phi = math.pi * (3 - math.sqrt(5)) * i
    rho = torch.sqrt(1 - y * y)
    points = torch.stack([rho * torch.sin(phi), y, rho * torch.cos(phi)], dim=-1)
    sh = spherical_harmonics(lmax, points)  # [K, (lmax+1)^2]
    pinv = torch.zeros((lmax + 1) ** 2, k, dtype=torch.float64)
    for l in range(lmax + 1):
        sl = slice(l * l, (l + 1) ** 2)
        pinv[sl] = torch.linalg.pinv(sh[:, sl])
    return points, pinv


def wigner_D(rotations: Tensor, lmax: int, rows: Tensor | None = None) -> Tensor:
    """Block-diagonal Wigner-D matrices of a batch of rotation matrices.

    Parameters
    ----------
    rotations : Tensor
        ``[..., 3, 3]`` rotation matrices (float32 or float64).
    lmax : int
        Maximum degree.
    rows : Tensor, optional
        l-major coefficient indices of the rows to return (e.g. the m-major reduced set for a rotation
        into the edge frame). All rows by default.

    Returns
    -------
    Tensor
        ``[..., len(rows), (lmax+1)**2]``; entries outside the diagonal blocks are exactly zero.

    Notes
    -----
    ``D`` is computed from the rotated spherical harmonics of a fixed set of directions and a
    precomputed pseudo-inverse: a polynomial in the entries of ``R``. It has no Euler angles, hence no
    gimbal lock, is accurate in float32 near every axis, and its gradient is finite everywhere. There
    is one matrix product for all degrees and no loop over edges.

    Examples
    --------
    >>> R = torch.linalg.matrix_exp(torch.tensor([[0.0, -0.3, 0.2], [0.3, 0.0, -0.1], [-0.2, 0.1, 0.0]]))
    >>> D = wigner_D(R, 2)
    >>> torch.allclose(D[1:4, 1:4], R, atol=1e-6)
    True
    """
    points, pinv = _wigner_sampling(lmax)
    points = points.to(rotations)
    rotated = torch.einsum("...ij,kj->...ki", rotations, points)  # R x_k, [..., K, 3]
    sh = spherical_harmonics(lmax, rotated, normalize=False)  # rotations keep |x_k| = 1
    if rows is not None:
        sh = sh.index_select(-1, rows.to(sh.device))
    layout_l = torch.repeat_interleave(torch.arange(lmax + 1), torch.arange(lmax + 1) * 2 + 1)
    row_l = layout_l if rows is None else layout_l[rows.cpu()]
    block = (row_l[:, None] == layout_l[None, :]).to(device=sh.device, dtype=sh.dtype)
    # D[m, n] = sum_k Y_m(R x_k) pinv[n, k], masked to the diagonal blocks.
    return torch.matmul(sh.transpose(-1, -2), pinv.to(sh).T) * block


# --------------------------------------------------------------------------------------------------
# Edge frames
# --------------------------------------------------------------------------------------------------
# Two fixed, generic helper directions for the deterministic frame (no symmetry with the axes or with
# low-index lattice directions); the second is used inside a cone around the first.
_FRAME_HELPERS = ((0.3826834323650898, 0.6087614290087207, 0.6946583704589973),
                  (0.8432740427115678, -0.5201947253698013, 0.1351189834563811))  # fmt: skip
_FRAME_SWITCH = 0.9


def _frame_from_helper(x_hat: Tensor, u: Tensor) -> Tensor:
    """Rows ``(z', x_hat, -y')`` with ``z' = x_hat x u`` and ``y' = x_hat x z'`` (normalised)."""
    z_hat = torch.nn.functional.normalize(torch.cross(x_hat, u, dim=-1), dim=-1)
    y_hat = torch.nn.functional.normalize(torch.cross(x_hat, z_hat, dim=-1), dim=-1)
    return torch.stack([z_hat, x_hat, -y_hat], dim=-2)


def edge_frames_official(edge_vec: Tensor, helper: Tensor) -> Tensor:
    """Rotation matrices taking each edge direction to ``+y``, built as the official code builds them.

    Parameters
    ----------
    edge_vec : Tensor
        ``[E, 3]`` edge vectors (from the centre to the neighbour).
    helper : Tensor
        ``[E, 3]`` helper vectors ``u``; the official code draws ``u = rand - 0.5`` per edge (a fixture
        stores the ``[0, 1)`` draw as ``edge_rand``: pass ``edge_rand - 0.5``).

    Returns
    -------
    Tensor
        ``[E, 3, 3]`` with rows ``(z', x_hat, -y')`` so that ``R @ x_hat = (0, 1, 0)``.

    Notes
    -----
    ``u`` is swapped for one of two 90-degree-rotated copies when those are more orthogonal to the
    edge, so ``x_hat x u`` never vanishes.
    """
    x_hat = torch.nn.functional.normalize(edge_vec, dim=-1)
    u = torch.nn.functional.normalize(helper.to(edge_vec), dim=-1)
    ux, uy, uz = u.unbind(-1)
    u_b = torch.stack([-uy, ux, uz], dim=-1)
    u_c = torch.stack([ux, -uz, uy], dim=-1)
    dot = lambda a: (a * x_hat).sum(-1, keepdim=True).abs()  # noqa: E731
    u = torch.where(dot(u) > dot(u_b), u_b, u)
    u = torch.where(dot(u) > dot(u_c), u_c, u)
    return _frame_from_helper(x_hat, u)


def edge_frames(edge_vec: Tensor) -> Tensor:
    """Deterministic rotation matrices taking each edge direction to the polar axis ``+y``.

    The frame is built like :func:`edge_frames_official` (rows ``(z', x_hat, -y')``) from a fixed, generic
    helper vector ``u1``, replaced by a second one, ``u2``, for edges within the cone
    ``|u1 . x_hat| > 0.9``. No random numbers; ``x_hat x u`` never comes near zero, so gradients are
    finite for edges along any axis. The frame jumps only on that cone's boundary, which holds no
    axis or low-index lattice direction, so rounding noise never flips the frame of a crystal's
    edges. (The official swap rule ties exactly for every edge along z or x: fine with a random ``u``,
    not with a fixed one.)

    Why the roll about the edge does not matter
    -------------------------------------------
    Any two frames of an edge differ by a rotation ``R_y(g)`` about the polar axis (a "roll"). In the
    e3nn basis ``D(R_y(g))`` rotates each pair ``(l, +m), (l, -m)`` by the angle ``m g``: it multiplies
    the complex number ``x_{+m} + i x_{-m}`` by ``exp(i m g)``. An SO(2) convolution applies, per order
    ``m``, a complex-linear map ``x_{+m} + i x_{-m} -> (W_r + i W_i)(x_{+m} + i x_{-m})``, which commutes
    with that multiplication; ``m = 0`` is untouched. So rotating into a rolled frame, convolving and
    rotating back gives the same result for every roll. Point-wise activations on a finite sphere grid
    (EquiformerV2's separable S2 activation, eSCN's message activation) commute only with rolls that
    map the grid onto itself, so those outputs depend on the roll within the grid's approximation.
    """
    x_hat = torch.nn.functional.normalize(edge_vec, dim=-1)
    u1, u2 = (torch.tensor(u, dtype=edge_vec.dtype, device=edge_vec.device) for u in _FRAME_HELPERS)
    use_second = (x_hat @ u1).abs() > _FRAME_SWITCH
    u = torch.where(use_second[..., None], u2, u1).expand_as(x_hat)
    return _frame_from_helper(x_hat, u)


# --------------------------------------------------------------------------------------------------
# SO(3) linear layer
# --------------------------------------------------------------------------------------------------
class SO3Linear(nn.Module):
    """Equivariant linear map: one weight matrix per degree, bias on ``l = 0`` only.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels per coefficient.
    lmax : int
        Maximum degree of the input and output.
    bias : bool
        Add a learnable bias to the ``l = 0`` row.

    Notes
    -----
    ``weight`` has shape ``[lmax+1, out_channels, in_channels]`` and ``bias`` ``[out_channels]``, the
    layout of the official ``SO3_LinearV2``; initialisation is uniform in ``+-1/sqrt(in_channels)``
    with a zero bias, as there.

    Examples
    --------
    >>> lin = SO3Linear(8, 4, lmax=2)
    >>> lin(torch.randn(5, 9, 8)).shape
    torch.Size([5, 9, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, lmax: int, bias: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.lmax = in_channels, out_channels, lmax
        bound = 1 / math.sqrt(in_channels)
        self.weight = nn.Parameter(torch.empty(lmax + 1, out_channels, in_channels).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        degrees = [l for l in range(lmax + 1) for _ in range(2 * l + 1)]
        self.register_buffer("expand_index", torch.tensor(degrees, dtype=torch.long), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[N, (lmax+1)**2, in_channels]`` -> ``[N, (lmax+1)**2, out_channels]``."""
        weight = self.weight.index_select(0, self.expand_index)  # [(L+1)^2, out, in]
        out = torch.einsum("nic,ioc->nio", x, weight)
        if self.bias is not None:
            out = torch.cat([out[:, :1] + self.bias, out[:, 1:]], dim=1)
        return out

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, lmax={self.lmax}, bias={self.bias is not None}"
