"""Cell relaxation with ASE's FrechetCellFilter + FIRE and a small dens model trained on EMT-labelled bulk
cells (energy per atom, forces and stress, with element references fitted by linear regression)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT

from dens.calculator import DeNSCalculator
from dens.cell_relax import relax_cell
from dens.data import collate, make_structure
from dens.data.normalize import fit_linear_reference
from dens.losses.s2ef import force_errors
from dens.losses.stress import StressLossSettings, energy_per_atom_errors, fit_stress_normalizer, stress_loss
from dens.models import EquiformerV2, ForceField


def emt_cell(rng: np.random.Generator):
    """A 4-atom fcc Cu cell, strained by up to +-4 % (normal) and +-2 % (shear), rattled by 0.02 Å."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    eps = np.diag(rng.uniform(-0.04, 0.04, 3))
    shear = rng.uniform(-0.02, 0.02, 3)
    eps[[1, 0, 2, 0, 2, 1], [2, 2, 0, 1, 1, 0]] = shear[[0, 1, 1, 2, 0, 2]]
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + eps).T, scale_atoms=True)
    atoms.rattle(0.02, seed=int(rng.integers(1 << 30)))
    atoms.calc = EMT()
    return make_structure(
        atoms.positions, atoms.numbers, cell=atoms.cell.array, pbc=True,
        energy=atoms.get_potential_energy(), forces=atoms.get_forces(), stress=atoms.get_stress(voigt=False)[None],
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained_model(one_thread):
    """A small EquiformerV2 with dens's equivariant stress head, trained for 250 steps (~20 s on one thread)."""
    rng = np.random.default_rng(0)
    data = [emt_cell(rng) for _ in range(48)]
    refs = fit_linear_reference(data, max_z=29)
    stress = torch.cat([s["stress"] for s in data]).to(torch.float64)
    norm = fit_stress_normalizer(stress)
    referenced = np.array([float(s["energy"]) - refs[29] * 4 for s in data])
    e_std = float(referenced.std())
    f_std = float(torch.cat([s["forces"] for s in data]).pow(2).mean().sqrt())
    torch.manual_seed(0)
    backbone = EquiformerV2(num_layers=1, lmax=2, mmax=2, sphere_channels=16, attn_hidden_channels=16, num_heads=2,
                            attn_alpha_channels=8, attn_value_channels=8, ffn_hidden_channels=16, edge_channels=16,
                            grid_resolution=10, cutoff=4.5, num_distance_basis=32, avg_num_nodes=4.0,
                            avg_degree=18.0, alpha_drop=0.0, drop_path_rate=0.0, stress_head="equivariant")  # fmt: skip
    model = ForceField(
        backbone, cutoff=4.5, max_neighbors=20, strict_max_neighbors=False, energy_mean=float(referenced.mean()),
        energy_std=e_std, force_std=f_std, element_references=refs,
        **{f"stress_{k}": v for k, v in norm.items()},
    )  # fmt: skip
    settings = StressLossSettings(coefficient=20.0, **norm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=250)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        idx = torch.randperm(len(data), generator=g)[:8].tolist()
        batch = collate([data[i] for i in idx])
        out = model(batch)
        energy = batch.energy - torch.as_tensor(refs)[batch.atomic_numbers].reshape(-1, 4).sum(1)
        loss = (
            energy_per_atom_errors(
                out["energy"], energy, batch.natoms, model.energy_mean.item(), e_std
            ).mean()
            + force_errors(out["forces"], batch.forces, f_std).mean()
            + stress_loss(out, batch.extra["stress"], settings)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def relaxed_lattice_constant(calc, fmax=0.01):
    atoms = bulk("Cu", "fcc", a=3.59 * 1.04, cubic=True)  # 4 % tensile strain and a 2 % shear
    atoms.set_cell(atoms.cell.array @ np.array([[1, 0.02, 0], [0.02, 1, 0], [0, 0, 1.0]]).T, scale_atoms=True)
    result = relax_cell(atoms, calc, fmax=fmax)  # Matbench Discovery: fmax 0.02; tighter here
    return result["volume"] ** (1 / 3), result["converged"], atoms


@pytest.mark.slow
def test_strained_crystal_relaxes_to_the_emt_lattice_constant(trained_model):
    a_emt, converged, _ = relaxed_lattice_constant(EMT())
    assert converged
    a_dens, converged, atoms = relaxed_lattice_constant(DeNSCalculator(trained_model))
    assert converged
    assert abs(a_dens - a_emt) / a_emt < 0.005, (a_dens, a_emt)
    # measured: a = 3.5916 Å (EMT: 3.5903 Å, 0.04 %). The shape is learned less well from 48 cells: the
    # shear relaxes away (angles 90.2-90.25°), the three lengths agree with EMT's to 1.2 %.
    lengths, angles = atoms.cell.cellpar()[:3], atoms.cell.cellpar()[3:]
    assert np.allclose(angles, 90.0, atol=0.5), angles
    assert np.abs(lengths / a_emt - 1).max() < 0.02, lengths


@pytest.mark.parametrize("module", ["dens.cell_relax", "dens.models.stress"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
