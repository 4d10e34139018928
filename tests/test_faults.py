"""Fault tests (issue 18): bad files, damaged checkpoints, kills, concurrent runs, bad configurations.

Every test reproduces one case of the issue with a tiny model and a few structures; the bad files are
generated here. Each case ends in an error that names the file / frame / key, or in the right answer.
"""

from __future__ import annotations

import doctest
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from hydra.utils import instantiate

from dens.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dens.data import InMemoryDataset, Subset, collate, make_structure, open_dataset
from dens.data.dataset import CorruptEntryError, require_labels
from dens.data.demo import demo_dataset, demo_path
from dens.losses import DeNSSettings
from dens.rundir import RunDirInUseError, RunDirLock
from dens.runtime import ThreadChoice
from dens.settings import ConfigError, validate_config
from dens.trainer import OptimSettings, Trainer, TrainerSettings

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "_target_": "dens.models.EquiformerV2", "num_layers": 1, "lmax": 2, "mmax": 1, "sphere_channels": 8,
    "attn_hidden_channels": 8, "num_heads": 2, "attn_alpha_channels": 4, "attn_value_channels": 4,
    "ffn_hidden_channels": 8, "edge_channels": 8, "grid_resolution": 8, "num_distance_basis": 16,
    "dens_heads": False, "max_num_elements": 90, "cutoff": 4.0,
}  # fmt: skip
NORMALIZER = {"energy_mean": 0.0, "energy_std": 1.5, "force_std": 0.3}


def tiny_config(lr: float = 2e-3, channels: int = 8) -> dict:
    """The resolved config a run stores: enough for ForceField.from_checkpoint and the resume check."""
    backbone = {**TINY, "sphere_channels": channels}
    return {
        "model": {
            "_target_": "dens.models.ForceField",
            "cutoff": 4.0,
            "max_neighbors": 8,
            "backbone": backbone,
        },
        "optim": {"lr": lr, "batch_size": 4},
        "resolved_normalizer": NORMALIZER,
    }


def tiny_trainer(run_dir, data=None, val=None, config=None, steps=2, **overrides) -> Trainer:
    config = config or tiny_config()
    torch.manual_seed(0)
    model = instantiate(config["model"], **config["resolved_normalizer"])
    settings = dict(run_dir=str(run_dir), device="cpu", max_steps=steps, eval_every=1000, checkpoint_every=1000,
                    log_every=1, progress_bar=False, tensorboard=False, seed=0)  # fmt: skip
    settings.update(overrides)
    optim = OptimSettings(
        batch_size=4, lr=config["optim"]["lr"], max_epochs=100, warmup_epochs=0.0, ema_decay=0.9
    )
    data = data if data is not None else Subset(demo_dataset("val"), list(range(8)))
    return Trainer(model, data, val, optim, DeNSSettings(enabled=False), TrainerSettings(**settings), config)


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "dens.train", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run with last.pt and best.pt (elements of the first demo validation frames)."""
    run_dir = tmp_path_factory.mktemp("trained")
    trainer = tiny_trainer(run_dir, val=Subset(demo_dataset("val"), [0, 1]), steps=2, eval_every=2)
    trainer.fit()
    return run_dir, trainer


def test_doctests_of_the_guard_modules():
    import dens.checkpoint
    import dens.rundir
    import dens.settings

    for module in (dens.checkpoint, dens.rundir, dens.settings):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


# ---------------------------------------------------------------------------------------------- 1. LMDB
def test_1_truncated_lmdb_is_an_error_naming_the_file_not_sigbus(tmp_path):
    trunc = tmp_path / "trunc"
    shutil.copytree(demo_path("train"), trunc)
    shard = trunc / "data.0000.lmdb"
    os.truncate(shard, 839680)  # as `truncate -s 839680 trunc/data.0000.lmdb`
    with pytest.raises(CorruptEntryError, match=r"data\.0000\.lmdb: truncated LMDB file: 839,680 bytes"):
        open_dataset(trunc)
    # the command of the issue: an error before training, not rc 135 (SIGBUS); fixed normaliser as OC20
    result = run_cli(f"data.train.path={trunc}", f"data.val.path={trunc}", "trainer.max_steps=1",
                     f"trainer.run_dir={tmp_path / 'run'}", "trainer.progress_bar=false",
                     "+data.options.on_error=skip", "data.normalizer={energy_mean: 0, energy_std: 1, force_std: 1}")  # fmt: skip
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "truncated LMDB file" in result.stderr and str(shard) in result.stderr


# ------------------------------------------------------------------------------------ 2. missing energy
def _write_xyz(path: Path, n_frames: int = 6, skip_energy: int | None = None) -> Path:
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    rng = np.random.default_rng(0)
    for k in range(n_frames):
        atoms = molecule("CH3CH2OH")
        atoms.positions += rng.normal(0, 0.02, atoms.positions.shape)
        energy = None if k == skip_energy else -1.0 - 0.01 * k
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=rng.normal(0, 0.3, (len(atoms), 3)))
        frames.append(atoms)
    import ase.io

    ase.io.write(path, frames, format="extxyz")
    return path


def test_2_frame_without_energy_names_the_file_and_frame(tmp_path):
    path = _write_xyz(tmp_path / "ethanol.xyz", skip_energy=3)
    ds = open_dataset(path)
    assert ds[3]["energy"] is None  # reading is fine: unlabelled data may be predicted
    trainer = tiny_trainer(tmp_path / "run", data=ds, steps=3)
    with pytest.raises(ValueError, match=r"ethanol\.xyz, frame 3: no energy label"):
        trainer.fit()
    # collate never drops the energies of a whole batch, and evaluation never averages over a subset
    ds = open_dataset(path)  # (the trainer made the first one require labels)
    with pytest.raises(ValueError, match=r"fid=3\) of this batch have no energy label"):
        collate([ds[2], ds[3]])
    from dens.evaluate import evaluate

    model = instantiate(tiny_config()["model"], **NORMALIZER)
    with pytest.raises(ValueError, match="no energy label"):
        evaluate(model, ds, batch_size=4)
    # on_error=skip leaves the frame out of training, counted
    skipping = open_dataset(path, on_error="skip")
    require_labels(skipping)
    assert skipping[3] is None and skipping.num_skipped == 1


# ------------------------------------------------------------------------------------ 3. forces' shape
@pytest.mark.parametrize("natoms", [49, 48])
def test_3_forces_of_the_wrong_shape_name_the_frame_and_true_shape(tmp_path, natoms):
    pos = np.random.default_rng(1).uniform(0, 12, (natoms, 3))
    lines = [str(natoms), 'Properties=species:S:1:pos:R:3:forces:R:2 energy=-1.0 pbc="F F F"']
    lines += [f"H {x:.6f} {y:.6f} {z:.6f} 0.1 0.2" for x, y, z in pos]
    path = tmp_path / "bad.xyz"
    path.write_text("\n".join(lines) + "\n")
    ds = open_dataset(path, min_distance=0.0)
    with pytest.raises(
        ValueError, match=rf"bad\.xyz, frame 0: forces must have shape \[{natoms}, 3\].*\[{natoms}, 2\]"
    ):
        ds[0]
    # a flat [3N] layout is still read as [N, 3]
    assert make_structure(np.zeros((2, 3)), [1, 1], forces=np.arange(6.0))["forces"].shape == (2, 3)


# ----------------------------------------------------------------------------------- 4. Z >= elements
def test_4_elements_the_model_does_not_embed_name_the_frame(tmp_path):
    frames = [dict(demo_dataset("val")[i]) for i in range(8)]
    frames[5]["atomic_numbers"] = frames[5]["atomic_numbers"].clone()
    frames[5]["atomic_numbers"][0] = 95  # Am: valid chemistry, beyond max_num_elements = 90
    trainer = tiny_trainer(tmp_path, data=InMemoryDataset(frames, source="mixed.extxyz"), steps=2)
    with pytest.raises(
        ValueError, match=r"mixed\.extxyz, structure 5: atomic number 95 \(Am\).*max_num_elements=90"
    ):
        trainer.fit()
    from dens.evaluate import evaluate

    with pytest.raises(
        ValueError, match=r"Am \(Z=95\) is beyond the model's embedding \(max_num_elements=90"
    ):
        evaluate(trainer.model, InMemoryDataset(frames), batch_size=4)


# --------------------------------------------------------------------------- 5. Equiformer, no edges
def test_5_equiformer_predicts_structures_without_edges():
    from dens.models import Equiformer, ForceField

    torch.manual_seed(0)
    backbone = Equiformer(irreps_node_embedding="8x0e+4x1e+4x2e", num_layers=1, irreps_sh="1x0e+1x1e+1x2e",
                          number_of_basis=8, fc_neurons=[8], irreps_feature="16x0e", irreps_head="4x0e+2x1e+2x2e",
                          num_heads=2, irreps_mlp_mid="16x0e+8x1e+8x2e")  # fmt: skip
    model = ForceField(backbone, cutoff=5.0)
    for pos, z in (([[0, 0, 0], [0, 0, 10.0]], [1, 1]), ([[0.0, 0, 0]], [8])):  # H2 10 Å apart; one atom
        out = model.predict(collate([make_structure(pos, z)]))
        assert torch.isfinite(out["energy"]).all() and torch.equal(out["forces"], torch.zeros(len(z), 3))


# ------------------------------------------------------------------------------------ 6. configuration
@pytest.fixture(scope="module")
def demo_config():
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import dens.train  # noqa: F401 - registers the demo_path resolver

    def make(*overrides):
        with initialize_config_module("dens.conf", version_base=None):
            return OmegaConf.to_container(compose("train", overrides=list(overrides)), resolve=True)

    return make


def test_6_bad_values_are_named_before_any_data_are_read(demo_config, tmp_path):
    validate_config(demo_config())  # the defaults pass
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    cases = {
        "optim.lr=abc": r"optim\.lr='abc': expected a float",
        "dens.sigma=abc": r"dens\.sigma='abc': expected a float",
        "trainer.amp=fp32": r"trainer\.amp='fp32': expected null \(full precision\), bf16 or fp16",
        "trainer.checkpoint_every=0": r"trainer\.checkpoint_every=0: must be at least 1",
        f"trainer.resume={empty}": r"trainer\.resume=.*empty\.pt: the file is empty",
        "+trainer.resmue=auto": r"trainer\.resmue: not a setting",
        "data.normalizer=rms": r"data\.normalizer='rms'",
    }
    if not torch.cuda.is_available():
        cases["trainer.device=cuda"] = (
            r"trainer\.device='cuda': (this PyTorch build has no CUDA|no CUDA device)"
        )
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            validate_config(demo_config(override))
    # the CLI: the named error comes before the data load (the data path does not even exist)
    result = run_cli(
        "optim.lr=abc", f"data.train.path={tmp_path / 'nowhere'}", f"trainer.run_dir={tmp_path / 'r'}"
    )
    assert result.returncode == 1 and "optim.lr='abc': expected a float" in result.stderr
    assert "no dataset at" not in result.stderr


def test_6_size_change_in_a_run_dir_gives_a_hint(tmp_path):
    tiny_trainer(tmp_path, steps=1).fit()
    bigger = tiny_config(channels=16)
    with pytest.raises(ValueError, match=r"model\.backbone\.sphere_channels: 8 \(checkpoint\) -> 16 \(now\)"):
        tiny_trainer(tmp_path, config=bigger, steps=2).fit()
    with pytest.raises(CheckpointError, match=r"do not fit this model .*trainer\.fresh=true"):
        tiny_trainer(tmp_path, config=bigger, steps=2, resume="force").fit()


# ---------------------------------------------------------------------------------------- 7. checksums
def test_7_damaged_checkpoints_are_refused_naming_the_file(trained, tmp_path):
    from dens.evaluate import load_model
    from dens.models import ForceField

    run_dir, _ = trained
    best = run_dir / "checkpoints" / "best.pt"
    garbage, empty, flipped = tmp_path / "garbage.pt", tmp_path / "empty.pt", tmp_path / "flipped.pt"
    garbage.write_bytes(os.urandom(4096))
    empty.write_bytes(b"")
    raw = bytearray(best.read_bytes())
    weight = load_checkpoint(best)["model"]["backbone.sphere_embedding.weight"].numpy().tobytes()
    start = raw.find(weight[:64])
    assert start > 0
    raw[start : start + 400] = bytes(255 - b for b in raw[start : start + 400])  # 400 inverted bytes
    flipped.write_bytes(bytes(raw))
    for path, message in ((garbage, "not a readable PyTorch checkpoint"), (empty, r"is empty \(0 bytes\)"),
                          (flipped, "checksum mismatch")):  # fmt: skip
        for load in (load_checkpoint, ForceField.from_checkpoint, load_model):
            with pytest.raises(
                CheckpointError, match=rf"{path.name}.*{message}|{message}.*{path.name}"
            ) as err:
                load(path)
            assert str(path) in str(err.value)
    # resuming from a damaged last.pt is refused too
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        tiny_trainer(tmp_path / "r", resume=str(flipped)).fit()


def test_7_checkpoints_without_a_checksum_still_load(trained, tmp_path, caplog):
    from dens.models import ForceField

    run_dir, _ = trained
    state = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    old = tmp_path / "old.pt"
    torch.save({k: v for k, v in state.items() if k != "training_elements"}, old)  # the layout before
    with caplog.at_level(logging.INFO, logger="dens.checkpoint"):
        model = ForceField.from_checkpoint(old)
    assert "no checksum" in caplog.text and model.training_elements is None


def test_best_pt_cannot_resume_and_points_to_init_from(trained, tmp_path):
    run_dir, _ = trained
    with pytest.raises(CheckpointError, match=r"best\.pt keeps only the weights.*trainer\.init_from="):
        tiny_trainer(tmp_path, resume=str(run_dir / "checkpoints" / "best.pt")).fit()


# -------------------------------------------------------------------------------------------- 8. locks
def test_8_a_second_run_on_a_locked_run_dir_refuses_naming_the_holder(tmp_path):
    script = "import sys, time; from dens.rundir import RunDirLock; lock = RunDirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirInUseError, match=rf"in use by another run \(pid {holder.pid} on "):
            tiny_trainer(tmp_path, steps=1).fit()
        assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "config.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed holder leaves no stale lock
        holder.wait()
    tiny_trainer(tmp_path, steps=1).fit()
    with RunDirLock(tmp_path):  # released after fit
        pass


# ------------------------------------------------------------------------------------ 9. changed config
def test_9_a_changed_config_is_refused_unless_asked_explicitly(tmp_path):
    tiny_trainer(tmp_path, config=tiny_config(lr=5e-4), steps=2).fit()
    changed = tiny_config(lr=1e-2)
    with pytest.raises(
        ValueError, match=r"optim\.lr: 0\.0005 \(checkpoint\) -> 0\.01 \(now\).*trainer\.resume=force"
    ):
        tiny_trainer(tmp_path, config=changed, steps=4).fit()
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 5e-4  # the record is kept
    # a longer run (max_steps) is no configuration change
    tiny_trainer(tmp_path, config=tiny_config(lr=5e-4), steps=3).fit()
    # force: continues, and the record says what changed
    forced = tiny_trainer(tmp_path, config=changed, steps=4, resume="force")
    forced.fit()
    assert forced.step == 4
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["resumed_with_changes"] == {"optim.lr": [5e-4, 1e-2]}
    # fresh: a new run, the old one archived, never deleted
    fresh = tiny_trainer(tmp_path, config=changed, steps=1, fresh=True)
    fresh.fit()
    assert fresh.step == 1 and len(list((tmp_path / "previous").glob("*/checkpoints/last.pt"))) == 1
    # resume=null never overwrites a run silently
    with pytest.raises(FileExistsError, match=r"trainer\.fresh=true"):
        tiny_trainer(tmp_path, config=changed, steps=1, resume=None).fit()


# ------------------------------------------------------------------- 10 + 11. killed checkpoint writes
def test_10_11_kill_during_a_checkpoint_write_leaves_no_temporaries_and_no_duplicate_records(
    tmp_path, one_thread
):
    """A run killed (SIGKILL) inside its step-4 checkpoint write, then resumed: exact records, no leftovers.

    Every part runs on one thread, as the killed subprocess does: bitwise equality needs the same
    reduction order."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_faults import tiny_trainer
        real_save = torch.save
        def save(obj, fh):
            if obj.get("step") == 4:
                fh.write(b"half a checkpoint")
                os.kill(os.getpid(), signal.SIGKILL)
            real_save(obj, fh)
        torch.save = save
        tiny_trainer({str(tmp_path)!r}, steps=6, checkpoint_every=2).fit()
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    leftovers = list((tmp_path / "checkpoints").glob(".last.pt.tmp*"))
    assert leftovers, "the kill should have left a temporary file"
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]  # records of steps 3 and 4 were written after the step-2 checkpoint

    resumed = tiny_trainer(tmp_path, steps=6, checkpoint_every=2)
    resumed.fit()
    assert not list((tmp_path / "checkpoints").glob(".last.pt.tmp*"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5, 6]
    # and the resumed run is still exact
    straight = tiny_trainer(tmp_path / "straight", steps=6, checkpoint_every=2)
    straight.fit()
    for a, b in zip(resumed.model.parameters(), straight.model.parameters(), strict=True):
        assert torch.equal(a, b)


# -------------------------------------------------------------------------------- 12. unseen elements
def test_12_unseen_elements_warn_or_refuse(trained, caplog):
    from dens.calculator import DeNSCalculator
    from dens.evaluate import evaluate

    run_dir, trainer = trained
    best = run_dir / "checkpoints" / "best.pt"
    seen = load_checkpoint(best)["training_elements"]
    assert seen == sorted(trainer.training_elements) and 89 not in seen and 1 in seen

    atoms = Atoms("HAc", positions=[[0, 0, 0], [0, 0, 2.0]])  # Ac, as in the issue
    calc = DeNSCalculator.from_checkpoint(best)
    with caplog.at_level(logging.WARNING, logger="dens.calculator"):
        atoms.calc = calc
        atoms.get_potential_energy()
    assert "Ac (Z=89) never occurred in the model's training data" in caplog.text
    strict = DeNSCalculator.from_checkpoint(best, unseen_elements="error")
    atoms.calc = strict
    with pytest.raises(ValueError, match=r"Ac \(Z=89\) never occurred"):
        atoms.get_potential_energy()
    frames = [make_structure(atoms.positions, atoms.numbers, energy=0.0, forces=np.zeros((2, 3)))]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dens.evaluate"):
        evaluate(calc.model, InMemoryDataset(frames))
    assert "1 structure(s) hold element(s) Ac (Z=89)" in caplog.text
    with pytest.raises(ValueError, match="never occurred"):
        evaluate(calc.model, InMemoryDataset(frames), unseen_elements="error")


# ------------------------------------------------------------------------------- 13. coincident atoms
def test_13_coincident_or_too_close_atoms_name_the_frame(tmp_path):
    import ase.io

    atoms = molecule("H2O")
    dup = atoms + Atoms("H", positions=[atoms.positions[1]])  # a duplicated atom
    close = atoms.copy()
    close.positions[2] = close.positions[0] + [0.05, 0, 0]
    slab = Atoms(
        "Cu2", positions=[[0, 0, 0], [3.0, 0, 0]], cell=[3.0, 3.0, 3.0], pbc=True
    )  # same site mod cell
    path = tmp_path / "frames.xyz"
    ase.io.write(path, [atoms, dup, close, slab], format="extxyz")
    ds = open_dataset(path)
    ds[0]
    with pytest.raises(ValueError, match=r"frames\.xyz, frame 1: atoms 1 and 3 are 0\.0000 Å apart"):
        ds[1]
    with pytest.raises(ValueError, match=r"frame 2: atoms 0 and 2 are 0\.0500 Å apart"):
        ds[2]
    with pytest.raises(ValueError, match=r"frame 3: atoms 0 and 1 are 0\.0000 Å apart"):
        ds[3]
    skipping = open_dataset(path, on_error="skip")
    assert [skipping[i] is None for i in range(4)] == [False, True, True, True]
    assert open_dataset(path, min_distance=0.0)[1] is not None  # the check can be turned off
    from dens.calculator import DeNSCalculator

    model = instantiate(tiny_config()["model"], **NORMALIZER)
    dup.calc = DeNSCalculator(model)
    with pytest.raises(ValueError, match=r"atoms 1 and 3 are 0\.0000 Å apart"):
        dup.get_potential_energy()


# ---------------------------------------------------------------------------- 14. exploded validation
def test_14_nonfinite_or_exploded_validation_never_becomes_best(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path, val=Subset(demo_dataset("val"), [0]), steps=3, eval_every=1,
                           nonfinite="skip")  # fmt: skip
    values = iter([300.0, 9.3e9, math.nan, 250.0])  # step 0, then an explosion, NaN, then a real improvement
    monkeypatch.setattr(
        trainer, "validate", lambda: {"forces_mae_meV_A": next(values), "energy_mae_meV": 1.0}
    )
    saved = []
    monkeypatch.setattr(trainer, "_save_best", lambda: saved.append(trainer.step))
    trainer.fit()
    assert saved == [3] and trainer.best_metric == 250.0


# ------------------------------------------------------------------------------ 15. robust normaliser
def test_15_auto_rms_ignores_and_names_a_huge_force_frame(caplog):
    from omegaconf import OmegaConf

    from dens.train import _normalizer

    frames = [dict(demo_dataset("val")[i]) for i in range(30)]
    cfg = OmegaConf.create({"data": {"normalizer": "auto_rms"}, "optim": {"train_on_free_atoms": True}})
    clean = _normalizer(cfg, InMemoryDataset(frames, source="val.extxyz"))["force_std"]
    frames[7]["forces"] = frames[7]["forces"] * 1e5
    with caplog.at_level(logging.WARNING, logger="dens.data.normalize"):
        robust = _normalizer(cfg, InMemoryDataset(frames, source="val.extxyz"))["force_std"]
    assert "val.extxyz, structure 7 (force RMS" in caplog.text
    assert 0.5 * clean < robust < 2 * clean < 1.0, (clean, robust)


def test_lock_file_names_the_holder(tmp_path):
    lock = RunDirLock(tmp_path).acquire()
    try:
        text = (tmp_path / ".lock").read_text()
        assert f"pid {os.getpid()} on " in text
        with pytest.raises(RunDirInUseError, match=rf"pid {os.getpid()}"):
            RunDirLock(tmp_path).acquire()  # flock: a second open file description conflicts too
    finally:
        lock.release()
    started = time.time()
    RunDirLock(tmp_path).acquire().release()
    assert time.time() - started < 5
    save_checkpoint({"w": torch.ones(1)}, tmp_path / "x.pt")
    assert load_checkpoint(tmp_path / "x.pt")["w"].item() == 1.0


def four_systems() -> Subset:
    """Four demo structures of different systems: each DDP rank of a batch of 4 misses some elements."""
    return Subset(demo_dataset("val"), [0, 20, 25, 40])


def test_12_ddp_ranks_record_the_union_of_their_elements(tmp_path):
    """Each DDP rank sees its own structures; the checkpoint lists the elements of all of them."""
    import socket

    single = tiny_trainer(tmp_path / "single", data=four_systems(), steps=1)
    single.fit()
    assert len(single.training_elements) == 11
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_faults import four_systems, tiny_trainer
        tiny_trainer({str(tmp_path / "ddp")!r}, data=four_systems(), steps=1).fit()
        """
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))  # fmt: skip
    for p in procs:
        output = p.communicate(timeout=300)[0].decode()
        assert p.returncode == 0, output[-3000:]
    elements = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")["training_elements"]
    assert elements == sorted(single.training_elements)


@pytest.mark.parametrize("faster", ["fewer", "more"])
def test_trainer_chooses_its_cpu_threads_from_its_first_steps(tmp_path, monkeypatch, caplog, request, faster):
    """``trainer.threads: null`` on a CPU: the first steps try the usable cores and fewer, and the run keeps
    the count of the fastest median step (a fake clock makes each step cost a known time)."""
    from dens import runtime

    # 2 usable cores, whatever the machine and whatever earlier trainers set; restored even on failure
    initial = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(initial))
    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    torch.set_num_threads(2)
    most = tiny_trainer(tmp_path / "probe", steps=1).thread_choice
    assert most is not None and most.candidates == (2, 1)
    clock = [0.0]

    def perf_counter():  # each call advances by the time a step of the current thread count costs
        n = torch.get_num_threads()
        clock[0] += 0.1 * n if faster == "fewer" else 0.1 / n
        return clock[0]

    monkeypatch.setattr(time, "perf_counter", perf_counter)
    steps = most.warmup + most.samples * len(most.candidates) + 1  # warm-up, timed steps, one after
    trainer = tiny_trainer(tmp_path / "run", steps=steps)
    chosen = []
    real_step = trainer.train_step
    monkeypatch.setattr(
        trainer, "train_step", lambda micro: chosen.append(torch.get_num_threads()) or real_step(micro)
    )
    with caplog.at_level(logging.INFO, logger="dens.trainer"):
        trainer.fit()
    expected = min(most.candidates) if faster == "fewer" else max(most.candidates)
    assert trainer.thread_choice.chosen == expected == chosen[-1]  # the step after the choice
    assert torch.get_num_threads() == max(most.candidates)  # the process's count again after fit
    assert all(len(t) == most.samples for t in trainer.thread_choice.times.values())
    assert f"CPU threads: {expected} from here on" in caplog.text
    # a thread count given, the choice turned off or a deterministic run: no choice
    for overrides in ({"threads": 1}, {"tune_threads": False}, {"deterministic": True}):
        assert tiny_trainer(tmp_path / "fixed", steps=1, **overrides).thread_choice is None


def test_a_compiled_run_chooses_its_threads_on_eager_steps_then_compiles(tmp_path, monkeypatch, request):
    """``trainer.compile=true`` with the thread choice: a new thread count would recompile every graph, so
    the first steps run eager, and the backbone is compiled once, with the chosen count, in the step after
    the choice. With a thread count given it is compiled at once."""
    import dens.trainer
    from dens import runtime

    initial = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(initial))
    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    torch.set_num_threads(2)
    compiled = []  # (threads, steps started) at each compilation
    started = []
    monkeypatch.setattr(
        dens.trainer, "compile_backbone",
        lambda backbone, **kw: compiled.append((torch.get_num_threads(), len(started))) or backbone,
    )  # fmt: skip
    clock = [0.0]

    def perf_counter():  # one thread is faster
        clock[0] += 0.1 * torch.get_num_threads()
        return clock[0]

    monkeypatch.setattr(time, "perf_counter", perf_counter)
    choice = ThreadChoice(2)
    steps = choice.decided_after + 2
    trainer = tiny_trainer(tmp_path / "run", steps=steps, compile=True)
    assert compiled == [] and trainer.thread_choice is not None
    real_step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda micro: started.append(1) or real_step(micro))
    trainer.fit()
    assert trainer.thread_choice.chosen == 1
    assert compiled == [(1, choice.decided_after + 1)]  # in the first step after the choice
    compiled.clear()
    started.clear()
    tiny_trainer(tmp_path / "fixed", steps=1, compile=True, threads=2)
    assert compiled == [(2, 0)]
    # train_step called directly (no thread choice runs): compiled in the first step
    compiled.clear()
    direct = tiny_trainer(tmp_path / "direct", steps=1, compile=True)
    assert compiled == []
    direct.train_step([next(iter(direct.train_loader))])
    assert compiled == [(2, 0)]


@pytest.mark.parametrize("threads", [None, 1], ids=["compiled-after-the-choice", "compiled-at-once"])
def test_a_compiled_run_refuses_an_uncompilable_gradient_force_model_when_built(
    tmp_path, monkeypatch, request, threads
):
    """A gradient-force backbone without ``compile_gradient`` is refused when the trainer is built, whether
    the compilation would happen at once or after the thread choice's eager steps."""
    from dens import runtime

    initial = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(initial))
    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    torch.set_num_threads(2)
    config = tiny_config()
    config["model"]["backbone"] = {**config["model"]["backbone"], "direct_forces": False}  # forces -dE/dpos
    config["resolved_normalizer"] = {**NORMALIZER, "force_std": NORMALIZER["energy_std"]}  # as -dE/dpos needs
    with pytest.raises(ValueError, match="double backward"):
        tiny_trainer(tmp_path / "run", config=config, steps=1, compile=True, threads=threads)
