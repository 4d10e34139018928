"""Your own data end to end: label keys, element references, units and checks, single-file training,
fine-tuning, predictions, the inference API and the training feedback."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT
from hydra import compose, initialize_config_module
from inference_helpers import TINY_BACKBONE

import dens
from dens.calculator import DeNSCalculator, DirectForcesWarning
from dens.data import collate, make_structure, open_dataset, read_ase_file
from dens.data.demo import demo_path
from dens.data.references import check_labels, element_references, label_statistics
from dens.evaluate import main as evaluate_main
from dens.evaluate import write_predictions
from dens.feedback import ValidationTable
from dens.models import EquiformerV2, ForceField
from dens.train import build, datasets, graph_statistics

E0 = {13: -50.0, 29: -100.0}  # offsets that make EMT energies look like DFT totals
TINY = [f"model.backbone.{k}={v}" for k, v in TINY_BACKBONE.items()] + ["model.backbone.num_layers=1"]


def emt_frames(n: int, seed: int, size: int = 2) -> list[ase.Atoms]:
    """Rattled Cu/Al fcc cells with EMT energies (+ per-element offsets) and forces under MACE's keys."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.6 * rng.uniform(0.97, 1.03), cubic=True).repeat((size, 1, 1))
        atoms.numbers = rng.choice([13, 29], size=len(atoms))
        atoms.rattle(0.08, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        energy = atoms.get_potential_energy() + sum(E0[int(z)] for z in atoms.numbers)
        forces = atoms.get_forces()
        out = ase.Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=True)
        out.info["REF_energy"], out.arrays["REF_forces"] = energy, forces
        frames.append(out)
    return frames


@pytest.fixture(scope="module")
def emt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("emt") / "cual.extxyz"
    ase.io.write(path, emt_frames(40, seed=0), format="extxyz")
    return path


def _compose(overrides: list[str]):
    with initialize_config_module("dens.conf", version_base=None):
        return compose("train", overrides=overrides)


# -- reading -------------------------------------------------------------------------------------------------
def test_mace_keys_are_read_explicitly_and_by_default(emt_file):
    auto = read_ase_file(emt_file)
    explicit = open_dataset(emt_file, energy_key="REF_energy", forces_key="REF_forces")
    frame = ase.io.read(emt_file, 0)
    assert float(auto[0]["energy"]) == pytest.approx(frame.info["REF_energy"])
    assert float(explicit[0]["energy"]) == pytest.approx(frame.info["REF_energy"])
    torch.testing.assert_close(
        explicit[0]["forces"].double(), torch.tensor(frame.arrays["REF_forces"]), atol=1e-6, rtol=0
    )
    with pytest.raises(ValueError, match=r"cual.extxyz, frame 0: no energy under the key 'DFT_energy'"):
        read_ase_file(emt_file, energy_key="DFT_energy")


# -- references, statistics, checks ----------------------------------------------------------------------------
def _structures(compositions, energies, forces=None):
    out = []
    for i, (z, e) in enumerate(zip(compositions, energies, strict=True)):
        f = None if forces is None else forces[i]
        out.append(
            make_structure(
                torch.arange(3 * len(z), dtype=torch.float64).reshape(-1, 3), z, energy=e, forces=f
            )
        )
    return out


def test_reference_fit_isolated_given_and_degenerate(caplog):
    data = _structures([[1, 8], [1, 1, 8], [1, 1, 1, 8]], [-16.0, -18.0, -20.0])
    refs, info = element_references(data, "fit")
    assert refs == pytest.approx({1: -2.0, 8: -14.0}) and info["rank"] == 2
    # an exact fit leaves a residual std of ~0: replaced by the force scale, with a warning
    forces = [torch.full((len(s["atomic_numbers"]), 3), 0.5) for s in data]
    exact = _structures([[1, 8], [1, 1, 8], [1, 1, 1, 8]], [-16.0, -18.0, -20.0], forces)
    stats = label_statistics(exact, refs)
    assert stats["energy_std"] == pytest.approx(0.5) and stats["forces_rms"] == pytest.approx(0.5)
    assert "degenerate" in caplog.text
    # one composition (MD17): not identifiable, minimum-norm fit reproduces it, with a warning
    caplog.clear()
    same, _ = element_references(_structures([[1, 1, 8], [1, 1, 8]], [-18.0, -18.2]), "fit")
    assert 2 * same[1] + same[8] == pytest.approx(-18.1) and "not determined" in caplog.text
    isolated = _structures([[1], [8], [1, 8]], [-13.6, -2041.0, -2060.0])
    assert element_references(isolated, "isolated")[0] == {1: -13.6, 8: -2041.0}
    with pytest.raises(ValueError, match=r"no isolated-atom frame .* for O"):
        element_references(_structures([[1], [1, 8]], [-13.6, -2060.0]), "isolated")
    assert element_references(data, {"H": -1.0, "8": -3.0})[0] == {1: -1.0, 8: -3.0}


def test_checks_name_unit_errors_and_frames(emt_file, caplog):
    good = open_dataset(emt_file)
    refs, _ = element_references(good, "fit")
    assert check_labels(good, refs, name=str(emt_file)) == []
    as_mev = open_dataset(emt_file, energy_unit="kJ/mol")  # forces off by 96x, as meV read as eV by 1000x
    # kJ/mol read as eV is the opposite direction: tiny forces pass, so test the large-force direction
    big = open_dataset(emt_file, energy_unit="Hartree")
    assert check_labels(as_mev, None) == []
    with pytest.raises(ValueError, match=r"force RMS .* are the units right"):
        check_labels(big, None, name=str(emt_file))
    far = _structures([[1, 8], [1, 1, 8], [1, 8]], [-16.0, -18.0, 500.0])
    warned = check_labels(far, {1: -2.0, 8: -14.0})
    assert len(warned) == 1 and "structure 2" in warned[0] and "eV/atom" in warned[0]


def test_md17_extxyz_needs_its_unit(tmp_path):
    path = tmp_path / "eth.xyz"
    ase.io.write(path, emt_frames(3, seed=1), format="extxyz")
    cfg = _compose(["experiment=md17_ethanol_l2", f"data.path={path}", f"trainer.run_dir={tmp_path}/r"])
    with pytest.raises(ValueError, match=r"does not state its energy unit; set data\.options\.energy_unit"):
        datasets(cfg)


# -- the model: references, predict(atoms), cutoffs, presets -------------------------------------------------
def test_forcefield_adds_references_and_predicts_atoms(emt_file):
    torch.manual_seed(0)
    backbone = EquiformerV2(**TINY_BACKBONE, cutoff=4.0, direct_forces=True)
    plain = ForceField(backbone, max_neighbors=8, energy_std=2.0).eval()
    table = [0.0] * 30
    table[13], table[29] = -50.0, -100.0
    ref = ForceField(backbone, max_neighbors=8, energy_std=2.0, element_references=table).eval()
    assert set(ref.state_dict()) == set(plain.state_dict())  # official-compatible names, no new entries
    frames = ase.io.read(emt_file, ":3")
    a, b = plain.predict(frames), ref.predict(frames)
    offsets = [sum(E0[int(z)] for z in f.numbers) for f in frames]
    np.testing.assert_allclose(b["energy"] - a["energy"], offsets, rtol=0, atol=1e-9)
    np.testing.assert_allclose(b["forces"][1], a["forces"][1])
    single = ref.predict(frames[0])
    assert single["energy"] == pytest.approx(b["energy"][0]) and single["forces"].shape == (len(frames[0]), 3)
    with pytest.raises(ValueError, match="differs from the backbone's cutoff"):
        ForceField(EquiformerV2(**TINY_BACKBONE, cutoff=12.0), cutoff=5.0)
    preset = ForceField.from_preset("oc20_2m", **TINY_BACKBONE)
    assert (
        preset.cutoff == 12.0
        and preset.max_neighbors == 20
        and float(preset.energy_std) == pytest.approx(2.8873, abs=1e-4)
    )


def test_calculator_warns_once_for_direct_forces(emt_file):
    torch.manual_seed(0)
    model = ForceField(EquiformerV2(**TINY_BACKBONE, cutoff=4.0, direct_forces=True), max_neighbors=8)
    atoms = ase.io.read(emt_file, 0)
    atoms.calc = DeNSCalculator(model)
    with pytest.warns(DirectForcesWarning, match="NVE"):
        atoms.get_potential_energy()
    atoms.rattle(0.01, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DirectForcesWarning)
        atoms.get_forces()  # once only


# -- configuration -----------------------------------------------------------------------------------------------
def test_unknown_trainer_key_is_named(tmp_path):
    cfg = _compose(["+trainer.max_step=1", f"trainer.run_dir={tmp_path}"])
    with pytest.raises(
        ValueError, match=r"trainer\.max_step: not a setting; did you mean trainer\.max_steps\?"
    ):
        build(cfg)


def test_training_path_override_never_validates_on_the_demo(emt_file, tmp_path, caplog):
    cfg = _compose([f"data.train.path={emt_file}", f"trainer.run_dir={tmp_path}"])
    train, val = datasets(cfg)
    assert len(train) + len(val) == 40 and len(val) == 2
    assert "embedded demo set" in caplog.text and (tmp_path / "split.npz").is_file()
    assert all(str(emt_file) in val.describe(i) for i in range(len(val)))
    demo = _compose([f"trainer.run_dir={tmp_path}/demo"])
    assert len(datasets(demo)[1]) == len(open_dataset(demo_path("val")))


def test_graph_constants_come_from_the_data(emt_file, tmp_path):
    cfg = _compose(
        [
            "data=file",
            f"data.train.path={emt_file}",
            f"trainer.run_dir={tmp_path}",
            "trainer.device=cpu",
            *TINY,
        ]
    )
    trainer = build(cfg)
    assert trainer.model.backbone.avg_num_nodes == pytest.approx(8.0)  # 2 x 1 x 1 cubic fcc cells
    assert trainer.config["model"]["backbone"]["avg_num_nodes"] == pytest.approx(
        8.0
    )  # rebuilt from the checkpoint
    degree = trainer.config["model"]["backbone"]["avg_degree"]
    assert 1.0 < degree <= 12.0  # the demo model's neighbour cap
    assert graph_statistics(open_dataset(emt_file), 6.0, 12)["avg_degree"] == pytest.approx(degree, rel=1e-3)


def test_steps_size_the_schedule(emt_file, tmp_path):
    cfg = _compose(["data=file", f"data.train.path={emt_file}", f"trainer.run_dir={tmp_path}", "trainer.steps=7",
                    "trainer.device=cpu", *TINY])  # fmt: skip
    trainer = build(cfg)
    assert trainer.total_steps == trainer.schedule_steps == 7
    lrs = []
    for _ in range(7):
        lrs.append(trainer.scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.scheduler.step()
    final = trainer.scheduler.get_last_lr()[0]
    assert final == pytest.approx(cfg.optim.lr * cfg.optim.lr_min_factor) and max(lrs) > final


# -- end to end: one file in, a model out; fine-tuning; predictions -------------------------------------------
def _run(args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "dens.train", *args, "trainer.progress_bar=false",
                             "trainer.tensorboard=false", "trainer.device=cpu", *TINY],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained(emt_file, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "cual"
    result = _run(["--train-file", str(emt_file), "--valid-fraction", "0.1", "--energy-key", "REF_energy",
                   "--forces-key", "REF_forces", "--steps", "8", "trainer.eval_every=4", f"trainer.run_dir={run}"])  # fmt: skip
    assert "E MAE (meV)" in result.stdout and "best F MAE" in result.stdout
    assert (
        "dens.evaluate --checkpoint" in result.stdout
        and str(run / "checkpoints" / "best.pt") in result.stdout
    )
    assert "--energy-key REF_energy" in result.stdout
    return run


def test_single_file_training_writes_a_total_energy_model(trained, emt_file):
    ckpt = trained / "checkpoints" / "best.pt"
    assert (trained / "split.npz").is_file()
    config = torch.load(ckpt, weights_only=False)["config"]
    assert config["units"]["energy"] == "eV" and config["units"]["data_energy_unit"] == "eV"
    assert set(config["element_references"]) == {"Al", "Cu"}
    assert config["element_references"]["Cu"] == pytest.approx(-100.0, abs=3.0)
    model = dens.load(ckpt)
    frames = ase.io.read(emt_file, ":5")
    everything = ase.io.read(emt_file, ":")
    per_atom = sum(a.info["REF_energy"] for a in everything) / sum(len(a) for a in everything)
    assert float(model.element_references[8]) == pytest.approx(per_atom, rel=0.02)  # O: unseen, mean per atom
    pred = model.predict(frames)
    labels = np.array([f.info["REF_energy"] for f in frames])
    assert np.abs(pred["energy"] - labels).max() < 0.02 * np.abs(labels).min()  # totals, not residuals
    atoms = frames[0].copy()
    atoms.calc = DeNSCalculator.from_checkpoint(ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DirectForcesWarning)
        assert atoms.get_potential_energy() == pytest.approx(pred["energy"][0], abs=1e-6)
    try:
        import matplotlib  # noqa: F401

        assert (trained / "learning_curve.png").is_file()
    except ImportError:
        pass


def test_fine_tuning_loads_weights_only(trained, tmp_path):
    other = tmp_path / "other.extxyz"
    ase.io.write(other, emt_frames(12, seed=5, size=1), format="extxyz")
    source = dens.load(trained / "checkpoints" / "best.pt")
    cfg = _compose(["data=file", f"data.train.path={other}", f"trainer.run_dir={tmp_path}/ft", "trainer.device=cpu",
                    f"trainer.init_from={trained / 'checkpoints' / 'best.pt'}", "data.valid_fraction=0.25"])  # fmt: skip
    trainer = build(cfg)  # the demo-sized default model config is ignored: the checkpoint's architecture
    for (name, p), q in zip(trainer.model.named_parameters(), source.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    assert trainer.step == 0 and trainer.total_steps > 0
    assert float(trainer.model.energy_std) != pytest.approx(
        float(source.energy_std)
    )  # refitted to the new file
    keep = _compose(["data=file", f"data.train.path={other}", f"trainer.run_dir={tmp_path}/keep", "trainer.device=cpu",
                     f"trainer.init_from={trained / 'checkpoints' / 'best.pt'}", "trainer.init_normalizer=keep"])  # fmt: skip
    kept = build(keep).model
    assert float(kept.energy_std) == pytest.approx(float(source.energy_std))
    torch.testing.assert_close(kept.element_references, source.element_references)
    trainer.settings.max_steps = 2
    trainer.fit()
    assert (tmp_path / "ft" / "checkpoints" / "best.pt").is_file()


def test_no_validation_set_still_writes_best(emt_file, tmp_path):
    cfg = _compose(["data=file", f"data.train.path={emt_file}", "data.valid_fraction=null", f"trainer.run_dir={tmp_path}",
                    "trainer.steps=2", "trainer.device=cpu", "trainer.progress_bar=false", *TINY])  # fmt: skip
    trainer = build(cfg)
    assert trainer.val_loader is None
    trainer.fit()
    assert (
        dens.load(tmp_path / "checkpoints" / "best.pt").predict(ase.io.read(emt_file, 0))["forces"].shape[1]
        == 3
    )


def test_predictions_in_file_order_float32_and_extxyz(trained, emt_file, tmp_path):
    ckpt = str(trained / "checkpoints" / "best.pt")
    evaluate_main(["--checkpoint", ckpt, "--data", str(emt_file), "--out", str(tmp_path / "npz"), "--no-progress",
                   "--energy-key", "REF_energy", "--limit", "12"])  # fmt: skip
    f = np.load(tmp_path / "npz" / "cual_predictions.npz")
    assert f["energy"].dtype == np.float32 and f["ids"].tolist() == [
        f"cual_{i}" for i in range(12)
    ]  # not cual_10 first
    evaluate_main(["--checkpoint", ckpt, "--data", str(emt_file), "--out", str(tmp_path / "xyz"), "--no-progress",
                   "--prediction-format", "extxyz", "--limit", "3"])  # fmt: skip
    frames = ase.io.read(tmp_path / "xyz" / "cual_predictions.extxyz", ":")
    labels = ase.io.read(emt_file, ":3")
    assert [a.get_potential_energy() for a in frames] == pytest.approx([a.info["REF_energy"] for a in labels])
    assert all("dens_energy" in a.info and a.arrays["dens_forces"].shape == (len(a), 3) for a in frames)
    # the evaluation-server layout stays: sorted unique ids, float16
    server = np.load(write_predictions(tmp_path / "s.npz", ["2_0", "10_0"], [1.0, 2.0]))
    assert server["ids"].tolist() == ["10_0", "2_0"] and server["energy"].dtype == np.float16
    report = json.loads((tmp_path / "xyz" / "metrics.json").read_text())
    assert report["splits"]["cual"]["structures"] == 3


def test_validation_table_marks_the_best(capsys):
    table = ValidationTable()
    table({"energy_mae_meV": 5.0, "forces_mae_meV_A": 50.0}, 0)
    table({"energy_mae_meV": 4.0, "forces_mae_meV_A": 60.0}, 5)
    table({"energy_mae_meV": 3.0, "forces_mae_meV_A": 40.0}, 10)
    lines = capsys.readouterr().out.splitlines()
    assert (
        len(lines) == 4 and lines[1].endswith("*") and not lines[2].endswith("*") and lines[3].endswith("*")
    )
    assert lines[2].split()[-1] == "50.000"


def test_collate_predictions_match_batch_predict():
    torch.manual_seed(0)
    model = ForceField(EquiformerV2(**TINY_BACKBONE, cutoff=4.0), max_neighbors=8).eval()
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=0)
    from dens.data import atoms_to_structure

    batch = collate([atoms_to_structure(atoms)])
    assert model.predict(atoms)["energy"] == pytest.approx(float(model.predict(batch)["energy"][0]))
