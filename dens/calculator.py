"""An ASE calculator for dens force fields: ``DeNSCalculator``.

Energy and forces of any :class:`~dens.models.ForceField` (EquiformerV2, eSCN, Equiformer; DeNS-trained or
not) from ASE, so that ``ase.optimize`` and ``ase.md`` can drive it:

* the radius graph (periodic images, the model's cutoff and neighbour cap) is rebuilt on every call;
* the forces are those of every atom; ASE's own constraints (``FixAtoms``) zero the forces of fixed atoms
  and hold them in optimisers and integrators, as with any ASE calculator;
* elements outside the model's embedding table and periodic cells that are degenerate or too thin raise
  a ``ValueError`` that says what is wrong; atoms without neighbours inside the cutoff are allowed (their
  energy is the model's isolated-atom energy), and are reported once in the log;
* a direct-force model (EquiformerV2, eSCN) predicts forces that are not the gradient of its energy: the
  first calculation warns once (``DirectForcesWarning``) that energy is then not conserved in NVE MD.

Examples
--------
>>> from ase.build import molecule
>>> from dens.models import EquiformerV2, ForceField
>>> backbone = EquiformerV2(num_layers=1, lmax=2, mmax=1, sphere_channels=8, attn_hidden_channels=8,
...                         num_heads=2, attn_alpha_channels=4, attn_value_channels=4,
...                         ffn_hidden_channels=8, edge_channels=8, grid_resolution=8, cutoff=5.0)
>>> atoms = molecule("H2O")
>>> atoms.calc = DeNSCalculator(ForceField(backbone, max_neighbors=20))
>>> atoms.get_forces().shape
(3, 3)
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, ClassVar

import ase
import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.data import chemical_symbols
from torch import nn

from . import runtime
from .checkpoint import element_names, unseen_elements
from .data.batch import DEFAULT_MIN_DISTANCE, collate, make_structure, min_pair_distance
from .data.graph import radius_graph_pbc
from .evaluate import load_model
from .inference import model_device, model_dtype
from .models import Backbone, ForceField

__all__ = ["DeNSCalculator", "DirectForcesWarning", "element_limit"]


class DirectForcesWarning(UserWarning):
    """A direct-force model drives a simulation: its forces are not conservative."""


logger = logging.getLogger(__name__)


def element_limit(model: nn.Module) -> int | None:
    """The number of atomic numbers a model embeds (``Z < limit``), or None when it states none.

    Read from the backbone's declared ``max_num_elements`` (:class:`~dens.models.Backbone`); ``model`` is
    a :class:`~dens.models.ForceField` or a backbone.

    Examples
    --------
    >>> from dens.models import EquiformerV2, ForceField
    >>> element_limit(ForceField(EquiformerV2(num_layers=1, lmax=1, mmax=1, sphere_channels=4,
    ...     attn_hidden_channels=4, num_heads=1, attn_alpha_channels=2, attn_value_channels=2,
    ...     ffn_hidden_channels=4, edge_channels=4, grid_resolution=4)))
    90
    """
    backbone = model.backbone if isinstance(model, ForceField) else model
    return backbone.max_num_elements if isinstance(backbone, Backbone) else None


class DeNSCalculator(Calculator):
    """ASE calculator around a dens force field (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        A :class:`~dens.models.ForceField` (the graph is built here with its rule), or anything with its
        ``predict`` interface that builds its own graph (energy and forces only).
    device : str or torch.device, optional
        Where to run (default: where the model is; the model is moved there).
    min_cell_height : float
        Smallest allowed distance (Å) between the lattice planes of a periodic axis; thinner cells (and
        degenerate ones) raise ``ValueError``. Such cells put a periodic image of every atom closer than
        a chemical bond, which no training structure has.
    warn_isolated : bool
        Log (once per calculator) when an atom has no neighbour within the cutoff.
    retain_freed_memory : bool
        On the CPU, call :func:`dens.runtime.retain_freed_memory`: every MD or relaxation step allocates
        the same large per-edge tensors, which glibc would otherwise unmap and page-fault back each time.
        Off by default, since it changes the allocator of the whole process.
    unseen_elements : {"warn", "error", "ignore"}
        What to do with elements that never occurred in the training data (recorded in dens checkpoints
        since they store ``training_elements``): log a warning once per element, raise ``ValueError``,
        or nothing.
    min_distance : float
        Two atoms closer than this (Å; periodic images included) raise ``ValueError``: a duplicated atom
        gets no graph edge and would be predicted silently. Checked for up to 5,000 atoms; 0 disables it.
    **kwargs
        Passed to :class:`ase.calculators.calculator.Calculator`.

    Examples
    --------
    >>> calc = DeNSCalculator.from_checkpoint("runs/demo/checkpoints/best.pt", device="cuda")  # doctest: +SKIP
    """

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces", "stress"]

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device | None = None,
        min_cell_height: float = 0.5,
        warn_isolated: bool = True,
        retain_freed_memory: bool = False,
        unseen_elements: str = "warn",
        min_distance: float = DEFAULT_MIN_DISTANCE,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if unseen_elements not in ("warn", "error", "ignore"):
            raise ValueError(f"unseen_elements must be 'warn', 'error' or 'ignore', got {unseen_elements!r}")
        self.unseen_elements = unseen_elements
        self.min_distance = min_distance
        self._warned_elements: set[int] = set()
        self.device = torch.device(device) if device is not None else model_device(model)
        if retain_freed_memory and self.device.type == "cpu":
            runtime.retain_freed_memory()
        self.model = model.to(self.device).eval() if isinstance(model, nn.Module) else model
        self.dtype = model_dtype(model) if isinstance(model, nn.Module) else torch.float64
        self.min_cell_height = min_cell_height
        self.warn_isolated = warn_isolated
        self._warned_isolated = False
        self._warned_direct = False
        self.num_edges: int | None = None

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True, **kwargs: Any
    ) -> DeNSCalculator:
        """A calculator for a dens (or imported official) checkpoint, with EMA weights by default.

        Examples
        --------
        >>> calc = DeNSCalculator.from_checkpoint("best.pt", device="cpu")  # doctest: +SKIP
        """
        return cls(load_model(path, device=device, use_ema=use_ema), device=device, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        path: str | Path,
        device: str | torch.device = "cpu",
        use_ema: bool = True,
        **kwargs: Any,
    ) -> DeNSCalculator:
        """A calculator for a published fairchem 1.x EquiformerV2 model from its local checkpoint file.

        ``name`` is one of ``dens.models.fairchem.FAIRCHEM_PRETRAINED`` (``eqV2-31M-OMAT24``,
        ``eqV2-86M-OMAT24-MP-sAlex``, ``EquiformerV2-DeNS-153M-MP``, ``eqV2-S-DeNS-MP`` = Matbench
        Discovery's "eqV2 S DeNS", ...); the file must hold that model (its sizes are checked). The files
        are gated on Hugging Face (``fairchem/OMAT24``): download them with your own access.

        Examples
        --------
        >>> calc = DeNSCalculator.from_pretrained("eqV2-S-DeNS-MP", path="eqV2_dens_31M_mp.pt")  # doctest: +SKIP
        """
        from .models.fairchem import load_pretrained

        return cls(load_pretrained(name, path, use_ema=use_ema).to(device).eval(), device=device, **kwargs)

    # ----------------------------------------------------------------------------------------------
    def check_atoms(self, atoms: ase.Atoms) -> None:
        """Raise ``ValueError`` for structures the model cannot evaluate (see the class docstring)."""
        if len(atoms) == 0:
            raise ValueError("DeNSCalculator: the structure has no atoms")
        numbers = np.asarray(atoms.numbers)
        limit = element_limit(self.model)
        if limit is not None:
            bad = sorted({int(z) for z in numbers if z < 1 or z >= limit})
            if bad:
                names = ", ".join(
                    f"{chemical_symbols[z] if 0 < z < len(chemical_symbols) else '?'} (Z={z})" for z in bad
                )
                raise ValueError(
                    f"DeNSCalculator: element(s) {names} outside the model's embedding range: it embeds "
                    f"atomic numbers 1..{limit - 1} (max_num_elements={limit})"
                )
        unseen = unseen_elements(self.model, numbers) if self.unseen_elements != "ignore" else []
        if unseen:
            message = (
                f"DeNSCalculator: element(s) {element_names(unseen)} never occurred in the model's training "
                f"data; its predictions for them are extrapolations"
            )
            if self.unseen_elements == "error":
                raise ValueError(message + " (unseen_elements='error')")
            if not set(unseen) <= self._warned_elements:
                logger.warning("%s", message)
                self._warned_elements.update(unseen)
        if not np.isfinite(atoms.positions).all():
            raise ValueError("DeNSCalculator: positions contain NaN or infinite values")
        if self.min_distance > 0 and 1 < len(atoms) <= 5000:
            d, i, j = min_pair_distance(
                torch.as_tensor(atoms.positions),
                torch.as_tensor(atoms.cell.array),
                torch.as_tensor(atoms.pbc),
            )
            if d < self.min_distance:
                raise ValueError(
                    f"DeNSCalculator: atoms {i} and {j} are {d:.4f} Å apart (closer than min_distance="
                    f"{self.min_distance} Å; duplicated atoms?)"
                )
        pbc = np.asarray(atoms.pbc, dtype=bool)
        if pbc.any():
            cell = np.asarray(atoms.cell.array, dtype=np.float64)
            lengths = np.linalg.norm(cell, axis=1)
            for k in np.nonzero(pbc)[0]:
                if lengths[k] < 1e-8:
                    raise ValueError(
                        f"DeNSCalculator: periodic along axis {k} but lattice vector {k} is zero; set a cell "
                        f"or pbc=False for that axis"
                    )
            short = [int(k) for k in np.nonzero(pbc)[0] if lengths[k] < self.min_cell_height]
            if short:
                raise ValueError(
                    f"DeNSCalculator: the periodic cell is too small: lattice vector(s) {short} shorter than "
                    f"min_cell_height={self.min_cell_height} Å (periodic images would overlap the atoms)"
                )
            volume = abs(np.linalg.det(cell)) if pbc.all() else None
            if volume is not None and volume < 1e-8:
                raise ValueError("DeNSCalculator: the periodic cell is degenerate (zero volume)")
            if pbc.all():
                heights = volume / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
                thin = [int(k) for k in range(3) if heights[k] < self.min_cell_height]
                if thin:
                    raise ValueError(
                        f"DeNSCalculator: the periodic cell is too small: its width along axis/axes {thin} is "
                        f"{', '.join(f'{heights[k]:.3f}' for k in thin)} Å, below min_cell_height="
                        f"{self.min_cell_height} Å (periodic images would overlap the atoms)"
                    )

    def calculate(
        self,
        atoms: ase.Atoms | None = None,
        properties: list[str] | tuple[str, ...] = ("energy",),
        system_changes: list[str] = all_changes,
    ) -> None:
        """Energy (eV), forces (eV/Å) and, for periodic structures, stress (eV/Å³, ASE's sign and Voigt
        order) of ``atoms`` (the graph is rebuilt for the current positions). Stress comes from the
        model's stress head, or for gradient-force models (Equiformer) as the conservative
        ``(1/V) dE/d strain`` when asked for; a direct-force model without a stress head has none."""
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        self.check_atoms(atoms)
        structure = make_structure(
            pos=np.asarray(atoms.positions, dtype=np.float64),
            atomic_numbers=atoms.numbers,
            cell=np.asarray(atoms.cell.array, dtype=np.float64),
            pbc=np.asarray(atoms.pbc, dtype=bool),
            tags=atoms.get_tags(),
            dtype=self.dtype,
        )
        batch = collate([structure]).to(self.device)
        force_field = self.model if isinstance(self.model, ForceField) else None
        if force_field is not None:
            cutoff = force_field.cutoff
            edge_index, offsets = radius_graph_pbc(
                batch.pos, batch.cell, batch.pbc, batch.batch, float(cutoff), force_field.max_neighbors,
                force_field.strict_max_neighbors, natoms=batch.natoms,
            )  # fmt: skip
            batch.edge_index, batch.cell_offsets = edge_index, offsets
            self.num_edges = int(edge_index.shape[1])
            degree = torch.bincount(edge_index[1], minlength=batch.num_atoms)
            if self.warn_isolated and not self._warned_isolated and bool((degree == 0).any()):
                lonely = torch.nonzero(degree == 0).flatten().tolist()
                logger.warning(
                    "DeNSCalculator: atom(s) %s have no neighbour within the %.2f Å cutoff; they contribute "
                    "the model's isolated-atom energy and zero force",
                    lonely[:10],
                    float(cutoff),
                )
                self._warned_isolated = True
        if not self._warned_direct and force_field is not None and force_field.direct_forces:
            warnings.warn(
                "DeNSCalculator: this model predicts forces directly (not as -dE/dx): they are not "
                "conservative, so NVE molecular dynamics drifts in energy; prefer a thermostat (NVT), short "
                "runs or a gradient-force model (Equiformer) for energy-conserving MD",
                DirectForcesWarning,
                stacklevel=2,
            )
            self._warned_direct = True
        out = self._predict(batch, "stress" in properties)
        energy = float(out["energy"].detach().reshape(-1)[0])
        forces = out["forces"].detach().to(torch.float64).cpu().numpy()
        self.results = {"energy": energy, "free_energy": energy, "forces": forces}
        if "stress" in properties and not np.asarray(atoms.pbc).all():
            raise ValueError("DeNSCalculator: stress needs a structure periodic along all three axes")
        if "stress" in out and np.asarray(atoms.pbc).all():
            stress = out["stress"].detach().to(torch.float64).cpu().numpy()[0]
            # ASE's Voigt order xx, yy, zz, yz, xz, xy (eV/Å³, ASE's sign)
            self.results["stress"] = stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]

    def _predict(self, batch: Any, want_stress: bool) -> dict[str, Any]:
        """The model's predictions; stress when asked for and the model gives it (a stress head, or
        gradient forces: the conservative stress), or always when it comes at no cost (a stress head)."""
        predict = self.model.predict
        if not isinstance(self.model, ForceField):
            return predict(batch)
        has_head, can_strain = self.model.has_stress_head, not self.model.direct_forces
        if has_head or (want_stress and can_strain):
            return predict(batch, stress=True)
        return predict(batch)
