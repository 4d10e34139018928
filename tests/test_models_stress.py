"""Stress: the rank-2 heads, the conservative stress of gradient-force models, the calculator's stress."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.emt import EMT

from dens.calculator import DeNSCalculator
from dens.data import collate, make_structure
from dens.models import EquiformerV2, ForceField
from dens.models.stress import (
    EquivariantRank2Head,
    assemble_stress,
    decompose_stress,
    stress_from_voigt,
    stress_to_voigt,
)
from dens.testing import random_rotation, rotate

F64 = torch.float64


def crystal(repeat=(1, 1, 1), seed=0):
    """A rattled, sheared fcc Cu cell (4 atoms), optionally repeated."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    shear = np.array([[0.02, 0.03, 0.0], [0.0, -0.01, 0.04], [0.01, 0.0, 0.03]])
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + shear).T, scale_atoms=True)
    atoms.rattle(0.1, seed=seed)
    atoms.numbers[1] = 29 - 1  # two elements
    return atoms.repeat(repeat)


def batch_of(atoms, rotation=None):
    pos, cell = atoms.positions, atoms.cell.array
    if rotation is not None:
        pos, cell = pos @ rotation.T, cell @ rotation.T
    return collate([make_structure(pos, atoms.numbers, cell=cell, pbc=True, dtype=F64)])


def tiny_v2(seed=0, **kwargs):
    torch.manual_seed(seed)
    backbone = EquiformerV2(num_layers=1, lmax=2, mmax=2, sphere_channels=8, attn_hidden_channels=8, num_heads=2,
                            attn_alpha_channels=4, attn_value_channels=4, ffn_hidden_channels=8, edge_channels=8,
                            grid_resolution=12, cutoff=4.0, num_distance_basis=16, **kwargs)  # fmt: skip
    with torch.no_grad():  # non-trivial biases and norms, as trained weights have
        for name, p in backbone.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return backbone.to(F64).eval()


def test_voigt_and_decomposition_round_trip():
    s = torch.randn(4, 3, 3, dtype=F64)
    s = s + s.transpose(1, 2)
    assert torch.allclose(stress_from_voigt(stress_to_voigt(s)), s)
    assert torch.allclose(assemble_stress(*decompose_stress(s)), s)
    assert stress_to_voigt(s)[0, 3] == s[0, 1, 2] and stress_to_voigt(s)[0, 5] == s[0, 0, 1]


def test_equivariant_head_rotates_exactly():
    torch.manual_seed(0)
    head = EquivariantRank2Head(6).to(F64)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(7, 16, 6, dtype=F64)  # lmax 3 features
    batch = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    R = random_rotation(dtype=F64)
    edge_vec, edge_index = torch.zeros(0, 3, dtype=F64), torch.zeros(2, 0, dtype=torch.long)
    a = head(x, edge_vec, edge_index, batch, 2)
    b = head(rotate(x, R, 3), edge_vec, edge_index, batch, 2)
    s_a = assemble_stress(a["stress_isotropic"], a["stress_anisotropic"])
    s_b = assemble_stress(b["stress_isotropic"], b["stress_anisotropic"])
    assert torch.allclose(s_b, R @ s_a @ R.T, atol=1e-12 * s_a.abs().max().item())
    zero = head(x, edge_vec, edge_index, batch, 2, denoising=True)
    assert zero["stress_isotropic"].abs().max() > 0  # use_denoising=True: trained on DeNS batches too
    head.use_denoising = False
    zero = head(x, edge_vec, edge_index, batch, 2, denoising=True)
    assert zero["stress_isotropic"].abs().max() == 0 and zero["stress_anisotropic"].abs().max() == 0


@pytest.mark.parametrize("kind", ["equivariant", "fairchem"])
def test_model_stress_under_rotation(kind, one_thread):
    """dens's head gives R S R^T (to the backbone's grid-aliasing level); fairchem's does not."""
    model = ForceField(tiny_v2(stress_head=kind), cutoff=4.0, max_neighbors=None)
    atoms = crystal()
    R = random_rotation(dtype=F64, generator=torch.Generator().manual_seed(3))
    s = model.predict(batch_of(atoms))["stress"][0]
    s_rot = model.predict(batch_of(atoms, R.numpy()))["stress"][0]
    err = ((s_rot - R @ s @ R.T).abs().max() / s.abs().max()).item()
    if kind == "equivariant":
        assert err < 1e-5, err  # measured 1.1e-7
    else:  # the component-wise l = 2 MLP breaks equivariance (documented; fixtures: 33-100 %)
        assert err > 1e-2, err  # measured 1.4


def _strained(atoms, eps):
    out = atoms.copy()
    out.set_cell(atoms.cell.array @ (np.eye(3) + eps).T, scale_atoms=True)
    return out


def _fd_stress(energy, atoms, h=1e-5):
    volume = atoms.get_volume()
    out = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            eps = np.zeros((3, 3))
            eps[i, j] += h / 2
            eps[j, i] += h / 2
            out[i, j] = (energy(_strained(atoms, eps)) - energy(_strained(atoms, -eps))) / (2 * h * volume)
    return out


def test_ase_sign_convention_is_the_strain_derivative():
    atoms = crystal()
    atoms.calc = EMT()

    def emt_energy(a):
        a.calc = EMT()
        return a.get_potential_energy()

    fd = _fd_stress(emt_energy, atoms)
    assert np.allclose(atoms.get_stress(voigt=False), fd, atol=1e-6)


def _tiny_equiformer():
    from dens.models import Equiformer

    torch.manual_seed(0)
    model = Equiformer(
        irreps_node_embedding="8x0e+4x1e+4x2e", num_layers=1, irreps_sh="1x0e+1x1e+1x2e", max_radius=4.0,
        number_of_basis=8, fc_neurons=[8], irreps_feature="16x0e", irreps_head="4x0e+2x1e+2x2e", num_heads=2,
        irreps_mlp_mid="16x0e+8x1e+8x2e",
    )  # fmt: skip
    return model.to(F64).eval()


@pytest.mark.parametrize("which", ["equiformer", "equiformer_v2"])
def test_conservative_stress_matches_finite_differences(which, one_thread):
    backbone = _tiny_equiformer() if which == "equiformer" else tiny_v2(direct_forces=False)
    model = ForceField(
        backbone, cutoff=4.0, max_neighbors=None, energy_std=1.7, force_std=1.7, energy_mean=-3.0
    )
    atoms = crystal()
    out = model.predict(batch_of(atoms), stress=True)
    stress = out["stress"][0].numpy()
    assert np.allclose(stress, stress.T)
    fd = _fd_stress(lambda a: float(model.predict(batch_of(a))["energy"][0]), atoms)
    assert np.abs(stress - fd).max() <= 1e-6 * np.abs(fd).max() + 1e-10, (stress, fd)
    # the supercell has the same stress (intensive) and energy per atom
    big = model.predict(batch_of(crystal((2, 1, 2))), stress=True)
    assert torch.allclose(big["stress"][0], out["stress"][0], atol=1e-10 * np.abs(fd).max())
    R = random_rotation(dtype=F64, generator=torch.Generator().manual_seed(1))
    rot = model.predict(batch_of(atoms, R.numpy()), stress=True)["stress"][0]
    expected = R @ out["stress"][0] @ R.T
    assert (rot - expected).abs().max() <= 1e-6 * expected.abs().max() + 1e-12


@pytest.mark.parametrize("kind", ["equivariant", "fairchem"])
def test_head_stress_of_a_supercell(kind, one_thread):
    model = ForceField(tiny_v2(stress_head=kind), cutoff=4.0, max_neighbors=None, stress_isotropic_std=0.1,
                       stress_anisotropic_std=0.05, stress_isotropic_mean=0.01)  # fmt: skip
    atoms = crystal()
    s = model.predict(batch_of(atoms))["stress"][0]
    s_big = model.predict(batch_of(atoms.repeat((1, 2, 2))))["stress"][0]
    assert torch.allclose(s_big, s, atol=1e-10 * s.abs().max().item())


def test_calculator_stress(one_thread):
    atoms = crystal()
    head = ForceField(tiny_v2(stress_head="equivariant"), cutoff=4.0, max_neighbors=20)
    atoms.calc = DeNSCalculator(head)
    expected = head.predict(batch_of(atoms))["stress"][0]
    assert np.allclose(
        atoms.get_stress(voigt=False), expected.numpy(), atol=1e-6 * expected.abs().max().item()
    )
    assert atoms.get_stress().shape == (6,)

    gradient = ForceField(tiny_v2(direct_forces=False), cutoff=4.0, max_neighbors=20)
    atoms.calc = DeNSCalculator(gradient)
    expected = gradient.predict(batch_of(atoms), stress=True)["stress"][0]
    assert np.allclose(
        atoms.get_stress(voigt=False), expected.numpy(), atol=1e-6 * expected.abs().max().item()
    )

    atoms.calc = DeNSCalculator(ForceField(tiny_v2(), cutoff=4.0, max_neighbors=20))
    atoms.get_forces()
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()


@pytest.mark.parametrize("use_denoising", [True, False])
def test_stress_on_dens_batches(use_denoising, one_thread):
    """A DeNS forward (force encoding given) zeroes the stress only with use_denoising=False (fairchem)."""
    backbone = tiny_v2(stress_head="equivariant", dens_heads=True, stress_use_denoising=use_denoising)
    model = ForceField(backbone, cutoff=4.0, max_neighbors=None)
    batch = batch_of(crystal())
    forces = torch.randn(batch.num_atoms, 3, dtype=F64)
    with torch.no_grad():
        clean = model(batch)
        noisy = model(batch, encoded_forces=forces, encode_mask=torch.ones(batch.num_atoms, dtype=torch.bool))
    assert clean["stress_isotropic"].abs().max() > 0
    zeroed = noisy["stress_isotropic"].abs().max() == 0 and noisy["stress_anisotropic"].abs().max() == 0
    assert zeroed is not use_denoising


def test_conservative_stress_needs_a_periodic_cell():
    model = ForceField(tiny_v2(direct_forces=False), cutoff=4.0)
    molecule = collate([make_structure(torch.randn(3, 3, dtype=F64), [29, 29, 28], dtype=F64)])
    with pytest.raises(ValueError, match="periodic"):
        model.predict(molecule, stress=True)
