"""Training objectives: energy / force losses (Eq. 1) and DeNS (Eq. 6, Algorithm 2)."""

from .dens import (
    Corruption,
    DeNSSettings,
    LossSettings,
    corrupt,
    dens_coefficient,
    loss_rows,
    step_counts,
    training_loss,
)
from .s2ef import global_mean, l2mae_sum, mae_sum

__all__ = [
    "Corruption",
    "DeNSSettings",
    "LossSettings",
    "corrupt",
    "dens_coefficient",
    "global_mean",
    "l2mae_sum",
    "loss_rows",
    "mae_sum",
    "step_counts",
    "training_loss",
]
