"""Batched L-BFGS relaxations: convergence, fixed atoms, independence, ASE parity, OOM halving, resuming."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.optimize import LBFGS
from inference_helpers import tiny_force_field

from dens.data import atoms_to_structure, make_structure
from dens.relax import (
    RELAX_PRESETS,
    AsePotential,
    HarmonicPotential,
    RelaxSettings,
    is2re_metrics,
    relax,
    relax_dataset,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _slab(height: float):
    atoms = fcc111("Cu", (2, 2, 3), vacuum=6.0)
    add_adsorbate(atoms, "O", height, "fcc")
    atoms.set_constraint(FixAtoms(indices=[a.index for a in atoms if a.tag == 3]))  # bottom layer fixed
    return atoms


def test_presets_match_official_settings():
    assert RELAX_PRESETS["oc20_2m"] == RelaxSettings(fmax=0.05, steps=200, maxstep=0.04, memory=50, damping=1.0,
                                                     alpha=70.0)  # fmt: skip
    for name in ("oc20_all", "oc22"):
        p = RELAX_PRESETS[name]
        assert (p.fmax, p.steps, p.maxstep, p.damping, p.alpha) == (0.02, 300, 0.2, 1.2, 80.0)
    assert RelaxSettings.preset("oc20_2m", steps=5).steps == 5
    with pytest.raises(KeyError, match="unknown relaxation preset"):
        RelaxSettings.preset("nope")


def test_emt_relaxation_reaches_fmax_holds_fixed_atoms_and_matches_ase():
    atoms = _slab(1.6)
    s = atoms_to_structure(atoms, dtype=torch.float64)
    (res,) = relax([s], AsePotential(EMT()), "oc20_2m")
    assert res.converged and res.fmax < 0.05 and 0 < res.steps < 200
    fixed = s["fixed"].numpy()
    assert fixed.sum() == 4
    np.testing.assert_allclose(res.pos[fixed], atoms.positions[fixed], atol=0)
    assert res.energies[-1] == pytest.approx(res.energy) and res.energy < res.energies[0]
    # ASE's own LBFGS with the same settings takes the same path (same steps, same energy)
    ref = _slab(1.6)
    ref.calc = EMT()
    opt = LBFGS(ref, maxstep=0.04, memory=50, damping=1.0, alpha=70.0, logfile=None)
    opt.run(fmax=0.05, steps=200)
    assert opt.get_number_of_steps() == res.steps
    assert ref.get_potential_energy() == pytest.approx(res.energy, abs=1e-8)
    np.testing.assert_allclose(ref.positions, res.pos, atol=1e-8)


def test_structures_relax_independently_in_a_batch():
    structs = [atoms_to_structure(_slab(h), dtype=torch.float64, sid=i) for i, h in enumerate((1.2, 2.2))]
    structs.append(
        make_structure([[0.0, 0, 0], [1.7, 0, 0], [0, 1.2, 0]], [1, 1, 1], sid=9, dtype=torch.float64)
    )

    class Mixed:
        """EMT for the slabs, springs for the toy molecule: any per-structure potential works."""

        def __init__(self):
            self.emt, self.spring = AsePotential(EMT()), HarmonicPotential(k=3.0, r0=1.0)

        def predict(self, batch):
            outs = []
            for b in range(batch.num_graphs):
                from dens.relax import select_structures

                keep = torch.zeros(batch.num_graphs, dtype=torch.bool)
                keep[b] = True
                sub = select_structures(batch, keep)
                pot = self.spring if int(sub.atomic_numbers[0]) == 1 else self.emt
                outs.append(pot.predict(sub))
            return {
                "energy": torch.cat([o["energy"] for o in outs]),
                "forces": torch.cat([o["forces"] for o in outs]),
            }

    together = relax(structs, Mixed(), RelaxSettings(fmax=0.01, steps=300, maxstep=0.1))
    assert [r.id for r in together] == ["0", "1", "9"]
    steps = [r.steps for r in together]
    assert len(set(steps)) > 1  # each converged on its own schedule
    for s, r in zip(structs, together, strict=True):
        (alone,) = relax([s], Mixed(), RelaxSettings(fmax=0.01, steps=300, maxstep=0.1))
        assert alone.steps == r.steps and r.converged
        np.testing.assert_allclose(alone.pos, r.pos, atol=1e-10)
        assert alone.energy == pytest.approx(r.energy, abs=1e-10)


def test_harmonic_known_minimum_and_step_limit():
    s = make_structure([[0.0, 0, 0], [2.0, 0, 0]], [1, 1], dtype=torch.float64)
    (r,) = relax([s], HarmonicPotential(k=1.0, r0=1.0), RelaxSettings(fmax=1e-6, steps=100, maxstep=0.04))
    assert r.converged and np.linalg.norm(r.pos[1] - r.pos[0]) == pytest.approx(1.0, abs=1e-6)
    # the first move is F / alpha (1/70 Å here) ...
    (one,) = relax([s], HarmonicPotential(k=1.0, r0=1.0), RelaxSettings(fmax=1e-6, steps=1, maxstep=0.04))
    assert np.abs(one.pos - s["pos"].numpy()).max() == pytest.approx(1 / 70)
    # ... and maxstep bounds it (alpha = 1 would move 1 Å), times damping
    settings = RelaxSettings(fmax=1e-6, steps=1, maxstep=0.04, alpha=1.0, damping=1.5)
    (one,) = relax([s], HarmonicPotential(k=1.0, r0=1.0), settings)
    assert one.steps == 1 and not one.converged
    assert np.abs(one.pos - s["pos"].numpy()).max() == pytest.approx(0.06)


def test_relax_tiny_force_field_holds_fixed_atoms():
    atoms = _slab(1.8)
    s = atoms_to_structure(atoms, dtype=torch.float64)
    model = tiny_force_field(direct_forces=True)
    (r,) = relax([s], model, RelaxSettings(fmax=1e-3, steps=3))
    assert r.steps == 3 and np.isfinite(r.energy)
    fixed = s["fixed"].numpy()
    np.testing.assert_array_equal(r.pos[fixed], s["pos"].numpy()[fixed])
    assert np.abs(r.pos[~fixed] - s["pos"].numpy()[~fixed]).max() > 0


def _dataset(n: int):
    out = []
    rng = np.random.default_rng(0)
    for i in range(n):
        pos = rng.normal(size=(3, 3)) * 0.3 + np.array([[0, 0, 0], [1.2, 0, 0], [0, 1.2, 0]])
        out.append(make_structure(pos, [1, 1, 1], sid=100 + i, dtype=torch.float64, energy_relaxed=0.01 * i))
    return out


class _OOMPotential(HarmonicPotential):
    """Runs out of "device memory" for batches of more than ``limit`` structures."""

    def __init__(self, limit: int):
        super().__init__(k=2.0, r0=1.0)
        self.limit = limit
        self.sizes: list[int] = []

    def predict(self, batch):
        self.sizes.append(batch.num_graphs)
        if batch.num_graphs > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return super().predict(batch)


def test_out_of_memory_halves_the_batch(tmp_path):
    pot = _OOMPotential(limit=2)
    summary = relax_dataset(pot, _dataset(7), tmp_path, RelaxSettings(fmax=1e-3, steps=200, maxstep=0.1),
                            batch_size=8, chunk_size=7)  # fmt: skip
    assert summary["batch_size"] == 2 and summary["structures"] == 7 and summary["converged"] == 1.0
    assert pot.sizes[:3] == [7, 4, 2] and max(pot.sizes[3:]) <= 2
    with pytest.raises(ValueError, match="boom"):

        class Broken(HarmonicPotential):
            def predict(self, batch):
                raise ValueError("boom")  # not a memory error: re-raised as is

        relax_dataset(Broken(), _dataset(2), tmp_path / "b", batch_size=2)


def test_resume_skips_finished_ids_and_writes_is2re_files(tmp_path):
    data = _dataset(6)
    settings = RelaxSettings(fmax=1e-3, steps=200, maxstep=0.1)

    class Interrupt(HarmonicPotential):
        def predict(self, batch):
            if self.structures >= 40:  # dies part-way through the split
                raise KeyboardInterrupt
            return super().predict(batch)

    with pytest.raises(KeyboardInterrupt):
        relax_dataset(Interrupt(k=2.0, r0=1.0), data, tmp_path, settings, batch_size=2, chunk_size=2)
    parts = sorted((tmp_path / "parts").glob("part_*.npz"))
    assert 1 <= len(parts) < 3
    done = {i for p in parts for i in np.load(p)["ids"].tolist()}

    pot = HarmonicPotential(k=2.0, r0=1.0)
    seen: list[str] = []
    original = pot.predict

    def spy(batch):
        seen.extend(str(int(s)) for s in batch.sid)
        return original(batch)

    pot.predict = spy
    summary = relax_dataset(pot, data, tmp_path, settings, batch_size=2, chunk_size=2)
    assert summary["skipped"] == len(done) and summary["relaxed"] == 6 - len(done)
    assert not done & set(seen)
    pred = np.load(tmp_path / "is2re_predictions.npz")
    assert pred["ids"].tolist() == [str(100 + i) for i in range(6)]
    pos = np.load(tmp_path / "relaxed_positions.npz")
    assert [len(p) for p in np.split(pos["pos"], pos["chunk_idx"])] == [3] * 6
    saved = json.loads((tmp_path / "summary.json").read_text())
    # harmonic triangle with r0 = 1: relaxed energy k/2 * 3 * 0 ... the minimum is an equilateral triangle (E=0)
    expected = is2re_metrics(np.zeros(6), [0.01 * i for i in range(6)])
    assert saved["metrics"]["energy_mae"] == pytest.approx(expected["energy_mae"], abs=1e-3)
    # a third run has nothing left to do
    again = relax_dataset(pot, data, tmp_path, settings, batch_size=2, chunk_size=2)
    assert again["relaxed"] == 0 and again["skipped"] == 6


def test_is2re_metrics_hand_computed():
    m = is2re_metrics([0.0, 1.0, 2.0, 3.0], [0.01, 1.03, 2.0, 2.5])
    assert m["energy_mae"] == pytest.approx(1000 * (0.01 + 0.03 + 0 + 0.5) / 4)
    assert m["ewt"] == pytest.approx(50.0)
