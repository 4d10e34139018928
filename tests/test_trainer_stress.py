"""Training with stress: the trainer's `materials` section (stress term, energy per atom), DeNS structures
(skipped or trained on the clean label), the stress normalisers, and `python -m dens.train` on an extxyz."""

from __future__ import annotations

import re

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from dens.data import collate
from dens.data.ase_io import atoms_to_structure
from dens.data.dataset import InMemoryDataset
from dens.losses import DeNSSettings, LossSettings, training_loss
from dens.losses.stress import (
    StressLossSettings,
    fit_stress_statistics,
    materials_settings,
    stress_errors,
    stress_term,
)
from dens.models import EquiformerV2, ForceField
from dens.trainer import OptimSettings, Trainer, TrainerSettings


def emt_atoms(n=8, seed=0):
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.set_cell(atoms.cell.array * (1 + rng.uniform(-0.03, 0.03, 3))[:, None], scale_atoms=True)
        atoms.rattle(0.03, seed=int(rng.integers(1000)))
        atoms.calc = EMT()
        atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        frames.append(atoms)
    return frames


def tiny(use_denoising=False, dens=True):
    torch.manual_seed(0)
    backbone = EquiformerV2(num_layers=1, lmax=2, mmax=2, sphere_channels=8, attn_hidden_channels=8, num_heads=2,
                            attn_alpha_channels=4, attn_value_channels=4, ffn_hidden_channels=8, edge_channels=8,
                            grid_resolution=8, num_distance_basis=16, cutoff=4.0, alpha_drop=0.0, drop_path_rate=0.0,
                            avg_num_nodes=4.0, avg_degree=16.0, dens_heads=dens, stress_head="equivariant",
                            stress_use_denoising=use_denoising)  # fmt: skip
    return backbone


@pytest.fixture(scope="module")
def dataset():
    return InMemoryDataset([atoms_to_structure(a) for a in emt_atoms()], source="emt")


def force_field(dataset, **kwargs):
    energies = np.array([float(dataset[i]["energy"]) for i in range(len(dataset))])
    return ForceField(tiny(**kwargs), cutoff=4.0, max_neighbors=16, energy_mean=float(energies.mean()),
                      energy_std=float(energies.std()), force_std=0.3, **fit_stress_statistics(dataset))  # fmt: skip


def make_trainer(tmp_path, model, dataset, materials, steps=30, dens=True, lr=5e-3):
    settings = TrainerSettings(run_dir=str(tmp_path), device="cpu", max_steps=steps, eval_every=1000,
                               checkpoint_every=1000, log_every=1, progress_bar=False, tensorboard=False,
                               deterministic=True, seed=0)  # fmt: skip
    optim = OptimSettings(
        batch_size=4,
        lr=lr,
        max_epochs=1000,
        warmup_epochs=0.0,
        ema_decay=None,
        energy_coefficient=1.0,
        force_coefficient=1.0,
    )
    return Trainer(model, dataset, None, optim, DeNSSettings(enabled=dens, prob=0.5), settings,
                   config={"materials": materials})  # fmt: skip


def test_trainer_trains_the_stress_term(tmp_path, dataset, one_thread):
    """Overfitting one batch of four cells (one batch, repeated): the stress term falls."""
    four = InMemoryDataset([dataset[i] for i in range(4)])
    model = force_field(four)
    trainer = make_trainer(tmp_path, model, four, {"stress_coefficient": 5.0, "energy_per_atom": True},
                           steps=40, dens=False, lr=1e-2)  # fmt: skip
    assert trainer.losses.energy_per_atom and trainer.stress.on_corrupted == "skip"
    trainer.fit()
    stress = [r["train/stress"] for r in trainer.history if "train/stress" in r]
    assert len(stress) == 40
    assert np.mean(stress[-5:]) < 0.5 * np.mean(stress[:5]), (stress[:5], stress[-5:])


def test_dens_structures_zeroed_and_skipped(dataset, one_thread):
    """use_denoising=False zeroes exactly the DeNS structures of a batch; 'skip' leaves them out of the term,
    'clean_target' regresses them to the clean label (refused with a zeroing head)."""
    model = force_field(dataset)
    batch = collate([dataset[i] for i in range(4)])
    corrupted = torch.tensor([True, False, True, False])
    with torch.no_grad():
        out = model(batch, denoising=corrupted)
    assert (out["stress_isotropic"][corrupted] == 0).all() and (
        out["stress_isotropic"][~corrupted] != 0
    ).all()
    settings = materials_settings(model, {"stress_coefficient": 1.0})
    term = stress_term(out, batch.extra["stress"], settings, corrupted, torch.tensor(4.0))
    errors = stress_errors(out, batch.extra["stress"].reshape(-1, 3, 3), settings)
    assert torch.isclose(term, errors[~corrupted].sum() / 4)
    with pytest.raises(ValueError, match="clean_target"):
        materials_settings(model, {"stress_coefficient": 1.0, "stress_on_corrupted": "clean_target"})
    trained = force_field(dataset, use_denoising=True)
    settings = materials_settings(trained, {"stress_coefficient": 1.0, "stress_on_corrupted": "clean_target"})
    with torch.no_grad():
        out = trained(batch, denoising=corrupted)
    term = stress_term(out, batch.extra["stress"], settings, corrupted, torch.tensor(4.0))
    assert torch.isclose(
        term, stress_errors(out, batch.extra["stress"].reshape(-1, 3, 3), settings).sum() / 4
    )


def test_materials_settings_errors(dataset):
    with pytest.raises(ValueError, match="unknown keys"):
        materials_settings(force_field(dataset), {"stress_coef": 1.0})
    plain = ForceField(EquiformerV2(num_layers=1, lmax=1, mmax=1, sphere_channels=4, attn_hidden_channels=4,
                                    num_heads=1, attn_alpha_channels=2, attn_value_channels=2, ffn_hidden_channels=4,
                                    edge_channels=4, grid_resolution=4, cutoff=4.0), cutoff=4.0)  # fmt: skip
    with pytest.raises(ValueError, match="stress head"):
        materials_settings(plain, {"stress_coefficient": 1.0})
    assert materials_settings(plain, {"energy_per_atom": True}) is None


def test_energy_per_atom_term(dataset):
    batch = collate([dataset[0], dataset[1]])
    out = {"energy": torch.zeros(2), "forces": torch.zeros(batch.num_atoms, 3)}
    dens = DeNSSettings(enabled=False)
    _, total = training_loss(out, batch, None, LossSettings(), dens, 0.0, 1.0, 1.0)
    _, per_atom = training_loss(out, batch, None, LossSettings(energy_per_atom=True), dens, 0.0, 1.0, 1.0)
    assert torch.isclose(per_atom["energy"], total["energy"] / 4, rtol=1e-6)


def test_dens_train_with_stress_on_an_extxyz(tmp_path, one_thread):
    from dens.train import build

    path = tmp_path / "cu.extxyz"
    ase.io.write(path, emt_atoms(6))
    overrides = [
        f"data.train.path={path}", "~data.val", f"trainer.run_dir={tmp_path / 'run'}", "trainer.max_steps=2",
        "trainer.device=cpu", "trainer.progress_bar=false", "trainer.tensorboard=false",
        "+model.backbone.stress_head=equivariant", "+model.backbone.stress_use_denoising=false",
        "+materials.stress_coefficient=1.0", "+materials.energy_per_atom=true", "optim.batch_size=2",
        "+materials.element_references=fit",
    ]  # fmt: skip
    with initialize_config_module("dens.conf", version_base=None):
        cfg = compose("train", overrides=overrides)
    trainer = build(cfg)
    norm = trainer.config["resolved_normalizer"]
    assert norm["stress_isotropic_std"] > 0 and trainer.stress is not None
    trainer.fit()
    assert any("train/stress" in r for r in trainer.history)
    model = ForceField.from_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert model.stress_normalizer[1].item() == pytest.approx(norm["stress_isotropic_std"])
    # element references fitted on the training set (Cu only: E / 4 per atom on average), added back by
    # predict; the training energies are referenced from then on
    refs = norm["element_references"]
    energies = [a.get_potential_energy() for a in ase.io.read(path, ":")]
    assert refs[29] == pytest.approx(np.mean(energies) / 4)
    assert model.element_references[29].item() == pytest.approx(refs[29])
    assert abs(norm["energy_mean"]) < 1e-9  # the normaliser saw the referenced energies (mean 0 here)


def test_mptrj_dens_s_experiment_trains_two_steps(tmp_path, one_thread):
    """`+experiment=mptrj_dens_s` with a tiny model on an extxyz of EMT cells (stress labels): two DeNS
    steps with the recipe's stress, per-atom energy, element-reference and normaliser settings."""
    from dens.train import build

    train, val = tmp_path / "train.extxyz", tmp_path / "val.extxyz"
    frames = emt_atoms(6, seed=1)
    ase.io.write(train, frames[:4])
    ase.io.write(val, frames[4:])
    tiny_model = dict(num_layers=1, lmax=2, mmax=2, sphere_channels=8, attn_hidden_channels=8, num_heads=2,
                      attn_alpha_channels=4, attn_value_channels=4, ffn_hidden_channels=8, edge_channels=8,
                      grid_resolution=8, num_distance_basis=16)  # fmt: skip
    overrides = [
        "experiment=mptrj_dens_s", f"data.train.path={train}", f"data.val.path={val}",
        f"trainer.run_dir={tmp_path / 'run'}", "trainer.max_steps=2", "trainer.device=cpu",
        "trainer.progress_bar=false", "trainer.tensorboard=false", "trainer.log_every=1", "optim.batch_size=2",
        "model.cutoff=5.0",
        "dens.prob=1.0", *(f"model.backbone.{k}={v}" for k, v in tiny_model.items()),
    ]  # fmt: skip
    with initialize_config_module("dens.conf", version_base=None):
        cfg = compose("train", overrides=overrides)
    trainer = build(cfg)
    assert trainer.dens.corrupt_ratio is None and trainer.stress.on_corrupted == "skip"
    assert trainer.losses.energy_per_atom and trainer.stress.coefficient == 5.0
    assert trainer.stress.anisotropic_error == "mae"
    norm = trainer.config["resolved_normalizer"]
    assert (norm["energy_mean"], norm["energy_std"]) == (0.0, 1.0)  # forces_rms: energies in eV
    forces = np.concatenate([a.get_forces() for a in frames[:4]])
    assert norm["force_std"] == pytest.approx(float(np.sqrt((forces**2).mean())))
    history = trainer.fit()
    steps = [r for r in trainer.history if "train/loss" in r]
    assert len(steps) == 2 and all(np.isfinite(r["train/loss"]) for r in steps)
    # every step is a DeNS batch (prob 1) and the head zeroes the stress there: no stress term
    assert all(r["train/stress"] == 0.0 and r["train/noise"] > 0 for r in steps), steps
    assert history and history[-1]["val/stress_mae_meV_A3"] > 0


def test_validation_stress_mae(dataset, tmp_path, one_thread):
    """The trainer's validation and dens.evaluate report the stress MAE over the nine components of the
    labelled structures, in meV/Å³ and GPa; structures without a label and models without a stress head
    add nothing."""
    from ase.units import GPa

    from dens.evaluate import evaluate
    from dens.trainer import evaluate_s2ef

    model = force_field(dataset)
    structures = [dataset[i] for i in range(5)]
    structures[4] = dict(structures[4], stress=torch.full((1, 3, 3), float("nan"), dtype=torch.float64))
    with torch.no_grad():
        pred = model.predict(collate(structures))["stress"].double()
    labels = torch.stack([s["stress"].reshape(3, 3) for s in structures[:4]])
    expected = float((pred[:4] - labels).abs().mean())  # eV/Å³
    loader = torch.utils.data.DataLoader(structures, batch_size=2, collate_fn=collate)
    metrics = evaluate_s2ef(model, loader, torch.device("cpu"))
    assert metrics["stress_mae_meV_A3"] == pytest.approx(1000 * expected, rel=1e-6)
    assert metrics["stress_mae_GPa"] == pytest.approx(expected / GPa, rel=1e-6)
    assert expected / GPa == pytest.approx(160.21766 * expected, rel=1e-5)
    out = evaluate(model, InMemoryDataset(structures), batch_size=3)
    assert out["stress_mae"] == pytest.approx(1000 * expected, rel=1e-6)
    assert out["stress_mae_GPa"] == pytest.approx(expected / GPa, rel=1e-6)
    plain = InMemoryDataset([{k: v for k, v in s.items() if k != "stress"} for s in structures])
    assert "stress_mae" not in evaluate(model, plain, batch_size=3)
    assert "stress_mae_meV_A3" not in evaluate_s2ef(
        model, torch.utils.data.DataLoader(list(plain), batch_size=2, collate_fn=collate), torch.device("cpu")
    )


@pytest.mark.parametrize(
    "materials, message",
    [
        ({"stress_coef": 1.0}, "materials.stress_coef: not a setting"),
        ({"stress_coefficient": -1.0}, "materials.stress_coefficient=-1.0"),
        ({"stress_on_corrupted": "clean"}, "materials.stress_on_corrupted='clean'"),
        ({"element_references": "yes"}, "materials.element_references='yes'"),
        ({"normalizer_structures": 0}, "materials.normalizer_structures=0"),
        ({"stress_anisotropic_error": "l1"}, "materials.stress_anisotropic_error='l1'"),
    ],
)
def test_config_check_names_bad_materials_values(materials, message):
    from dens.settings import ConfigError, validate_config

    with initialize_config_module("dens.conf", version_base=None):
        cfg = compose("train", overrides=["experiment=mptrj_dens_s", "data.train.path=a", "data.val.path=b"])
    config = OmegaConf.to_container(cfg, resolve=True)
    validate_config(config)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config({**config, "materials": materials})


def test_fairchem_anisotropic_stress_error(dataset):
    """anisotropic_error='mae': fairchem's two stress MAEs (the anisotropic one over all five components,
    reduction 'mean'), so coefficient x term = 5 |iso err| + 5 mean_k |aniso_k err| with coefficient 5."""
    out = {"stress_isotropic": torch.tensor([[0.5], [-1.0]]), "stress_anisotropic": torch.randn(2, 5)}
    labels = torch.stack([dataset[0]["stress"].reshape(3, 3), dataset[1]["stress"].reshape(3, 3)])
    from dens.models.stress import decompose_stress

    iso, aniso = decompose_stress(labels.double())
    norm = StressLossSettings(
        isotropic_mean=0.1, isotropic_std=0.2, anisotropic_mean=0.01, anisotropic_std=0.3
    )
    mae = StressLossSettings(**{**norm.__dict__, "anisotropic_error": "mae"})
    iso_err = (out["stress_isotropic"].double() - (iso - 0.1) / 0.2).abs()[:, 0]
    aniso_err = out["stress_anisotropic"].double() - (aniso - 0.01) / 0.3
    assert torch.allclose(
        stress_errors(out, labels, mae).double(), iso_err + aniso_err.abs().mean(-1), atol=1e-6
    )
    assert torch.allclose(
        stress_errors(out, labels, norm).double(), iso_err + aniso_err.norm(dim=-1), atol=1e-6
    )
    with pytest.raises(ValueError, match="anisotropic_error"):
        StressLossSettings(anisotropic_error="l2")
    model = force_field(dataset)
    assert (
        materials_settings(
            model, {"stress_coefficient": 5.0, "stress_anisotropic_error": "mae"}
        ).anisotropic_error
        == "mae"
    )
