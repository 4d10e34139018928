"""Test helpers shipped with the library: random rotations and equivariance checks.

Use them to test your own layers and models the way dens tests its own.

Examples
--------
>>> from dens.models import SO3Linear
>>> lin = SO3Linear(4, 3, lmax=2).double()
>>> x = torch.randn(5, 9, 4, dtype=torch.float64)
>>> err = assert_equivariant(lin, [x], in_kinds=[2], out_kinds=[2])
>>> err < 1e-12
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .models.so3 import wigner_D

__all__ = ["assert_equivariant", "random_rotation", "rotate"]

Kind = int | str | None


def random_rotation(
    *shape: int, dtype: torch.dtype = torch.float64, generator: torch.Generator | None = None
) -> Tensor:
    """Uniformly distributed rotation matrices ``[*shape, 3, 3]`` (from random unit quaternions)."""
    q = torch.randn(*shape, 4, dtype=torch.float64, generator=generator)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2).to(dtype)


def rotate(x: Tensor, rotation: Tensor, kind: Kind) -> Tensor:
    """Apply a rotation (or improper rotation) to ``x`` according to its kind.

    Parameters
    ----------
    kind : int, 'cartesian', 'pseudo' or None
        An int ``lmax``: irreps features ``[..., (lmax+1)**2, C]`` rotated by ``D(R)`` (for an improper
        ``R`` degree ``l`` also gets the parity ``det(R)**l``, i.e. true spherical tensors);
        'cartesian': vectors ``[..., 3]`` rotated by ``R``; 'pseudo': axial vectors, ``det(R) R``;
        None: invariant.
    """
    if kind is None:
        return x
    rotation = rotation.to(x.dtype)
    det = torch.linalg.det(rotation)
    if kind == "cartesian":
        return x @ rotation.T
    if kind == "pseudo":
        return det * (x @ rotation.T)
    if isinstance(kind, int):
        proper = rotation * det  # D of the proper part; parity per degree below
        d = wigner_D(proper, kind)
        parity = torch.cat([det.pow(l).expand(2 * l + 1) for l in range(kind + 1)])
        return torch.einsum("ij,...jc->...ic", d * parity[:, None], x)
    raise ValueError(f"unknown kind {kind!r}: use an int lmax, 'cartesian', 'pseudo' or None")


def assert_equivariant(
    fn: Callable[..., Tensor | Sequence[Tensor]],
    inputs: Sequence[Tensor],
    in_kinds: Sequence[Kind],
    out_kinds: Sequence[Kind],
    rotation: Tensor | None = None,
    atol: float = 1e-9,
    rtol: float = 0.0,
) -> float:
    """Check ``fn(R x) == R fn(x)`` and return the largest error relative to the outputs' scale.

    Parameters
    ----------
    fn : callable
        Takes ``len(inputs)`` tensors, returns one tensor or a sequence of tensors.
    inputs, in_kinds : sequences
        The inputs and their kinds (see :func:`rotate`).
    out_kinds : sequence
        The kinds of the outputs.
    rotation : Tensor, optional
        A ``3 x 3`` (possibly improper) rotation; a random proper one by default.
    atol, rtol : float
        Passes when ``max |fn(Rx) - R fn(x)| <= atol + rtol * max |R fn(x)|`` for every output.

    Returns
    -------
    float
        The largest ``max |difference| / max |expected|`` over the outputs.

    Raises
    ------
    AssertionError
        Naming the output and the measured error when the check fails.
    """
    if rotation is None:
        rotation = random_rotation(dtype=inputs[0].dtype if inputs[0].is_floating_point() else torch.float64)
    as_list = lambda out: [out] if isinstance(out, Tensor) else list(out)  # noqa: E731
    expected = [rotate(o, rotation, k) for o, k in zip(as_list(fn(*inputs)), out_kinds, strict=True)]
    rotated_inputs = [rotate(x, rotation, k) for x, k in zip(inputs, in_kinds, strict=True)]
    actual = as_list(fn(*rotated_inputs))
    worst = 0.0
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        err = (a - e).abs().max().item() if a.numel() else 0.0
        scale = e.abs().max().item() if e.numel() else 0.0
        if err > atol + rtol * scale:
            raise AssertionError(f"output {i} is not equivariant: max error {err:.3e} (scale {scale:.3e})")
        worst = max(worst, err / scale if scale > 0 else err)
    return worst
