"""Force encoding (DeNS, Eq. 5 and Algorithm 1): forces as an extra initial node embedding.

``x_f^(l) = SO3_Linear^(l)( ||f|| Y^(l)(f / ||f||) )`` for every degree ``l <= lmax``, added to the
initial node embedding of the corrupted atoms. Any backbone that accepts an extra initial node
embedding can use it: the encoder knows nothing about the backbone.

Two layouts, one interface: :class:`ForceEncoder` for the SO(3) layout ``[N, (lmax+1)**2, C]`` of
EquiformerV2 and eSCN, :class:`IrrepsForceEncoder` for the flat e3nn irreps ``[N, irreps.dim]`` of
Equiformer. Both are called as ``encoder(forces [N, 3], mask [N])`` and give, with
``bias_only(num_atoms, dtype, device)``, the embedding of "no atom encoded" (the official S2EF mode).
"""

from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import Tensor, nn

from .irreps import IrrepsLinear
from .so3 import SO3Linear, spherical_harmonics

__all__ = ["ForceEncoder", "IrrepsForceEncoder"]


class ForceEncoder(nn.Module):
    """Encode per-atom forces as irreps features ``[N, (lmax+1)**2, channels]``.

    Parameters
    ----------
    lmax : int
        Maximum degree of the embedding.
    channels : int
        Output channels (the backbone's sphere channels).

    Notes
    -----
    As in the official implementation the spherical harmonics use e3nn's 'component' normalisation and
    are scaled by ``||f|| / sqrt(3)``, so the ``l = 1`` part is the force vector itself. Atoms outside
    ``mask`` get a zero input; the ``l = 0`` bias is added to every atom (also in S2EF mode, where no atom
    is masked), exactly as the official DeNS models do. The weight is ``[lmax+1, channels, 1]`` and the
    bias ``[channels]`` (official ``force_embedding``).

    Examples
    --------
    >>> enc = ForceEncoder(lmax=2, channels=8)
    >>> f = torch.randn(5, 3)
    >>> enc(f, mask=torch.tensor([True, False, True, False, False])).shape
    torch.Size([5, 9, 8])
    """

    def __init__(self, lmax: int, channels: int) -> None:
        super().__init__()
        self.lmax, self.channels = lmax, channels
        self.linear = SO3Linear(1, channels, lmax, bias=True)

    def forward(self, forces: Tensor, mask: Tensor | None = None) -> Tensor:
        """``forces``: ``[N, 3]``; ``mask``: ``[N]`` bool, atoms whose force is encoded (all if None)."""
        sh = spherical_harmonics(self.lmax, forces, normalize=True)
        if mask is not None:
            sh = sh * mask.to(sh.dtype)[:, None]
        sh = sh * (forces.norm(dim=-1, keepdim=True) / math.sqrt(3))
        return self.linear(sh[..., None])

    def bias_only(self, num_atoms: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The embedding when no atom is encoded (S2EF mode): only the ``l = 0`` bias."""
        out = torch.zeros(num_atoms, (self.lmax + 1) ** 2, self.channels, dtype=dtype, device=device)
        out[:, 0] = self.linear.bias.to(dtype)
        return out


class IrrepsForceEncoder(nn.Module):
    """DeNS force encoding (Eq. 5) in e3nn layout: ``linear(||f|| Y(f/||f||) / sqrt(3))``.

    The spherical harmonics (``irreps_force``, e.g. ``1x0e+1x1e+1x2e``, 'component' normalisation) of the
    encoded atoms' forces, zero for the others, go through an equivariant linear map with a bias into the
    node irreps. The bias reaches every atom (also in S2EF mode, where nothing is encoded), as in the
    official model.

    Examples
    --------
    >>> enc = IrrepsForceEncoder("1x0e+1x1e+1x2e", "8x0e+4x1e+2x2e")
    >>> enc(torch.randn(5, 3), torch.tensor([True, False, True, False, False])).shape
    torch.Size([5, 30])
    """

    def __init__(self, irreps_force: str | o3.Irreps, irreps_out: str | o3.Irreps) -> None:
        super().__init__()
        self.irreps_force = o3.Irreps(irreps_force)
        if any(mul != 1 for mul, _ in self.irreps_force):
            raise ValueError(f"irreps_force must hold each degree once, got {self.irreps_force}")
        self.linear = IrrepsLinear(self.irreps_force, irreps_out)
        self.degrees = [ir.l for _, ir in self.irreps_force]

    def forward(self, forces: Tensor, mask: Tensor | None = None) -> Tensor:
        """``forces [N, 3]``; ``mask [N]`` bool: atoms whose force is encoded (all if None)."""
        sh = o3.spherical_harmonics(self.degrees, forces, normalize=True, normalization="component")
        if mask is not None:
            sh = sh * mask.to(sh.dtype).unsqueeze(-1)
        sh = sh * (forces.norm(dim=-1, keepdim=True) / math.sqrt(3.0))
        return self.linear(sh)

    def bias_only(self, num_atoms: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The embedding when no atom is encoded (S2EF mode)."""
        zeros = torch.zeros(num_atoms, self.irreps_force.dim, dtype=dtype, device=device)
        return self.linear(zeros)
