"""Training objectives: energy / force losses (Eq. 1) and DeNS (Eq. 6, Algorithm 2)."""

from .dens import (
    Corruption,
    CorruptionDraws,
    DeNSSettings,
    LossSettings,
    corrupt,
    dens_coefficient,
    loss_rows,
    model_inputs,
    step_counts,
    training_loss,
)
from .s2ef import energy_errors, force_errors, loss_dtype

__all__ = [
    "Corruption",
    "CorruptionDraws",
    "DeNSSettings",
    "LossSettings",
    "corrupt",
    "dens_coefficient",
    "energy_errors",
    "force_errors",
    "loss_dtype",
    "loss_rows",
    "model_inputs",
    "step_counts",
    "training_loss",
]
