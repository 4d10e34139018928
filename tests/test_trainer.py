"""The trainer: overfitting, exact resume, DDP equivalence, non-finite losses, atomic checkpoints, the CLI."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dens.data import Subset
from dens.data.demo import demo_dataset
from dens.losses import DeNSSettings
from dens.models import EquiformerV2, ForceField
from dens.trainer import OptimSettings, Trainer, TrainerSettings, _atomic_save, cosine_lambda


def tiny_model(dens=True, seed=0):
    torch.manual_seed(seed)
    backbone = EquiformerV2(
        num_layers=1, lmax=2, mmax=1, sphere_channels=8, attn_hidden_channels=8, num_heads=2,
        attn_alpha_channels=4, attn_value_channels=4, ffn_hidden_channels=8, edge_channels=8,
        grid_resolution=8, num_distance_basis=32, alpha_drop=0.0, drop_path_rate=0.0, dens_heads=dens,
        avg_num_nodes=60.0, avg_degree=8.0, cutoff=4.0,
    )  # fmt: skip
    return ForceField(
        backbone, cutoff=4.0, max_neighbors=8, energy_mean=0.65, energy_std=1.55, force_std=0.32
    )


def small_set(n=8):
    return Subset(demo_dataset("train"), list(range(n)))


def make_trainer(tmp_path, model=None, steps=4, dens=True, batch_size=4, n=8, lr=2e-3, **overrides):
    settings = dict(run_dir=str(tmp_path), device="cpu", max_steps=steps, eval_every=1000, checkpoint_every=1000,
                    log_every=1, progress_bar=False, tensorboard=False, deterministic=True, seed=0)  # fmt: skip
    settings.update(overrides)
    optim = OptimSettings(batch_size=batch_size, lr=2e-3, max_epochs=100, warmup_epochs=0.0, ema_decay=0.9)
    return Trainer(
        model or tiny_model(dens),
        small_set(),
        None,
        optim,
        DeNSSettings(enabled=dens),
        TrainerSettings(**settings),
    )


def flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def flat_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_overfitting_a_few_structures_drives_the_loss_down(tmp_path):
    trainer = make_trainer(tmp_path, steps=80, dens=False, batch_size=4, n=4, lr=5e-3)  # one batch, repeated
    trainer.fit()
    losses = [r["train/loss"] for r in trainer.history if "train/loss" in r]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.5 * first, (first, last)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    straight = make_trainer(tmp_path / "a", steps=6)
    straight.fit()
    first = make_trainer(tmp_path / "b", steps=3)
    first.fit()  # writes checkpoints/last.pt at its last step, as a killed run's last checkpoint
    resumed = make_trainer(tmp_path / "b", steps=6)  # trainer.resume=auto picks it up
    resumed.fit()
    assert resumed.step == 6
    torch.testing.assert_close(flat_params(resumed.model), flat_params(straight.model), atol=0, rtol=0)
    torch.testing.assert_close(torch.cat([s.flatten() for s in resumed.ema.shadow]),
                               torch.cat([s.flatten() for s in straight.ema.shadow]), atol=0, rtol=0)  # fmt: skip


def test_nonfinite_loss_is_reported_with_ids(tmp_path):
    data = small_set()
    bad = data[0]
    bad["forces"][0, 0] = float("nan")

    class Poisoned(Subset):
        def __getitem__(self, i):
            return bad if i == 0 else super().__getitem__(i)

    optim = OptimSettings(batch_size=8, lr=1e-3, max_epochs=10, warmup_epochs=0.0)
    settings = TrainerSettings(
        run_dir=str(tmp_path), device="cpu", max_steps=1, progress_bar=False, tensorboard=False
    )
    trainer = Trainer(tiny_model(False), Poisoned(demo_dataset("train"), list(range(8))), None, optim,
                      DeNSSettings(enabled=False), settings)  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"step 0 .*\(sid, fid\)"):
        trainer.fit()
    settings.nonfinite = "skip"
    trainer = Trainer(tiny_model(False), Poisoned(demo_dataset("train"), list(range(8))), None, optim,
                      DeNSSettings(enabled=False), settings)  # fmt: skip
    before = flat_params(trainer.model)
    trainer.fit()
    assert torch.equal(before, flat_params(trainer.model))


def test_atomic_checkpoint_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    _atomic_save({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        _atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1


def test_cosine_schedule():
    assert cosine_lambda(0, 10, 100, 0.2, 0.01) == pytest.approx(0.2)
    assert cosine_lambda(10, 10, 100, 0.2, 0.01) == pytest.approx(
        0.01 + 0.99 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 10)).item())
    )
    assert cosine_lambda(100, 10, 100, 0.2, 0.01) == pytest.approx(0.01)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from test_trainer import make_trainer, flat_grads
from pathlib import Path
trainer = make_trainer(Path({out!r}), steps=1, dens=False, batch_size=4, lr=0.0)
trainer.optim.clip_grad_norm = None
trainer.fit()
if trainer.rank == 0:
    torch.save(flat_grads(trainer.model), {out!r} + "/grads.pt")
"""


def test_ddp_two_processes_match_one(tmp_path):
    # 2 gloo processes with per-rank batch 2 and 1 process with batch 4 see the same global batch and,
    # since every loss term is divided by all-reduced global counts, compute the same gradient (lr = 0
    # keeps the weights; Adam's first steps would amplify round-off in near-zero gradients)
    single = make_trainer(tmp_path / "single", steps=1, dens=False, batch_size=4, lr=0.0)
    single.optim.clip_grad_norm = None
    single.fit()
    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    for p in procs:
        output = p.communicate(timeout=300)[0].decode()
        assert p.returncode == 0, output[-3000:]
    torch.testing.assert_close(torch.load(out / "grads.pt"), flat_grads(single.model), atol=1e-6, rtol=1e-5)


def test_cli_demo_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dens.train", "+experiment=demo", "trainer.max_steps=2", "trainer.eval_every=2",
         f"trainer.run_dir={tmp_path}", "trainer.progress_bar=false", "data.val.path=${demo_path:test}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation (EMA) energy MAE" in result.stdout
    assert (tmp_path / "checkpoints" / "last.pt").exists() and (tmp_path / "metrics.jsonl").exists()


def test_gradient_accumulation_matches_a_full_batch(tmp_path):
    # 2 micro-batches of 2 structures give exactly the gradient of the batch of 4 (one global mean per
    # loss term); lr = 0 keeps the weights, and the gradients stay in .grad after the step
    grads = {}
    for name, accumulation in (("full", 1), ("accum", 2)):
        trainer = make_trainer(
            tmp_path / name, steps=1, dens=False, batch_size=4, lr=0.0, grad_accumulation=accumulation
        )
        trainer.optim.clip_grad_norm = None
        torch.manual_seed(0)
        trainer.fit()
        grads[name] = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    torch.testing.assert_close(grads["accum"], grads["full"], atol=2e-6, rtol=1e-5)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    trainer = make_trainer(tmp_path, steps=3, dens=True, batch_size=4, amp="bf16")
    before = flat_params(trainer.model)
    trainer.fit()
    after = flat_params(trainer.model)
    assert torch.isfinite(after).all() and not torch.equal(before, after)


@pytest.mark.parametrize("native", [None, "AVX512-BF16"])
def test_half_precision_on_a_cpu_without_its_instructions_is_warned(tmp_path, monkeypatch, caplog, native):
    import logging

    import dens.trainer

    monkeypatch.setattr(dens.trainer, "native_half_products", lambda dtype: native)
    with caplog.at_level(logging.WARNING, logger="dens.trainer"):
        make_trainer(tmp_path, steps=1, amp="bf16")
    assert ("no bf16 matrix instructions" in caplog.text) is (native is None)


def test_force_encoder_without_input_equals_bias_only():
    # the trainer feeds masked-out zero forces when force encoding is off: the encoder's parameters take
    # part (DDP needs every parameter used) and the embedding equals the bias-only one
    model = tiny_model(dens=True)
    enc = model.backbone.force_encoder
    zeros = enc(torch.zeros(5, 3), torch.zeros(5, dtype=torch.bool))
    torch.testing.assert_close(zeros, enc.bias_only(5, torch.float32, torch.device("cpu")))
    zeros.sum().backward()
    assert enc.linear.weight.grad is not None


def test_training_set_of_tagged_parts(tmp_path):
    from omegaconf import OmegaConf

    from dens.data import collate
    from dens.data.demo import demo_dataset, demo_path
    from dens.train import _dataset

    spec = OmegaConf.create(
        [{"path": str(demo_path("val"))}, {"path": str(demo_path("test")), "extra": {"md_split": True}}]
    )
    data = _dataset(spec, {})
    n_val, n_test = len(demo_dataset("val")), len(demo_dataset("test"))
    assert len(data) == n_val + n_test and len(data.natoms) == n_val + n_test
    batch = collate([data[0], data[n_val]])
    assert batch.extra["md_split"].tolist() == [False, True]


def test_all_md_training_set_from_the_composed_config():
    """Hydra's struct config: the part without 'extra' (the All split) still gets ``md_split: false``."""
    from hydra import compose, initialize_config_module

    from dens.data import collate
    from dens.data.demo import demo_path
    from dens.train import _dataset

    paths = [f"data.train.0.path={demo_path('val')}", f"data.train.1.path={demo_path('test')}"]
    with initialize_config_module("dens.conf", version_base=None):
        cfg = compose("train", overrides=["experiment=oc20_all_md", *paths])
    data = _dataset(cfg.data.train, {})
    assert collate([data[0], data[len(data) - 1]]).extra["md_split"].tolist() == [False, True]


def test_checkpoint_loads_as_a_model(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dens.train", "trainer.max_steps=2", "trainer.eval_every=1", f"trainer.run_dir={tmp_path}",
         "trainer.progress_bar=false"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    from dens.data import collate
    from dens.data.demo import demo_dataset

    best = ForceField.from_checkpoint(tmp_path / "checkpoints" / "best.pt")
    last = ForceField.from_checkpoint(tmp_path / "checkpoints" / "last.pt")  # EMA weights applied
    batch = collate([demo_dataset("val")[i] for i in range(2)])
    a, b = best.predict(batch), last.predict(batch)
    torch.testing.assert_close(a["forces"], b["forces"])
    assert a["energy"].dtype == torch.float64
    with pytest.raises(FileNotFoundError, match=r"best\.pt"):
        ForceField.from_checkpoint(tmp_path / "missing.pt")
