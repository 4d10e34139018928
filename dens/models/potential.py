"""``ForceField``: a backbone with its graph rule and label normalisation, applied to a ``Batch``.

The backbone (EquiformerV2, eSCN, Equiformer) sees atoms, positions and a graph, and works in normalised
units; this wrapper builds the graph when the batch has none (after DeNS corruption, on the device),
encodes forces for DeNS, and converts predictions back to eV and eV/Å.

``dens.load(path)`` (:func:`dens.evaluate.load_model`) gives a ``ForceField`` from any checkpoint, and
``model.predict(atoms)`` (one ``ase.Atoms`` or a list) gives energies and forces as NumPy arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.batch import Batch
from ..data.graph import radius_graph_pbc
from ..inference import model_device, model_dtype, prepare_batch
from .gemm_layout import inductor_options
from .heads import retain_energy_graph, split_head_edges
from .interface import Backbone, CompilesGradient, check_backbone
from .stress import assemble_stress

__all__ = ["ForceField", "backbone_cutoff", "compile_backbone", "gradient_force_std", "require_compilable"]


def gradient_force_std(direct_forces: bool, energy_std: float, force_std: float) -> float:
    """The force normaliser a backbone trains with, the one rule: ``force_std = energy_std`` for gradient
    forces (their normalised value must be ``-d(E / energy_std)/dx``, as in the official MD17 code),
    ``force_std`` as given for direct forces.

    Examples
    --------
    >>> gradient_force_std(False, 2.0, 0.5), gradient_force_std(True, 2.0, 0.5)
    (2.0, 0.5)
    """
    return force_std if direct_forces else energy_std


class ForceField(nn.Module):
    """A backbone plus the graph rule and the normalisation of its labels.

    Parameters
    ----------
    backbone : Backbone
        A model that conforms to :class:`~dens.models.Backbone` (``TypeError`` otherwise): ``backbone(
        atomic_numbers, pos, batch, edge_index, edge_shift, num_graphs, extra_embedding=None,
        noise_mask=None) -> dict`` with ``energy`` and ``forces`` (and ``noise_head`` for DeNS models,
        which have a ``force_encoder``), and the declared flags ``direct_forces``, ``splits_heads``,
        ``has_dens_heads``, ``stress_head``.
    cutoff : float, optional
        Graph cutoff (Å); default: the backbone's own ``cutoff`` / ``max_radius``, which it must equal
        (its radial basis and envelope end there: another graph cutoff would silently change the model).
    max_neighbors : int, optional
        Neighbour cap per atom (OC20: 20); None for no cap (MD17).
    strict_max_neighbors : bool
        Exactly ``max_neighbors`` (OC20) or keep ties at the boundary (OC22).
    energy_mean, energy_std, force_std : float
        Label normalisation: the backbone predicts ``(E - mean) / energy_std`` and ``F / force_std``.
    stress_isotropic_mean, stress_isotropic_std, stress_anisotropic_mean, stress_anisotropic_std : float
        Normalisation of the two parts of a stress head (:mod:`dens.models.stress`), de-normalised as
        ``x * std + mean`` before assembly (fairchem's convention; the anisotropic mean is added to all
        five components).
    element_references : sequence of float, optional
        Energy per element indexed by atomic number, added to the de-normalised energy (fairchem's
        ``LinearReferences``; the E0s of ``data.references`` of a dens run), so that predictions are total
        energies; None for none. The model is trained on the energies minus these.

    Examples
    --------
    >>> from dens.models import EquiformerV2
    >>> backbone = EquiformerV2(num_layers=1, lmax=2, mmax=1, sphere_channels=8, attn_hidden_channels=8,
    ...                         num_heads=2, attn_alpha_channels=4, attn_value_channels=4,
    ...                         ffn_hidden_channels=8, edge_channels=8, grid_resolution=8, cutoff=5.0)
    >>> model = ForceField(backbone, max_neighbors=20)
    >>> from dens.data import collate, make_structure
    >>> batch = collate([make_structure(torch.randn(4, 3), [1, 6, 8, 1])])
    >>> out = model.predict(batch)
    >>> out["energy"].shape, out["forces"].shape
    (torch.Size([1]), torch.Size([4, 3]))
    """

    def __init__(
        self,
        backbone: Backbone,
        cutoff: float | None = None,
        max_neighbors: int | None = None,
        strict_max_neighbors: bool = True,
        energy_mean: float = 0.0,
        energy_std: float = 1.0,
        force_std: float = 1.0,
        stress_isotropic_mean: float = 0.0,
        stress_isotropic_std: float = 1.0,
        stress_anisotropic_mean: float = 0.0,
        stress_anisotropic_std: float = 1.0,
        element_references: Any = None,
    ) -> None:
        super().__init__()
        check_backbone(backbone)
        own = backbone_cutoff(backbone)
        if cutoff is None:
            if own is None:
                raise ValueError(f"{type(backbone).__name__} states no cutoff: pass ForceField(cutoff=...)")
            cutoff = own
        elif own is not None and abs(float(cutoff) - own) > 1e-6:
            raise ValueError(
                f"ForceField cutoff {cutoff} Å differs from the backbone's cutoff {own} Å (its radial basis "
                f"and envelope): build the backbone with cutoff={cutoff}, or leave ForceField's cutoff out"
            )
        if force_std != gradient_force_std(backbone.direct_forces, energy_std, force_std):
            raise ValueError(
                f"a gradient-force model needs force_std == energy_std (got {force_std} and {energy_std})"
            )
        self.backbone: Backbone = backbone
        #: atomic numbers seen in training (from the checkpoint; None when unknown)
        self.training_elements: list[int] | None = None
        self.cutoff, self.max_neighbors, self.strict_max_neighbors = (
            cutoff,
            max_neighbors,
            strict_max_neighbors,
        )
        self.register_buffer("energy_mean", torch.tensor(float(energy_mean), dtype=torch.float64))
        self.register_buffer("energy_std", torch.tensor(float(energy_std), dtype=torch.float64))
        self.register_buffer("force_std", torch.tensor(float(force_std), dtype=torch.float64))
        # not persistent: they come from the constructor (config), so checkpoints written before load
        stress_norm = [
            stress_isotropic_mean,
            stress_isotropic_std,
            stress_anisotropic_mean,
            stress_anisotropic_std,
        ]
        self.register_buffer(
            "stress_normalizer", torch.tensor(stress_norm, dtype=torch.float64), persistent=False
        )
        refs = (
            None if element_references is None else torch.as_tensor(element_references, dtype=torch.float64)
        )
        self.register_buffer("element_references", refs, persistent=False)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        use_ema: bool = True,
        state: dict[str, Any] | None = None,
    ) -> ForceField:
        """A trained model from a dens checkpoint (``best.pt``: EMA weights; ``last.pt``: the EMA
        weights when ``use_ema`` and the run used an EMA, else the raw weights), in eval mode.

        The file is read and verified by :func:`dens.checkpoint.load_checkpoint` (``state``: its contents
        when already read that way). ``model.training_elements`` lists the elements trained on.
        A fairchem 1.x EquiformerV2 checkpoint (``state_dict`` + ``config['model']`` of a hydra model) is
        recognised and imported with its normalisers and element references
        (:func:`dens.models.fairchem.load_fairchem_checkpoint`).

        Examples
        --------
        >>> model = ForceField.from_checkpoint("runs/demo/checkpoints/best.pt")  # doctest: +SKIP
        """
        from hydra.utils import instantiate

        from ..checkpoint import CheckpointError, load_checkpoint

        path = Path(path)
        if state is None:
            if not path.is_file():
                raise FileNotFoundError(
                    f"no checkpoint at {path} (a run writes runs/<name>/checkpoints/best.pt)"
                )
            state = load_checkpoint(path)
        from .fairchem import is_fairchem_checkpoint, load_fairchem_checkpoint

        if is_fairchem_checkpoint(state):  # a fairchem 1.x EquiformerV2 (OMat24 / MPtrj) checkpoint
            return load_fairchem_checkpoint(state, use_ema=use_ema).to(device).eval()
        config = state.get("config") or {}
        if "model" not in config or "resolved_normalizer" not in config:
            raise ValueError(f"{path} is not a dens training checkpoint (no config.model / normaliser)")
        model = instantiate(upgrade_model_config(config["model"]), **_plain(config["resolved_normalizer"]))
        if not isinstance(model, cls):
            raise ValueError(f"{path}: config.model builds a {type(model).__name__}, not a {cls.__name__}")
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise CheckpointError(
                f"{path}: the weights do not fit the model its config builds ({err})"
            ) from err
        # the elements seen in training (None for checkpoints written before dens recorded them)
        model.training_elements = state.get("training_elements")
        ema = state.get("ema")
        if use_ema and ema:
            with torch.no_grad():
                for p, shadow in zip(model.parameters(), ema["shadow"], strict=True):
                    p.copy_(shadow)
        return model.to(device).eval()

    @classmethod
    def from_preset(
        cls, name: str, family: str = "equiformer_v2", dens_heads: bool = False, **overrides: Any
    ) -> ForceField:
        """An untrained paper model, ready for ``predict``: the backbone preset with its graph rule and
        official normaliser.

        ``family``: ``equiformer_v2`` (``oc20_2m``, ``oc20_all_md``, ``oc20_31m``, ``oc22``), ``escn``
        (``oc20_2m``) or ``equiformer`` (``md17_l2``, ``md17_l3``). Graph rules: OC20 20 neighbours
        (strict), OC22 20 (keeping ties), MD17 no cap; normalisers: the official OC20 / OC22 constants (OC22
        energies are then referenced by the OC22 linear reference, which is data, not part of the model);
        MD17 models are normalised by their training data, so none here. ``dens_heads`` adds the DeNS
        force encoder and noise head; ``overrides`` go to the backbone.

        Examples
        --------
        >>> model = ForceField.from_preset("oc20_2m", num_layers=1, lmax=2, mmax=1, sphere_channels=8,
        ...     attn_hidden_channels=8, num_heads=2, attn_alpha_channels=4, attn_value_channels=4,
        ...     ffn_hidden_channels=8, edge_channels=8, grid_resolution=8)
        >>> model.cutoff, model.max_neighbors, round(float(model.energy_std), 3)
        (12.0, 20, 2.887)
        """
        from omegaconf import OmegaConf

        from . import ESCN, Equiformer, EquiformerV2

        classes = {"equiformer_v2": EquiformerV2, "escn": ESCN, "equiformer": Equiformer}
        if family not in classes:
            raise ValueError(f"unknown model family {family!r}; choose from {sorted(classes)}")
        backbone = classes[family].from_preset(name, dens_heads, **overrides)
        dataset = name.split("_")[0]
        norm: dict[str, float] = {}
        if dataset in ("oc20", "oc22"):
            # the official constants, from the shipped data config that the paper experiments train with
            data_cfg = Path(__file__).resolve().parents[1] / "conf" / "data" / f"{dataset}_s2ef.yaml"
            norm = {k: float(v) for k, v in OmegaConf.load(data_cfg).normalizer.items()}
        max_neighbors = None if dataset == "md17" else 20
        return cls(backbone, None, max_neighbors, strict_max_neighbors=dataset != "oc22", **norm).eval()

    @property
    def has_force_encoder(self) -> bool:
        """Whether the backbone encodes forces (a DeNS model built with ``encode_forces=False`` does not)."""
        return self.backbone.force_encoder is not None

    @property
    def has_dens_heads(self) -> bool:
        """Whether the backbone has the DeNS parts: a noise head (and a force encoder, see
        :attr:`has_force_encoder`)."""
        return self.backbone.has_dens_heads

    @property
    def direct_forces(self) -> bool:
        """Whether the backbone predicts forces with a head (False: ``-dE/dpos``)."""
        return self.backbone.direct_forces

    def build_graph(self, batch: Batch, pos: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The graph rule: ``edge_index`` and the integer images ``cell_offsets`` of the sources, built for
        ``pos`` (default ``batch.pos``) with this model's cutoff and neighbour cap, whether or not the batch
        holds a graph."""
        pos = batch.pos if pos is None else pos
        with torch.no_grad():
            return radius_graph_pbc(
                pos.detach(), batch.cell, batch.pbc, batch.batch, self.cutoff, self.max_neighbors,
                self.strict_max_neighbors, natoms=batch.natoms,
            )  # fmt: skip

    def graph(self, batch: Batch, pos: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``edge_index`` and the image shifts ``n @ cell`` of the sources (built if the batch has none)."""
        pos = batch.pos if pos is None else pos
        if batch.edge_index is not None:
            edge_index, offsets = batch.edge_index, batch.cell_offsets
        else:
            edge_index, offsets = self.build_graph(batch, pos)
        if offsets is None:
            return edge_index, pos.new_zeros(edge_index.shape[1], 3)
        # in float64 outside autocast: in bf16 the image shifts would be off by up to ~0.05 Å
        with torch.autocast(pos.device.type, enabled=False):
            cell = batch.cell.to(torch.float64)[batch.batch[edge_index[0]]]
            shift = (offsets.to(torch.float64)[:, :, None] * cell).sum(1)
        return edge_index, shift.to(pos.dtype)

    def forward(
        self,
        batch: Batch,
        pos: Tensor | None = None,
        encoded_forces: Tensor | None = None,
        encode_mask: Tensor | None = None,
        noise_mask: Tensor | None = None,
        split_heads: bool = False,
        strain: Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Tensor]:
        """Outputs in normalised units.

        Parameters
        ----------
        batch : Batch
            The structures (a graph is built when ``batch.edge_index`` is None).
        pos : Tensor, optional
            Positions to use instead of ``batch.pos`` (corrupted positions; positions that require
            grad for gradient forces).
        encoded_forces, encode_mask : Tensor, optional
            DeNS force encoding: forces ``[N, 3]`` (eV/Å) of the atoms selected by ``encode_mask``.
        noise_mask : Tensor, optional
            Atoms whose ``forces`` output is the noise prediction.
        split_heads : bool
            DeNS training: run the force head only for atoms outside ``noise_mask`` and the noise head
            only for atoms in it (exact there, zero elsewhere), for backbones that support it
            (``backbone.splits_heads``). The DeNS loss reads nothing else, so the noise head then costs
            almost nothing.
        strain : Tensor, optional
            ``[B, 3, 3]`` symmetric strain applied to positions and cell (``x -> (1 + strain) x``), for the
            conservative stress; the graph is that of the unstrained structure.
        """
        pos = batch.pos if pos is None else pos
        if not self.direct_forces and not pos.requires_grad:
            pos = pos.detach().requires_grad_(True)
        edge_index, shift = self.graph(batch, pos)
        if strain is not None:
            pos = pos + torch.einsum("nij,nj->ni", strain[batch.batch], pos)
            shift = shift + torch.einsum("eij,ej->ei", strain[batch.batch[edge_index[0]]], shift)
        extra = None
        if encoded_forces is not None:
            if not self.has_dens_heads:
                raise ValueError("force encoding needs a DeNS model (dens_heads=True)")
            if not self.has_force_encoder:
                raise ValueError(
                    "this DeNS model has no force encoder (built with encode_forces=False): pass no "
                    "encoded_forces (training: dens.force_encoding=false)"
                )
            extra = self.backbone.force_encoder(encoded_forces.to(pos.dtype), encode_mask)
        if split_heads and self.has_dens_heads and self.backbone.splits_heads:
            kwargs["head_edges"] = split_head_edges(edge_index, noise_mask)
        return self.backbone(
            batch.atomic_numbers, pos, batch.batch, edge_index, shift, batch.num_graphs,
            extra_embedding=extra, noise_mask=noise_mask, **kwargs,
        )  # fmt: skip

    @property
    def has_stress_head(self) -> bool:
        """Whether the backbone predicts stress directly (a rank-2 head)."""
        return self.backbone.stress_head is not None

    def predict(self, batch: Batch | Any, stress: bool | None = None) -> dict[str, Any]:
        """Energy (eV, float64), forces (eV/Å) and stress (eV/Å³) of a batch.

        The batch is first moved to the model's device, with positions and cell in the model's float dtype
        (a float32 batch on the CPU for a float64 model on a GPU, say); forces and stress come in that
        dtype, on that device.

        Given an ``ase.Atoms`` or a list of them instead of a batch, returns NumPy arrays (float64):
        ``energy`` (a float for one structure, ``[S]`` for a list), ``forces`` (``[N, 3]``, or a list of
        them) and ``stress`` where computed (``[3, 3]`` or ``[S, 3, 3]``).

        Parameters
        ----------
        stress : bool, optional
            Also return ``stress [B, 3, 3]`` (ASE's sign: ``(1/V) dE/d strain``, negative under
            compression). Default: when the backbone has a stress head. A gradient-force model without one
            gives the conservative stress from a symmetric strain of positions and cell (one more
            backward pass); a direct-force model without one raises ``ValueError``.
        """
        if not isinstance(batch, Batch):
            return self._predict_atoms(batch, stress)
        batch = prepare_batch(batch, model_device(self), model_dtype(self))
        want_stress = self.has_stress_head if stress is None else stress
        conservative = want_stress and not self.has_stress_head
        if conservative and self.direct_forces:
            raise ValueError("this model has neither a stress head nor gradient forces: no stress")
        kwargs: dict[str, Any] = {}
        if conservative:
            strain = torch.zeros(batch.num_graphs, 3, 3, dtype=batch.pos.dtype, device=batch.pos.device)
            kwargs["strain"] = strain.requires_grad_(True)
        with (
            torch.set_grad_enabled(not self.direct_forces),
            retain_energy_graph() if conservative else nullcontext(),
        ):
            out = self(batch, split_heads=True, **kwargs)  # the force head only: the noise head is not read
        energy = out["energy"].to(torch.float64) * self.energy_std + self.energy_mean
        if self.element_references is not None:
            refs = self.element_references.to(energy.device)[batch.atomic_numbers]
            energy = energy + torch.zeros_like(energy).index_add_(0, batch.batch, refs)
        forces = out["forces"].detach() * self.force_std.to(out["forces"].dtype)
        result = {"energy": energy.detach(), "forces": forces}
        if conservative:
            (de_dstrain,) = torch.autograd.grad(out["energy"].sum(), kwargs["strain"])
            volume = torch.linalg.det(batch.cell.to(torch.float64)).abs()
            if bool((volume < 1e-12).any()) or not bool(batch.pbc.all()):
                raise ValueError("stress needs structures periodic along all three axes, with a cell volume")
            # symmetrise: dE/d(strain) of a symmetric strain
            de_dstrain = 0.5 * (de_dstrain + de_dstrain.transpose(1, 2)).to(torch.float64)
            result["stress"] = (de_dstrain * self.energy_std / volume[:, None, None]).to(forces.dtype)
        elif want_stress:
            mean_iso, std_iso, mean_aniso, std_aniso = self.stress_normalizer.tolist()
            iso = out["stress_isotropic"].detach().to(torch.float64) * std_iso + mean_iso
            aniso = out["stress_anisotropic"].detach().to(torch.float64) * std_aniso + mean_aniso
            result["stress"] = assemble_stress(iso, aniso).to(forces.dtype)
        return result

    def _predict_atoms(self, atoms: Any, stress: bool | None = None, batch_size: int = 16) -> dict[str, Any]:
        import ase

        from ..data.ase_io import atoms_to_structure
        from ..data.batch import collate

        single = isinstance(atoms, ase.Atoms)
        frames = [atoms] if single else list(atoms)
        if not all(isinstance(a, ase.Atoms) for a in frames):
            raise TypeError("ForceField.predict takes a Batch, an ase.Atoms or a list of ase.Atoms")
        dtype = model_dtype(self)
        was_training = self.training
        self.eval()
        energies: list[float] = []
        forces: list[Any] = []
        stresses: list[Any] = []
        try:
            for start in range(0, len(frames), batch_size):
                chunk = frames[start : start + batch_size]
                items = []
                for i, a in enumerate(chunk):
                    s = atoms_to_structure(a, dtype=dtype, where=f"structure {start + i}")
                    s["energy"] = s["forces"] = None  # labels are not inputs
                    items.append(s)
                batch = collate(items)
                out = self.predict(batch, stress)  # on the model's device
                energies += out["energy"].detach().cpu().tolist()
                per_atom = out["forces"].detach().to(torch.float64).cpu()
                forces += [f.numpy() for f in torch.split(per_atom, batch.natoms.tolist())]
                if "stress" in out:
                    stresses += list(out["stress"].detach().to(torch.float64).cpu().numpy())
        finally:
            self.train(was_training)
        result: dict[str, Any] = {"energy": energies[0], "forces": forces[0]} if single else {
            "energy": np.asarray(energies), "forces": forces}  # fmt: skip
        if stresses:
            result["stress"] = stresses[0] if single else np.stack(stresses)
        return result


def backbone_cutoff(backbone: Backbone) -> float | None:
    """The cutoff a backbone was built with (its declared ``cutoff``), or None."""
    value = backbone.cutoff
    return None if value is None else float(value)


def upgrade_model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``config.model`` with the keyword names of today: the backbone's
    ``use_force_encoding`` (before the rename) becomes ``dens_heads``, the same switch."""
    config = dict(config)
    backbone = config.get("backbone")
    if isinstance(backbone, Mapping) and "use_force_encoding" in backbone:
        backbone = dict(backbone)
        backbone.setdefault("dens_heads", backbone.pop("use_force_encoding"))
        config["backbone"] = backbone
    return config


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-style checkpoint values as plain Python (Hydra's ``instantiate`` wraps lists otherwise)."""
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in values.items()}


def require_compilable(backbone: Backbone, training: bool = False) -> None:
    """Raise ``ValueError`` where :func:`compile_backbone` would: a gradient-force backbone without
    ``compile_gradient`` cannot be compiled for training (for callers that compile later, such as the
    trainer after its thread choice)."""
    if training and not backbone.direct_forces and not isinstance(backbone, CompilesGradient):
        raise ValueError(
            f"{type(backbone).__name__} takes its forces as -dE/dpos and has no compile_gradient: its "
            "training loss needs a double backward, which a compiled graph does not support"
        )


def compile_backbone(backbone: Backbone, training: bool = False, **options: Any) -> Backbone:
    """``torch.compile`` a backbone in place, block by block.

    The modules of ``backbone.compile_regions()`` (the repeated blocks and the heads) are compiled
    one module at a time ("regional" compilation): identical blocks share one compiled graph, so
    compiling costs about one block instead of the whole network, and the rest (embeddings, graph
    helpers) stays eager. Without such blocks the whole backbone is compiled. Options default to
    ``dynamic=True`` (graphs of every size share the compiled code) and, with inductor, the narrow-product
    pass of :mod:`dens.models.gemm_layout`. Parameter names do not change.

    ``training=True`` with a gradient-force backbone (``direct_forces`` False): its training loss is
    differentiated twice, which a compiled block does not allow, so the backbone's
    ``compile_gradient`` (:class:`~dens.models.interface.CompilesGradient`) compiles the energy and its
    gradient as one graph instead; a gradient-force backbone without it raises ``ValueError``.

    Examples
    --------
    >>> from dens.models import EquiformerV2
    >>> model = compile_backbone(EquiformerV2(num_layers=2, lmax=2, mmax=1, sphere_channels=8,
    ...     attn_hidden_channels=8, num_heads=2, attn_alpha_channels=4, attn_value_channels=4,
    ...     ffn_hidden_channels=8, edge_channels=8, grid_resolution=8))
    >>> "blocks.0.ga.alpha_dot" in dict(model.named_parameters())
    True
    """
    require_compilable(backbone, training)
    if training and not backbone.direct_forces:
        backbone.compile_gradient(**options)
        return backbone
    options = inductor_options(options)
    regions = backbone.compile_regions()
    if not regions:
        backbone.compile(**options)
    for module in regions:
        module.compile(**options)
    return backbone
