"""The backbone contract: what :class:`~dens.models.ForceField`, the trainer and the tests rely on.

A backbone (EquiformerV2, eSCN, Equiformer, or a user's model) is an ``nn.Module`` that conforms to
:class:`Backbone`: it declares every member below, and :func:`check_backbone` (called when a
``ForceField`` is built) says which ones are missing. Nothing else of a backbone is read from outside,
so a fourth model is added by implementing this protocol; :class:`dens.testing.BackboneTests` then checks
its symmetries, its DeNS outputs and its compilation.

DeNS enters a backbone through one door and leaves through one:

* in: ``extra_embedding``, the output of its ``force_encoder(forces, mask)``, added to the initial node
  features; given none, a DeNS model adds the encoding of "no atom" (:func:`dens_embedding`: the
  encoder's bias alone, the official S2EF mode);
* out: ``noise_head``, and ``forces`` is the noise head on the ``noise_mask`` atoms
  (:func:`~dens.models.heads.assemble_dens_forces`).
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = [
    "OPTIONAL_OUTPUTS",
    "REQUIRED_OUTPUTS",
    "Backbone",
    "CompilesGradient",
    "check_backbone",
    "dens_embedding",
    "resolve_dens_heads",
]

#: outputs of every backbone: ``energy [B]``, ``node_energy [N]``, ``forces [N, 3]`` (normalised units;
#: ``forces`` is the noise head on ``noise_mask`` atoms)
REQUIRED_OUTPUTS = ("energy", "node_energy", "forces")
#: outputs of some: ``force_head [N, 3]`` (direct forces), ``noise_head [N, 3]`` (DeNS models),
#: ``stress_isotropic [B, 1]`` and ``stress_anisotropic [B, 5]`` (a stress head)
OPTIONAL_OUTPUTS = ("force_head", "noise_head", "stress_isotropic", "stress_anisotropic")


@runtime_checkable
class Backbone(Protocol):
    """The members every dens backbone declares (a structural type: no base class needed).

    Attributes
    ----------
    cutoff : float or None
        The radius (Å) its radial basis and envelope end at; ``ForceField`` builds graphs with it.
        None when the model has no cutoff of its own (``ForceField(cutoff=...)`` is then required).
    max_num_elements : int
        Size of its element embedding: atomic numbers must be below it.
    direct_forces : bool
        True: ``forces`` come from a force head (``force_head``). False: ``forces = -dE/dpos``, taken
        inside ``forward`` (``pos`` may require grad), and the force labels are normalised by the
        energy std (:func:`dens.models.potential.gradient_force_normalizer`).
    splits_heads : bool
        Whether ``forward`` accepts ``head_edges = (force_edges, noise_edges)``
        (:func:`~dens.models.heads.split_head_edges`): each head on the edges into the atoms the DeNS
        loss reads it at (a gradient-force model splits its noise head only). False: ``head_edges`` is
        never passed.
    has_dens_heads : bool
        Whether the model has the DeNS parts: a ``force_encoder`` and a noise head (``noise_head``
        output). ``force_encoder`` is None exactly when this is False.
    force_encoder : nn.Module or None
        ``force_encoder(forces [N, 3], mask [N]) -> extra_embedding`` and
        ``force_encoder.bias_only(num_atoms, dtype, device)`` (:mod:`dens.models.force_encoder`).
    stress_head : nn.Module or None
        A direct rank-2 stress head (outputs ``stress_isotropic``, ``stress_anisotropic``; ``forward``
        then accepts ``denoising``), or None.

    Notes
    -----
    ``forward(atomic_numbers [N], pos [N, 3], batch [N], edge_index [2, E], edge_shift [E, 3],
    num_graphs, extra_embedding=None, noise_mask=None, **kwargs) -> dict`` with the
    :data:`REQUIRED_OUTPUTS` and those :data:`OPTIONAL_OUTPUTS` the model has. Row 0 of ``edge_index`` is
    the source ``j``, row 1 the target ``i``; the edge vector is ``pos[j] + edge_shift - pos[i]``. The
    backbone works in normalised units and never builds a graph. ``kwargs`` are only those the model
    declares (``head_edges`` when ``splits_heads``, ``denoising`` with a stress head, ``edge_frames``).
    """

    cutoff: float | None
    max_num_elements: int
    direct_forces: bool
    splits_heads: bool
    has_dens_heads: bool
    force_encoder: nn.Module | None
    stress_head: nn.Module | None

    def compile_regions(self) -> list[nn.Module]:
        """The modules :func:`~dens.models.compile_backbone` compiles one at a time (the repeated
        blocks and heads); empty: the whole backbone is compiled."""
        ...

    def __call__(
        self,
        atomic_numbers: Tensor,
        pos: Tensor,
        batch: Tensor,
        edge_index: Tensor,
        edge_shift: Tensor,
        num_graphs: int,
        extra_embedding: Tensor | None = None,
        noise_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Tensor]: ...


@runtime_checkable
class CompilesGradient(Protocol):
    """A gradient-force backbone that can be compiled for training (an optional capability).

    ``compile_gradient(**options)`` compiles the energy together with its gradient, so that the forces are
    an output of the compiled graph and training needs only its single backward
    (:meth:`dens.models.Equiformer.compile_gradient`). :func:`~dens.models.compile_backbone` with
    ``training=True`` calls it.
    """

    def compile_gradient(self, **options: Any) -> None: ...


_MEMBERS = ("cutoff", "max_num_elements", "direct_forces", "splits_heads", "has_dens_heads",
            "force_encoder", "stress_head", "compile_regions")  # fmt: skip


def check_backbone(module: Any) -> None:
    """Raise ``TypeError`` naming what ``module`` lacks of the :class:`Backbone` contract.

    Examples
    --------
    >>> check_backbone(nn.Linear(2, 2))
    Traceback (most recent call last):
    ...
    TypeError: Linear is not a dens backbone (dens.models.Backbone): it does not declare cutoff, ...
    """
    missing = [name for name in _MEMBERS if not hasattr(module, name)]
    if missing or not isinstance(module, nn.Module) or not isinstance(module, Backbone):
        what = f"it does not declare {', '.join(missing)}" if missing else "it is not an nn.Module"
        raise TypeError(
            f"{type(module).__name__} is not a dens backbone (dens.models.Backbone): {what}; see "
            "docs/architecture.md, 'The backbone contract'"
        )
    flags = {name: getattr(module, name) for name in ("direct_forces", "splits_heads", "has_dens_heads")}
    wrong = [f"{k}={v!r}" for k, v in flags.items() if not isinstance(v, bool)]
    if wrong:
        raise TypeError(f"{type(module).__name__}: {', '.join(wrong)} must be a bool")
    if module.force_encoder is not None and not module.has_dens_heads:
        # a noise head without a force encoder is the official no-encoding ablation; the reverse is not
        raise TypeError(f"{type(module).__name__}: a force_encoder but has_dens_heads=False")


def dens_embedding(
    encoder: nn.Module | None,
    extra_embedding: Tensor | None,
    num_atoms: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor | None:
    """The extra initial node embedding of a backbone: the given force encoding, else for a DeNS model
    (``encoder`` set) the encoding of no atom (its bias alone, as the official DeNS models in S2EF mode),
    else None.

    Examples
    --------
    >>> from dens.models import ForceEncoder
    >>> dens_embedding(ForceEncoder(1, 4), None, 3, torch.float32, torch.device("cpu")).shape
    torch.Size([3, 4, 4])
    >>> dens_embedding(None, None, 3, torch.float32, torch.device("cpu")) is None
    True
    """
    if extra_embedding is None and encoder is not None:
        return encoder.bias_only(num_atoms, dtype, device)
    return extra_embedding


def resolve_dens_heads(
    dens_heads: bool, old_value: bool | None, owner: str, old_name: str = "use_force_encoding"
) -> bool:
    """``dens_heads``, or its deprecated spelling ``old_name`` (``use_force_encoding`` of a constructor,
    ``dens`` of ``from_preset``), with a ``DeprecationWarning``.

    Configs and checkpoints written before the rename pass ``use_force_encoding``; the official models use
    that name for another switch (encode forces or not, the noise head kept), hence the rename.
    """
    if old_value is None:
        return dens_heads
    warnings.warn(
        f"{owner}({old_name}=...) is deprecated: use dens_heads= (the model has a force encoder and a "
        "noise head)",
        DeprecationWarning,
        stacklevel=3,
    )
    return bool(old_value) or dens_heads
