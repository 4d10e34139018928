"""Helpers shared by the inference drivers (:mod:`dens.evaluate`, :mod:`dens.calculator`, :mod:`dens.md`,
:mod:`dens.lbfgs`, :mod:`dens.relax`): where a model lives, a batch on its device and dtype, a progress bar.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .data.batch import Batch

__all__ = ["model_device", "model_dtype", "prepare_batch", "progress_bar"]


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of a model's parameters (float32 for a model without parameters)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def prepare_batch(batch: Batch, device: torch.device | str, dtype: torch.dtype) -> Batch:
    """``batch`` on ``device`` with positions and cell in ``dtype`` (labels keep their dtype)."""
    batch = batch.to(device)
    return dataclasses.replace(batch, pos=batch.pos.to(dtype), cell=batch.cell.to(dtype))


def progress_bar(iterable: Iterable[Any], total: int | None, desc: str, enabled: bool) -> Iterable[Any]:
    """``iterable`` behind a tqdm bar on stderr when ``enabled``, else unchanged."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, file=sys.stderr)
