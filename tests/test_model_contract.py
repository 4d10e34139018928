"""The backbone contract (dens.models.Backbone) and the one name of the DeNS parts (dens_heads), with the
old spellings still accepted: constructor ``use_force_encoding``, ``from_preset(dens=)`` and checkpoints
written before the rename."""

from __future__ import annotations

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
