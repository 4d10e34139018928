"""The models and the trainer on a CUDA device (skipped without one; ``benchmarks/gpu_check.sh`` runs them).

Every benchmarked model family, tiny: the same float64 weights give the same energy, forces and DeNS
outputs on the GPU as on the CPU, and a trainer step with each AMP mode gives a finite loss there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.models import MODELS, aspirin_structures, build_model, oc20_structures

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DEVICE = "cuda"
FAMILIES = ["eqv2_oc20_2m", "escn_oc20_2m", "equiformer_md17_l2"]


def _items(name: str, count: int = 2):
    return aspirin_structures(count) if MODELS[name].family == "equiformer" else oc20_structures(count)


@pytest.mark.parametrize("name", FAMILIES)
def test_gpu_outputs_equal_cpu_outputs_in_float64(name):
    from dens.data import collate

    torch.manual_seed(0)
    batch = collate(_items(name))  # predict moves it to the model's device and dtype
    model = build_model(MODELS[name], dens=True, quick=True, energy_mean=0.0).double().eval()
    cpu = model.predict(batch)
    gpu = model.to(DEVICE).predict(batch)
    for key in ("energy", "forces"):
        scale = cpu[key].abs().max()
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], atol=1e-9 * float(scale), rtol=0)


@pytest.mark.parametrize("amp", [None, "bf16", "fp16"])
@pytest.mark.parametrize("name", FAMILIES)
def test_trainer_step_on_gpu(tmp_path, name, amp):
    from dens.data import InMemoryDataset, collate
    from dens.losses import DeNSSettings
    from dens.trainer import OptimSettings, Trainer, TrainerSettings

    torch.manual_seed(0)
    items = _items(name, 4)
    model = build_model(MODELS[name], dens=True, quick=True, energy_mean=float(items[0]["energy"]))
    settings = TrainerSettings(run_dir=str(tmp_path), device=DEVICE, amp=amp, resume=None, tensorboard=False,
                               progress_bar=False)  # fmt: skip
    dens = DeNSSettings(prob=1.0, sigma=0.05, corrupt_ratio=0.5, coefficient=1.0)
    trainer = Trainer(
        model, InMemoryDataset(items), None, OptimSettings(batch_size=4, lr=1e-4), dens, settings
    )
    before = [p.detach().clone() for p in model.parameters()]
    metrics = trainer.train_step([collate(items)])
    assert metrics and all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    assert any(
        not torch.equal(p.detach().cpu(), b.cpu()) for p, b in zip(model.parameters(), before, strict=True)
    )
