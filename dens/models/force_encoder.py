"""Force encoding (DeNS, Eq. 5 and Algorithm 1): forces as an extra initial node embedding.

``x_f^(l) = SO3_Linear^(l)( ||f|| Y^(l)(f / ||f||) )`` for every degree ``l <= lmax``, added to the
initial node embedding of the corrupted atoms. Any backbone that accepts an extra initial node
embedding can use it: the encoder knows nothing about the backbone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .so3 import SO3Linear, spherical_harmonics

__all__ = ["ForceEncoder"]


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
