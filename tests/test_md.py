"""MD: integrators (NVE energy conservation, Nosé-Hoover temperature), batching, stability and h(r)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.io import read
from inference_helpers import tiny_force_field

from dens.data import atoms_to_structure, make_structure
from dens.md import (
    BatchedMD,
    BondReference,
    MDSettings,
    distance_histogram,
    find_bonds,
    hr_mae,
    simulate,
    stability_time,
)
from dens.relax import HarmonicPotential, RelaxSettings, relax

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def spring_ethanol():
    """Ethanol under all-pair springs (a smooth potential), relaxed to its minimum."""
    pot = HarmonicPotential(k=2.0, r0=1.5)
    s = atoms_to_structure(molecule("CH3CH2OH"), dtype=torch.float64)
    (r,) = relax([s], pot, RelaxSettings(fmax=1e-5, steps=1000, maxstep=0.1))
    return pot, {**s, "pos": torch.from_numpy(r.pos)}


# --------------------------------------------------------------------------------------------------
# metrics on synthetic trajectories with known answers
# --------------------------------------------------------------------------------------------------
def test_stability_time_known_answers():
    times = np.arange(5) * 0.1
    frames = np.zeros((5, 3, 3))
    frames[:, 1, 0] = 1.0
    frames[:, 2, 1] = 1.5
    bonds, lengths = np.array([[0, 1], [0, 2]]), np.array([1.0, 1.5])
    assert stability_time(frames, times, bonds, lengths) == pytest.approx(0.4)  # never unstable: full time
    frames[3:, 2, 1] = 2.01  # deviation 0.51 from frame 3
    assert stability_time(frames, times, bonds, lengths) == pytest.approx(0.3)
    frames[2, 1, 0] = 0.49  # deviation 0.51 (compressed) at frame 2
    assert stability_time(frames, times, bonds, lengths) == pytest.approx(0.2)
    frames[1, 0, 0] = np.nan  # a frame that blew up counts as unstable
    assert stability_time(frames, times, bonds, lengths) == pytest.approx(0.1)
    frames = np.zeros((2, 2, 3))
    frames[:, 1, 0] = [1.0, 1.5]  # exactly 0.5: still stable (strictly greater ends it)
    assert stability_time(frames, [0.0, 1.0], [[0, 1]], [1.0]) == 1.0


def test_bonds_and_reference_lengths(shared_dir):
    eth = molecule("CH3CH2OH")
    assert len(find_bonds(eth.numbers, eth.positions)) == 8  # C-C, C-O, O-H, 5 C-H
    frames = read(shared_dir / "data" / "md17" / "rmd17_ethanol_train0_1000_eV.xyz", ":50")
    pos = np.stack([a.positions for a in frames])
    ref = BondReference.from_frames(frames[0].numbers, pos)
    assert len(ref.bonds) == 8
    lengths = np.linalg.norm(pos[:, ref.bonds[:, 1]] - pos[:, ref.bonds[:, 0]], axis=-1).mean(0)
    np.testing.assert_allclose(ref.lengths, lengths)
    assert ((ref.lengths > 0.9) & (ref.lengths < 1.6)).all()
    # the reference data are stable with respect to themselves over all 50 frames
    assert stability_time(pos, np.arange(50) * 0.5, ref.bonds, ref.lengths) == 24.5


def test_distance_histogram_and_hr_mae_known_answers():
    one = np.array([[[0.0, 0, 0], [1.05, 0, 0]]])
    r, h = distance_histogram(one, r_max=10.0, bins=500)
    assert h.sum() * 0.02 == pytest.approx(1.0)
    assert r[np.argmax(h)] == pytest.approx(1.05, abs=0.01)
    far = np.array([[[0.0, 0, 0], [3.05, 0, 0]]])
    assert hr_mae(one, one) == 0.0
    assert hr_mae(one, far) == pytest.approx(2.0)  # disjoint distributions
    # half of the frames at 1.05 Å, half at 3.05 Å against all at 1.05 Å: half the mass moved -> 1.0
    mixed = np.concatenate([one, far])
    assert hr_mae(mixed, one) == pytest.approx(1.0)
    # triangle: three distances, one of them differs -> 2 * 1/3
    tri = np.array([[[0.0, 0, 0], [1.05, 0, 0], [0, 1.05, 0]]])
    tri2 = np.array([[[0.0, 0, 0], [1.05, 0, 0], [0, 2.05, 0]]])  # 1.05, 2.05, 2.31 vs 1.05, 1.05, 1.48
    assert hr_mae(tri, tri2) == pytest.approx(4.0 / 3.0)


# --------------------------------------------------------------------------------------------------
# integrators
# --------------------------------------------------------------------------------------------------
def test_nve_conserves_energy_with_second_order_drift(spring_ethanol):
    pot, s = spring_ethanol
    drifts = []
    for dt in (0.5, 0.25):
        settings = MDSettings(integrator="nve", temperature=300.0, timestep=dt, duration=0.5, save_every=10)
        (traj,) = simulate(pot, [s], settings)
        assert traj.stable and traj.steps == round(500 / dt)
        drifts.append(traj.energy_drift())
    # 0.5 ps of NVE at 300 K: the total energy stays within 1 meV (kinetic energy ~ 0.3 eV) ...
    assert drifts[0] < 1e-3
    # ... and the error is that of a second-order integrator (halving dt divides it by ~4)
    assert 3.0 < drifts[0] / drifts[1] < 5.0


def test_nose_hoover_holds_the_temperature(spring_ethanol):
    pot, s = spring_ethanol
    settings = MDSettings(temperature=500.0, timestep=0.5, duration=2.0, tdamp=20.0, save_every=5, seed=3)
    (traj,) = simulate(pot, [s], settings)
    assert traj.temperature[0] == pytest.approx(500.0)  # exact initial temperature
    assert abs(traj.temperature[len(traj.temperature) // 4 :].mean() - 500.0) < 60.0
    # the extended (Nosé-Hoover) energy is conserved
    assert traj.energy_drift() < 5e-3


def test_batched_simulations_equal_separate_ones(spring_ethanol):
    pot, s = spring_ethanol
    h2 = make_structure([[0.0, 0, 0], [1.6, 0, 0]], [1, 1], dtype=torch.float64)
    settings = MDSettings(timestep=0.5, duration=0.1, save_every=20)
    rng = np.random.default_rng(0)
    vels = [rng.normal(size=(9, 3)) * 0.01, rng.normal(size=(2, 3)) * 0.01]
    together = BatchedMD(pot, [s, h2], settings, velocities=vels).run()
    for k, item in enumerate([s, h2]):
        (alone,) = BatchedMD(pot, [item], settings, velocities=[vels[k]]).run()
        np.testing.assert_allclose(alone.positions, together[k].positions, atol=1e-6)
        np.testing.assert_allclose(alone.conserved, together[k].conserved, atol=1e-10)


def test_unstable_simulation_stops_while_others_continue(spring_ethanol):
    pot, s = spring_ethanol
    good = BondReference.from_frames(s["atomic_numbers"].numpy(), s["pos"].numpy()[None])
    bad = BondReference(good.bonds, good.lengths + 0.6)  # every bond is 0.6 Å off this reference
    settings = MDSettings(temperature=50.0, timestep=0.5, duration=0.05, save_every=10)  # cold: small motions
    t_good, t_bad = simulate(pot, [s, s], settings, references=[good, bad])
    assert t_good.stable and t_good.stability == pytest.approx(0.05) and t_good.steps == 100
    assert not t_bad.stable and t_bad.stability == pytest.approx(0.005) and t_bad.steps == 10
    assert len(t_bad.stable_positions()) == 1


def test_short_nve_run_with_a_tiny_equiformer_v2(shared_dir):
    """Gradient forces of a real model on a real MD17 geometry: the total energy is conserved."""
    atoms = read(shared_dir / "data" / "md17" / "sgdml_geometries" / "ethanol.xyz")
    s = atoms_to_structure(atoms, dtype=torch.float64)
    model = tiny_force_field(direct_forces=False, cutoff=6.0, max_neighbors=None)  # all pairs: smooth
    settings = MDSettings(integrator="nve", temperature=300.0, timestep=0.25, duration=0.01, save_every=5)
    (traj,) = simulate(model, [s], settings)
    assert traj.steps == 40 and traj.stable
    assert traj.energy_drift() < 1e-4
