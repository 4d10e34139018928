"""DeNSCalculator: agreement with the model, finite differences, ASE optimisers and MD, clear errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import add_adsorbate, fcc111, molecule
from ase.constraints import FixAtoms
from ase.io import read
from ase.md import thermalize_momenta
from ase.md.langevin import Langevin
from ase.md.nose_hoover_chain import NoseHooverChainNVT
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS, FIRE
from inference_helpers import tiny_force_field, write_checkpoint

from dens.calculator import DeNSCalculator, element_limit
from dens.data import atoms_to_structure, collate
from dens.data.batch import min_pair_distance

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def conservative():
    """Gradient forces, float64, all pairs of a small molecule inside the cutoff (a smooth energy)."""
    return tiny_force_field(direct_forces=False, cutoff=6.0, max_neighbors=None)


def _slab():
    atoms = fcc111("Cu", (2, 2, 3), vacuum=6.0)
    add_adsorbate(atoms, "O", 1.8, "fcc")
    atoms.set_constraint(FixAtoms(indices=[a.index for a in atoms if a.tag == 3]))
    return atoms


def test_agrees_with_direct_model_call_on_a_periodic_slab():
    model = tiny_force_field(direct_forces=True)
    atoms = _slab()
    atoms.calc = DeNSCalculator(model)
    e = atoms.get_potential_energy()
    f = atoms.get_forces(apply_constraint=False)
    out = model.predict(collate([atoms_to_structure(atoms, dtype=torch.float64)]))
    assert e == pytest.approx(float(out["energy"][0]), abs=1e-10)
    np.testing.assert_allclose(f, out["forces"].numpy(), atol=1e-10)
    # ASE applies FixAtoms itself
    fixed = atoms.constraints[0].index
    assert np.all(atoms.get_forces()[fixed] == 0) and np.abs(f[fixed]).max() > 0
    assert atoms.calc.num_edges > 0


def test_real_oc20_structure(shared_dir):
    atoms = read(shared_dir / "data" / "oc20" / "fairchem_test_atoms.json")
    model = tiny_force_field(direct_forces=True)
    atoms.calc = DeNSCalculator(model)
    f = atoms.get_forces(apply_constraint=False)
    out = model.predict(collate([atoms_to_structure(atoms, dtype=torch.float64)]))
    np.testing.assert_allclose(f, out["forces"].numpy(), atol=1e-10)


def test_forces_are_minus_energy_gradient(conservative):
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=1)
    calc = DeNSCalculator(conservative)
    atoms.calc = calc
    forces = atoms.get_forces()
    h = 1e-4
    for i, k in [(0, 0), (2, 1), (5, 2), (8, 0)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[i, k] += h
        minus.positions[i, k] -= h
        plus.calc = minus.calc = calc
        fd = -(plus.get_potential_energy() - minus.get_potential_energy()) / (2 * h)
        assert forces[i, k] == pytest.approx(fd, abs=1e-6, rel=1e-5)


def test_graph_is_rebuilt_when_atoms_move(conservative):
    model = tiny_force_field(direct_forces=True, cutoff=3.0)
    atoms = Atoms("H3", positions=[[0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])
    atoms.calc = DeNSCalculator(model)
    atoms.get_potential_energy()
    assert atoms.calc.num_edges == 6
    atoms.positions[2, 1] = 5.0  # now beyond the 3 Å cutoff of both others
    e_far = atoms.get_potential_energy()
    assert atoms.calc.num_edges == 2 and np.isfinite(e_far)


def test_ase_optimizers_respect_fixed_atoms():
    model = tiny_force_field(direct_forces=True)
    for opt_cls in (BFGS, FIRE):
        atoms = _slab()
        start = atoms.positions.copy()
        atoms.calc = DeNSCalculator(model)
        opt_cls(atoms, logfile=None).run(fmax=1e-3, steps=3)
        fixed = atoms.constraints[0].index
        np.testing.assert_array_equal(atoms.positions[fixed], start[fixed])
        assert np.abs(atoms.positions - start).max() > 0


def test_ase_md_integrators_run(conservative):
    atoms = molecule("CH3CH2OH")
    atoms.calc = DeNSCalculator(conservative)
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    e0 = atoms.get_total_energy()
    VelocityVerlet(atoms, timestep=0.25 * units.fs).run(8)
    assert abs(atoms.get_total_energy() - e0) < 1e-3
    Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.01 / units.fs, fixcm=False,
             rng=np.random.default_rng(0)).run(2)  # fmt: skip
    NoseHooverChainNVT(atoms, 0.5 * units.fs, temperature_K=500, tdamp=50 * units.fs).run(2)
    assert np.isfinite(atoms.positions).all()


def test_clear_errors_for_unknown_elements_and_tiny_cells(caplog):
    model = tiny_force_field(direct_forces=True)
    assert element_limit(model) == 90
    calc = DeNSCalculator(model)
    atoms = Atoms("HAm", positions=[[0, 0, 0], [0, 0, 2.0]])
    atoms.calc = calc
    with pytest.raises(ValueError, match=r"Am \(Z=95\).*max_num_elements=90"):
        atoms.get_potential_energy()
    thin = Atoms("H", positions=[[0, 0, 0]], cell=[3.0, 3.0, 0.2], pbc=True)
    thin.calc = calc
    with pytest.raises(ValueError, match="cell is too small"):
        thin.get_potential_energy()
    flat = Atoms("H", positions=[[0, 0, 0]], cell=[3.0, 3.0, 0.0], pbc=True)
    flat.calc = calc
    with pytest.raises(ValueError, match="lattice vector 2 is zero"):
        flat.get_potential_energy()
    # an atom without neighbours is allowed (logged once)
    lonely = Atoms("H3", positions=[[0, 0, 0], [0, 0, 0.8], [20.0, 0, 0]])
    lonely.calc = DeNSCalculator(model)
    with caplog.at_level(logging.WARNING, logger="dens.calculator"):
        assert np.isfinite(lonely.get_potential_energy())
    assert "no neighbour" in caplog.text


def test_from_checkpoint(tmp_path):
    model = tiny_force_field(direct_forces=True, double=False)
    ckpt = write_checkpoint(model, tmp_path / "best.pt", direct_forces=True)
    calc = DeNSCalculator.from_checkpoint(ckpt, device="cpu")
    atoms = molecule("H2O")
    atoms.calc = calc
    expected = model.predict(collate([atoms_to_structure(atoms)]))
    assert atoms.get_potential_energy() == pytest.approx(float(expected["energy"][0]), abs=1e-5)
    assert calc.dtype == torch.float32


def test_too_close_atoms_are_found_on_the_graph_without_comparing_all_pairs(monkeypatch):
    import dens.calculator as calculator

    measured = []  # the atoms handed to the exact all-pairs measure

    def counting(pos, cell=None, pbc=None):
        measured.append(pos.shape[0])
        return min_pair_distance(pos, cell, pbc)

    monkeypatch.setattr(calculator, "min_pair_distance", counting)
    model = tiny_force_field(direct_forces=True)
    pair = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.05]])  # an edge of the graph
    pair.calc = DeNSCalculator(model)
    with pytest.raises(ValueError, match=r"atoms 0 and 1 are 0\.0500 Å apart"):
        pair.get_potential_energy()
    same = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0]])  # no edge: the graph drops coincident atoms
    same.calc = DeNSCalculator(model)
    with pytest.raises(ValueError, match=r"atoms 0 and 1 are 0\.0000 Å apart"):
        same.get_potential_energy()
    image = Atoms("Cu2", positions=[[0, 0, 0], [2.99999, 0, 0]], cell=[3.0, 3.0, 3.0], pbc=True)
    image.calc = DeNSCalculator(model)
    with pytest.raises(ValueError, match=r"atoms 0 and 1 are 0\.0000 Å apart"):
        image.get_potential_energy()
    measured.clear()
    big = fcc111("Cu", (6, 6, 4), vacuum=6.0)  # 144 atoms
    big.calc = DeNSCalculator(model)
    assert np.isfinite(big.get_potential_energy())
    assert measured == []  # nothing measured over all pairs
    DeNSCalculator(model, min_distance=0.0).check_distances(torch.zeros(2, 3), None, None)  # disabled
