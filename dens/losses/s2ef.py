"""Energy and force losses (Eq. 1) and their averaging across DDP ranks.

Every loss term is a mean over a set of items (structures or atoms) of the whole global batch: each rank
computes the sum over its items and divides by the global count (an all-reduce of the counts), times the
world size, so that DDP's gradient averaging yields exactly the gradient of the global mean. On one
process this is the plain mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["global_mean", "l2mae_sum", "mae_sum"]


def global_mean(total: Tensor, count: Tensor) -> Tensor:
    """``total / count`` over all DDP ranks (see the module docstring); 0 when nothing is counted."""
    count = count.detach().to(total.dtype)
    world = 1
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        count = count.clone()
        dist.all_reduce(count)
    return total * world / count.clamp(min=1)


def mae_sum(pred: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of ``|pred - target|`` over the masked rows, and their count."""
    diff = (pred - target.to(pred.dtype)).abs()
    diff = diff.reshape(diff.shape[0], -1).sum(-1)
    return (diff * mask).sum(), mask.sum()


def l2mae_sum(pred: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of the per-row Euclidean norms ``||pred - target||`` over the masked rows, and their count.

    This is OCP's ``l2mae`` force loss: the mean over atoms of the norm of the force error.
    """
    norm = torch.linalg.vector_norm(pred - target.to(pred.dtype), dim=-1)
    return (norm * mask).sum(), mask.sum()
