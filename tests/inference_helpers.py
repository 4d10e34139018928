"""Small models and checkpoints shared by the evaluation, relaxation, calculator and MD tests."""

from __future__ import annotations

from pathlib import Path

import torch

from dens.models import EquiformerV2, ForceField

TINY_BACKBONE = {
    "num_layers": 1,
    "lmax": 2,
    "mmax": 1,
    "sphere_channels": 8,
    "attn_hidden_channels": 8,
    "num_heads": 2,
    "attn_alpha_channels": 4,
    "attn_value_channels": 4,
    "ffn_hidden_channels": 8,
    "edge_channels": 8,
    "grid_resolution": 8,
    "num_distance_basis": 32,
}


def tiny_force_field(
    direct_forces: bool = False,
    cutoff: float = 4.0,
    max_neighbors: int | None = 8,
    seed: int = 0,
    double: bool = True,
) -> ForceField:
    """A one-layer EquiformerV2 force field (gradient forces by default, float64) in eval mode."""
    torch.manual_seed(seed)
    backbone = EquiformerV2(**TINY_BACKBONE, cutoff=cutoff, direct_forces=direct_forces)
    model = ForceField(backbone, cutoff=cutoff, max_neighbors=max_neighbors)
    model = model.double() if double else model
    return model.eval()


def write_checkpoint(
    model: ForceField, path: Path, direct_forces: bool, ema_shift: float | None = None, cutoff: float = 4.0
) -> Path:
    """Save ``model`` in the layout of a dens training checkpoint (config + weights + optional EMA)."""
    config = {
        "model": {
            "_target_": "dens.models.ForceField",
            "backbone": {
                "_target_": "dens.models.EquiformerV2",
                **TINY_BACKBONE,
                "cutoff": cutoff,
                "direct_forces": direct_forces,
            },
            "cutoff": cutoff,
            "max_neighbors": model.max_neighbors,
        },
        "resolved_normalizer": {"energy_mean": 0.0, "energy_std": 1.0, "force_std": 1.0},
    }
    ema = None
    if ema_shift is not None:
        ema = {"decay": 0.999, "shadow": [p.detach().float().clone() + ema_shift for p in model.parameters()]}
    state = {"config": config, "model": {k: v.float() for k, v in model.state_dict().items()}, "ema": ema}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
