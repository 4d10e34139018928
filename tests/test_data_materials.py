"""Stress / virial labels in ASE files and databases, OMat24-style .aselmdb, the MPtrj JSON converter, and
the stress loss."""

from __future__ import annotations

import json

import ase.db
import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.units import GPa

from dens.data import collate, open_dataset
from dens.data.ase_io import AseLmdbDataset, read_ase_file, structure_to_atoms, write_aselmdb
from dens.data.materials import convert_mptrj, mptrj_frames, stress_tensor
from dens.losses.stress import (
    StressLossSettings,
    energy_per_atom_errors,
    fit_stress_normalizer,
    stress_errors,
    stress_loss,
)
from dens.models.stress import assemble_stress, decompose_stress


def emt_frames(n=3):
    frames = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.6 + 0.05 * k, cubic=True)
        atoms.rattle(0.05, seed=k)
        atoms.calc = EMT()
        atoms.get_potential_energy(), atoms.get_stress()
        frames.append(atoms)
    return frames


@pytest.mark.parametrize("suffix", ["extxyz", "traj", "db"])
def test_stress_from_ase_files(tmp_path, suffix):
    frames = emt_frames()
    path = tmp_path / f"frames.{suffix}"
    if suffix == "db":
        with ase.db.connect(path) as db:
            for atoms in frames:
                db.write(atoms)
    else:
        ase.io.write(path, frames)
    structures = read_ase_file(path)
    for s, atoms in zip(structures, frames, strict=True):
        assert s["stress"].shape == (1, 3, 3) and s["stress"].dtype == torch.float64
        assert np.allclose(s["stress"][0].numpy(), atoms.get_stress(voigt=False), atol=1e-10)
    batch = collate(structures)
    assert batch.extra["stress"].shape == (3, 1, 3, 3)
    # and back: structure_to_atoms keeps the stress as a calculator result
    again = structure_to_atoms(structures[0])
    assert np.allclose(again.get_stress(voigt=False), frames[0].get_stress(voigt=False))


def test_virial_and_units_in_extxyz(tmp_path):
    atoms = emt_frames(1)[0]
    stress = atoms.get_stress(voigt=False)
    plain = atoms.copy()
    plain.info["energy"] = atoms.get_potential_energy()
    plain.info["virial"] = -stress * atoms.get_volume()  # W = -V sigma (eV)
    path = tmp_path / "virial.extxyz"
    ase.io.write(path, plain)
    s = read_ase_file(path)[0]
    assert np.allclose(s["stress"][0].numpy(), stress, atol=1e-12)
    # a file in meV: stress scales as energy / length^3
    plain.info.pop("virial")
    plain.info["stress"] = stress.reshape(9) * 1000
    ase.io.write(path, plain)
    s = read_ase_file(path, energy_unit="meV")[0]
    assert np.allclose(s["stress"][0].numpy(), stress, atol=1e-12)


def test_stress_key_names_the_field(tmp_path):
    """MACE-style ``REF_stress`` is read when named (``--stress-key``); a frame without it is named."""
    atoms = emt_frames(1)[0]
    stress = atoms.get_stress(voigt=False)
    plain = atoms.copy()
    plain.info["energy"] = atoms.get_potential_energy()
    plain.arrays["forces"] = atoms.get_forces()
    plain.info["REF_stress"] = atoms.get_stress(voigt=True)  # Voigt, ASE order
    plain.info["stress"] = np.zeros(9)  # a different field that the key must win over
    path = tmp_path / "ref.extxyz"
    ase.io.write(path, plain)
    s = open_dataset(path, stress_key="REF_stress")[0]
    assert np.allclose(s["stress"][0].numpy(), stress, atol=1e-12)
    assert np.allclose(read_ase_file(path)[0]["stress"][0].numpy(), 0.0)
    with pytest.raises(ValueError, match=r"ref.extxyz, frame 0: no stress label 'DFT_stress'"):
        read_ase_file(path, stress_key="DFT_stress")


def test_bad_stress_shape_is_named():
    with pytest.raises(ValueError, match=r"info\['stress'\]: expected Voigt"):
        stress_tensor(np.zeros(4), "info['stress']")


def test_aselmdb_keeps_voigt_stress(tmp_path):
    frames = emt_frames()
    path = tmp_path / "omat.aselmdb"
    assert write_aselmdb(frames, path) == 3
    dataset = AseLmdbDataset(path)
    for k, atoms in enumerate(frames):
        assert np.allclose(dataset[k]["stress"][0].numpy(), atoms.get_stress(voigt=False), atol=1e-10)


def mptrj_json():
    atoms = emt_frames(2)
    data = {"mp-1": {}}
    for k, a in enumerate(atoms):
        data["mp-1"][f"mp-1-{k}-0"] = {
            "structure": {
                "@module": "pymatgen.core.structure",
                "lattice": {"matrix": a.cell.array.tolist()},
                "sites": [
                    {"species": [{"element": sym, "occu": 1}], "xyz": p.tolist(), "abc": f.tolist()}
                    for sym, p, f in zip(
                        a.get_chemical_symbols(), a.positions, a.get_scaled_positions(), strict=True
                    )
                ],
            },
            "uncorrected_total_energy": a.get_potential_energy(),
            "corrected_total_energy": a.get_potential_energy() - 1.0,
            "force": a.get_forces().tolist(),
            # VASP's convention: kBar, positive under compression
            "stress": (-a.get_stress(voigt=False) / GPa * 10).tolist(),
            "mp_id": "mp-1",
        }
    return data, atoms


def test_mptrj_converter(tmp_path):
    data, atoms = mptrj_json()
    frames = list(mptrj_frames(data))
    assert [f.info["fid"] for f in frames] == ["mp-1-0-0", "mp-1-1-0"]
    for f, a in zip(frames, atoms, strict=True):
        assert np.allclose(f.get_stress(voigt=False), a.get_stress(voigt=False), atol=1e-12)
        assert np.allclose(f.positions, a.positions) and f.get_potential_energy() == a.get_potential_energy()
    corrected = next(mptrj_frames(data, energy_key="corrected_total_energy"))
    assert corrected.get_potential_energy() == pytest.approx(atoms[0].get_potential_energy() - 1.0)
    path = tmp_path / "mptrj.json"
    path.write_text(json.dumps(data))
    assert convert_mptrj(path, tmp_path / "mptrj.aselmdb") == 2
    s = AseLmdbDataset(tmp_path / "mptrj.aselmdb")[1]
    assert np.allclose(s["stress"][0].numpy(), atoms[1].get_stress(voigt=False), atol=1e-10)
    assert s["sid"] == "mp-1"


def test_stress_loss_and_dens_targets():
    torch.manual_seed(0)
    labels = torch.randn(4, 3, 3, dtype=torch.float64) * 0.01
    labels = labels + labels.transpose(1, 2)
    norm = fit_stress_normalizer(labels)
    settings = StressLossSettings(coefficient=2.0, **norm)
    iso, aniso = decompose_stress(labels)
    perfect = {
        "stress_isotropic": (iso - norm["isotropic_mean"]) / norm["isotropic_std"],
        "stress_anisotropic": (aniso - norm["anisotropic_mean"]) / norm["anisotropic_std"],
    }
    assert torch.allclose(assemble_stress(iso, aniso), labels)
    assert stress_loss(perfect, labels, settings).abs().item() < 1e-12
    off = {k: v + 0.5 for k, v in perfect.items()}
    errors = stress_errors(off, labels, settings)
    assert torch.allclose(errors, torch.full((4,), 0.5 + 0.5 * 5**0.5, dtype=torch.float64))
    assert torch.isclose(stress_loss(off, labels, settings), 2.0 * errors.mean())
    # DeNS: corrupted structures add no term ('skip', fairchem's MPtrj recipe) or regress to the clean label
    corrupted = torch.tensor([True, False, False, True])
    off["stress_isotropic"] = off["stress_isotropic"] + corrupted[:, None] * 10.0
    skip = stress_loss(off, labels, settings, corrupted)
    assert torch.isclose(skip, 2.0 * errors[~corrupted].mean())
    clean = stress_loss(
        off, labels, StressLossSettings(coefficient=2.0, on_corrupted="clean_target", **norm), corrupted
    )
    assert clean > skip
    # structures without a stress label (NaN) are left out
    labels[1] = float("nan")
    assert torch.isfinite(stress_loss(off, labels, settings))
    with pytest.raises(ValueError, match="on_corrupted"):
        StressLossSettings(on_corrupted="corrupted")


def test_energy_per_atom_errors():
    err = energy_per_atom_errors(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0], dtype=torch.float64),
                                 torch.tensor([2, 4]), mean=1.0, std=1.0)  # fmt: skip
    assert torch.allclose(err, torch.tensor([0.5, 0.25]))
