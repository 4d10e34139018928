"""The backbone contract (dens.models.Backbone) and the one name of the DeNS parts (dens_heads), with the
old spellings still accepted: constructor ``use_force_encoding``, ``from_preset(dens=)`` and checkpoints
written before the rename."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from inference_helpers import TINY_BACKBONE

from dens.models import ESCN, Backbone, Equiformer, EquiformerV2, ForceField, check_backbone
from dens.models.potential import gradient_force_std

TINY = {
    EquiformerV2: TINY_BACKBONE,
    ESCN: dict(num_layers=1, lmax=2, mmax=1, sphere_channels=8, hidden_channels=8, edge_channels=8,
               num_sphere_samples=16, distance_resolution=1.0, cutoff=5.0),
    Equiformer: dict(irreps_node_embedding="8x0e+4x1e", num_layers=1, fc_neurons=[8], irreps_feature="8x0e",
                     irreps_head="4x0e+2x1e", num_heads=2, irreps_mlp_mid="8x0e+4x1e", number_of_basis=8,
                     irreps_sh="1x0e+1x1e", irreps_force_encoding="1x0e+1x1e"),
}  # fmt: skip


@pytest.mark.parametrize("cls", list(TINY))
@pytest.mark.parametrize("dens_heads", [False, True])
def test_the_models_declare_the_contract(cls, dens_heads):
    model = cls(**TINY[cls], dens_heads=dens_heads)
    check_backbone(model)
    assert isinstance(model, Backbone)
    assert model.has_dens_heads is dens_heads and (model.force_encoder is not None) is dens_heads
    assert model.compile_regions() and all(isinstance(m, torch.nn.Module) for m in model.compile_regions())
    assert model.direct_forces is (cls is not Equiformer) and model.stress_head is None
    assert model.splits_heads is (cls is not ESCN)  # eSCN's heads read per-atom samples: nothing to split


@pytest.mark.parametrize("cls", list(TINY))
def test_the_old_keyword_still_builds_the_dens_parts(cls):
    with pytest.warns(DeprecationWarning, match="dens_heads"):
        model = cls(**TINY[cls], use_force_encoding=True)
    assert model.has_dens_heads
    reference = cls(**TINY[cls], dens_heads=True)
    assert model.state_dict().keys() == reference.state_dict().keys()


def test_from_preset_dens_is_deprecated():
    with pytest.warns(DeprecationWarning, match="from_preset"):
        model = Equiformer.from_preset("md17_l2", dens=True)
    assert model.has_dens_heads


def test_a_checkpoint_written_before_the_rename_loads_silently(tmp_path):
    torch.manual_seed(0)
    backbone = EquiformerV2(**TINY_BACKBONE, cutoff=4.0, dens_heads=True)
    model = ForceField(backbone, max_neighbors=8)
    old_config = {
        "model": {
            "_target_": "dens.models.ForceField",
            "backbone": {"_target_": "dens.models.EquiformerV2", **TINY_BACKBONE, "cutoff": 4.0,
                         "use_force_encoding": True},
            "max_neighbors": 8,
        },
        "resolved_normalizer": {"energy_mean": 0.0, "energy_std": 1.0, "force_std": 1.0},
    }  # fmt: skip
    path = tmp_path / "best.pt"
    torch.save({"config": old_config, "model": model.state_dict(), "ema": None}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        loaded = ForceField.from_checkpoint(path, use_ema=False)
    assert loaded.has_dens_heads
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_gradient_forces_need_the_energy_std():
    assert gradient_force_std(False, 2.0, 0.5) == 2.0 and gradient_force_std(True, 2.0, 0.5) == 0.5
    backbone = Equiformer(**TINY[Equiformer])
    with pytest.raises(ValueError, match="force_std == energy_std"):
        ForceField(backbone, energy_std=2.0, force_std=0.5)


# ------------------------------------------------------------- the official no-encoding ablation
@pytest.mark.parametrize("cls", list(TINY))
def test_a_noise_head_without_a_force_encoder(cls):
    """``encode_forces=False`` (official ``use_force_encoding=False``, Table 6 Index 3): the noise head
    stays, no encoder parameter exists, and encoded forces are refused rather than ignored."""
    torch.manual_seed(0)
    model = cls(**TINY[cls], dens_heads=True, encode_forces=False)
    check_backbone(model)
    assert model.has_dens_heads and model.force_encoder is None
    assert not any("force_encoder" in name for name in model.state_dict())
    field = ForceField(model, max_neighbors=8)
    batch = _molecules()
    mask = torch.zeros(batch.num_atoms, dtype=torch.bool)
    mask[::3] = True
    out = field(batch, noise_mask=mask, split_heads=True)
    assert (
        torch.equal(out["forces"][mask], out["noise_head"][mask]) and out["noise_head"][mask].abs().sum() > 0
    )
    with pytest.raises(ValueError, match="no force encoder"):
        field(batch, encoded_forces=torch.zeros(batch.num_atoms, 3), encode_mask=mask)


def _molecules():
    from ase.build import molecule

    from dens.data import collate, make_structure

    atoms = [molecule("CH3CH2OH"), molecule("H2O")]
    items = [make_structure(torch.tensor(a.positions, dtype=torch.float32), a.numbers, energy=0.0,
                            forces=torch.zeros(len(a), 3)) for a in atoms]  # fmt: skip
    return collate(items)


def test_the_trainer_refuses_force_encoding_without_an_encoder(tmp_path):
    from ase.build import molecule

    from dens.data import InMemoryDataset, collate, make_structure
    from dens.losses import DeNSSettings
    from dens.trainer import OptimSettings, Trainer, TrainerSettings

    items = [make_structure(torch.tensor(molecule(n).positions, dtype=torch.float32), molecule(n).numbers,
                            energy=0.0, forces=torch.ones(len(molecule(n)), 3)) for n in ("CH3CH2OH", "H2O")]  # fmt: skip
    torch.manual_seed(0)
    field = ForceField(EquiformerV2(**TINY_BACKBONE, dens_heads=True, encode_forces=False), max_neighbors=8)
    settings = TrainerSettings(run_dir=str(tmp_path), device="cpu", resume=None, tensorboard=False,
                               progress_bar=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"dens\.force_encoding=false"):
        Trainer(
            field, InMemoryDataset(items), None, OptimSettings(batch_size=2), DeNSSettings(prob=1.0), settings
        )
    dens = DeNSSettings(prob=1.0, force_encoding=False)
    trainer = Trainer(field, InMemoryDataset(items), None, OptimSettings(batch_size=2), dens, settings)
    parts = trainer.train_step([collate(items)])
    assert parts["noise"] > 0  # the noise head trained without an encoder


def test_an_official_no_encoding_checkpoint_keeps_its_noise_head():
    """Official EquiformerV2 DeNS with ``use_force_encoding=False``: no ``force_embedding`` weights, the
    noise head imported (before: built as a model without DeNS parts, the noise head's weights refused)."""
    from conftest import shared_path

    from dens.models.official import build_official_model, import_official_state_dict

    fixture = torch.load(shared_path("fixtures/official/eqv2_dens_small.pt"), weights_only=False)
    config = {**fixture["config"], "use_force_encoding": False}
    state = {k: v for k, v in fixture["state_dict"].items() if not k.startswith("force_embedding.")}
    model = build_official_model(fixture["model"], config)
    assert model.has_dens_heads and model.force_encoder is None
    import_official_state_dict(model, state)  # raises on a key without a place or a parameter left unset
    noise = {k: v for k, v in model.state_dict().items() if k.startswith("denoising_pos_block.")}
    assert noise and torch.equal(
        noise["denoising_pos_block.alpha_dot"], state["denoising_pos_block.alpha_dot"]
    )


def test_predict_takes_the_batch_to_the_models_dtype():
    # a float32 batch for a float64 model (a cryptic dtype error inside the backbone before)
    torch.manual_seed(0)
    model = ForceField(EquiformerV2(**TINY_BACKBONE, cutoff=5.0), cutoff=5.0).double().eval()
    batch = _molecules()
    assert batch.pos.dtype == torch.float32
    out = model.predict(batch)
    assert out["forces"].dtype == torch.float64
    same = model.predict(dataclasses.replace(batch, pos=batch.pos.double(), cell=batch.cell.double()))
    torch.testing.assert_close(out["energy"], same["energy"], atol=0, rtol=0)
    torch.testing.assert_close(out["forces"], same["forces"], atol=0, rtol=0)
