"""The training loop: optimiser, schedule, EMA, AMP, DDP, checkpoints, validation, logging.

The model is never changed for training: DDP, autocast, the EMA and checkpointing wrap it. Read
:meth:`Trainer.fit` top to bottom; one step is :meth:`Trainer.train_step`.

DDP follows nanoGPT: launched by ``torchrun``, detected from ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``.
The global batch (``optim.batch_size``) is fixed: per-device batch x devices x accumulation steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .data import BalancedBatchSampler, Batch, collate, get_natoms
from .losses import Corruption, DeNSSettings, LossSettings, corrupt, step_counts, training_loss
from .losses.stress import materials_settings, stress_term
from .models.potential import ForceField, compile_backbone
from .runtime import retain_freed_memory

__all__ = ["EMA", "OptimSettings", "Trainer", "TrainerSettings", "cosine_lambda", "evaluate_s2ef"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------
@dataclass
class OptimSettings:
    """Optimiser, schedule and batch (the Hydra ``optim`` group; Tables 7-9).

    ``warmup_epochs`` and ``max_epochs`` may be fractions; the schedule is stepped every iteration.
    """

    batch_size: int = 8  # global batch size
    lr: float = 2e-4
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    amsgrad: bool = False
    max_epochs: float = 12.0
    scheduler: str = "cosine"  # cosine | multistep
    warmup_epochs: float = 0.1
    warmup_factor: float = 0.2
    lr_min_factor: float = 0.01
    decay_epochs: list[float] = field(default_factory=list)  # multistep
    decay_rate: float = 0.3  # multistep
    clip_grad_norm: float | None = 100.0
    ema_decay: float | None = 0.999
    energy_coefficient: float = 2.0
    force_coefficient: float = 100.0
    train_on_free_atoms: bool = True


@dataclass
class TrainerSettings:
    """Run settings (the Hydra ``trainer`` group)."""

    run_dir: str = "runs/default"
    device: str = "auto"  # auto | cpu | cuda
    max_steps: int | None = None
    grad_accumulation: int = 1
    amp: str | None = None  # None | bf16 | fp16
    compile: bool = False  # torch.compile the backbone (dynamic shapes; the wrapper stays eager)
    retain_freed_memory: bool = True  # CPU training: reuse freed memory, no page faults (dens.runtime)
    eval_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 20
    resume: str | None = "auto"  # auto | null | a checkpoint path
    deterministic: bool = False
    seed: int = 0
    num_workers: int = 0
    nonfinite: str = "stop"  # stop | skip
    primary_metric: str = "forces_mae_meV_A"  # selects best.pt (OC22: energy_mae_meV)
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "dens"
    progress_bar: bool = True
    val_max_batches: int | None = None


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of the parameters (torch_ema's rule without the warm-up counter)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for s, p in zip(self.shadow, model.parameters(), strict=True):
            s.lerp_(p.detach(), 1 - self.decay)

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Temporarily load the averaged weights into ``model``."""
        backup = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            for p, s in zip(model.parameters(), self.shadow, strict=True):
                p.copy_(s)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(model.parameters(), backup, strict=True):
                    p.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        for s, v in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(v)


def cosine_lambda(
    step: int, warmup_steps: int, total_steps: int, warmup_factor: float, lr_min_factor: float
) -> float:
    """Linear warm-up from ``warmup_factor`` to 1, then cosine decay to ``lr_min_factor`` (OCP's rule)."""
    if step < warmup_steps:
        return warmup_factor + (1 - warmup_factor) * step / max(warmup_steps, 1)
    if step >= total_steps:
        return lr_min_factor
    return lr_min_factor + 0.5 * (1 - lr_min_factor) * (1 + math.cos(math.pi * step / total_steps))


def multistep_lambda(
    step: int, warmup_steps: int, milestones: list[int], warmup_factor: float, rate: float
) -> float:
    """Linear warm-up, then a factor ``rate`` at every milestone passed."""
    if step < warmup_steps:
        return warmup_factor + (1 - warmup_factor) * step / max(warmup_steps, 1)
    return rate ** sum(step >= m for m in milestones)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and per-degree norm weights (as the official EquiformerV2)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith((".affine_weight", ".affine_bias")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: a killed write leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())  # on disk before the rename
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    # the legacy global NumPy state too: user transforms may draw from it
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}  # noqa: NPY002
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])  # noqa: NPY002
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@torch.no_grad()
def evaluate_s2ef(
    model: ForceField, loader: Any, device: torch.device, max_batches: int | None = None
) -> dict[str, float]:
    """Energy MAE (meV), force MAE (meV/Å, free atoms) and counts over a loader; summed over DDP ranks."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # |dE| sum, structures, |dF| sum, components
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = batch.to(device)
        with torch.enable_grad() if not model.direct_forces else contextlib.nullcontext():
            pred = model.predict(batch)
        free = ~batch.fixed
        sums[0] += (pred["energy"] - batch.energy.to(torch.float64)).abs().sum()
        sums[1] += batch.num_graphs
        sums[2] += (pred["forces"][free].double() - batch.forces[free].double()).abs().sum()
        sums[3] += 3 * free.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    return {
        "energy_mae_meV": 1000 * (sums[0] / sums[1].clamp(min=1)).item(),
        "forces_mae_meV_A": 1000 * (sums[2] / sums[3].clamp(min=1)).item(),
        "structures": int(sums[1].item()),
    }


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------
class Trainer:
    """Trains a :class:`~dens.models.ForceField` with the DeNS objective.

    Parameters
    ----------
    model : ForceField
        The model (normalisation constants included).
    train_set, val_set : Dataset
        Datasets of structure dicts (``dens.data``).
    optim, losses, dens, settings : dataclasses
        The ``optim``, loss, ``dens`` and ``trainer`` settings.
    config : dict, optional
        The resolved run configuration, stored in every checkpoint.
    """

    def __init__(
        self,
        model: ForceField,
        train_set: Any,
        val_set: Any | None,
        optim: OptimSettings,
        dens: DeNSSettings,
        settings: TrainerSettings,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.optim, self.dens, self.settings, self.config = optim, dens, settings, config or {}
        self.losses = LossSettings(
            optim.energy_coefficient, optim.force_coefficient, optim.train_on_free_atoms
        )
        # materials (config section `materials`): energy per atom and a stress term (dens.losses.stress)
        materials = self.config.get("materials") or {}
        self.losses.energy_per_atom = bool(materials.get("energy_per_atom", False))
        self.stress = materials_settings(model, materials)
        self._setup_distributed()
        self.run_dir = Path(settings.run_dir)
        if settings.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(settings.seed + self.rank)
        np.random.seed(settings.seed + self.rank)  # noqa: NPY002
        random.seed(settings.seed + self.rank)

        if settings.retain_freed_memory and self.device.type == "cpu":
            retain_freed_memory()
        self.model = model.to(self.device)
        if settings.compile:
            if not getattr(self.model, "direct_forces", True):
                raise ValueError(
                    "trainer.compile: training a gradient-force model needs a double backward, which "
                    "torch.compile does not support; use compile=false for this model"
                )
            # in place, block by block: parameter names, checkpoints and DDP see the unchanged module
            compile_backbone(self.model.backbone)
        self.ddp_model: nn.Module = self.model
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, optim.weight_decay),
            lr=optim.lr,
            betas=tuple(optim.betas),
            amsgrad=optim.amsgrad,
        )
        self.ema = EMA(self.model, optim.ema_decay) if optim.ema_decay else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.amp == "fp16")

        per_step = self.world_size * settings.grad_accumulation
        if optim.batch_size % per_step:
            raise ValueError(
                f"optim.batch_size={optim.batch_size} is not divisible by devices x accumulation = {per_step}"
            )
        self.device_batch_size = optim.batch_size // per_step
        self.train_sampler = BalancedBatchSampler(
            get_natoms(train_set), self.device_batch_size, num_replicas=self.world_size, rank=self.rank,
            shuffle=True, seed=settings.seed, drop_last=True,
        )  # fmt: skip
        # The loaders draw their workers' base seeds from their own generator: drawing from the global RNG
        # (PyTorch's default) would shift the DeNS noise and dropout streams on resume.
        self.train_loader = DataLoader(
            train_set, batch_sampler=self.train_sampler, collate_fn=collate, num_workers=settings.num_workers,
            generator=torch.Generator().manual_seed(settings.seed),
        )  # fmt: skip
        self.val_loader = None
        if val_set is not None:
            # each structure exactly once over all ranks (a padded sampler would count some twice)
            shard = list(range(self.rank, len(val_set), self.world_size))
            val_batches = [
                shard[i : i + self.device_batch_size] for i in range(0, len(shard), self.device_batch_size)
            ]
            self.val_loader = DataLoader(
                val_set, batch_sampler=val_batches, collate_fn=collate, num_workers=settings.num_workers,
                generator=torch.Generator().manual_seed(settings.seed),
            )  # fmt: skip
        self.steps_per_epoch = len(self.train_sampler) // settings.grad_accumulation
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set is smaller than one global batch ({optim.batch_size} structures)"
            )
        self.total_steps = max(1, int(optim.max_epochs * self.steps_per_epoch))
        if settings.max_steps is not None:
            self.total_steps = min(self.total_steps, settings.max_steps)
        schedule_steps = max(1, int(optim.max_epochs * self.steps_per_epoch))
        self.schedule_steps = schedule_steps
        warmup = int(optim.warmup_epochs * self.steps_per_epoch)
        if optim.scheduler == "cosine":
            lam = lambda s: cosine_lambda(s, warmup, schedule_steps, optim.warmup_factor, optim.lr_min_factor)  # noqa: E731
        elif optim.scheduler == "multistep":
            milestones = [int(e * self.steps_per_epoch) for e in optim.decay_epochs]
            lam = lambda s: multistep_lambda(s, warmup, milestones, optim.warmup_factor, optim.decay_rate)  # noqa: E731
        else:
            raise ValueError(f"optim.scheduler must be 'cosine' or 'multistep', got {optim.scheduler!r}")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lam)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches consumed in the current epoch
        self.best_metric = math.inf
        self.history: list[dict[str, Any]] = []
        self._writer = None

    # -- set-up ------------------------------------------------------------------------------------
    def _setup_distributed(self) -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        want = self.settings.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda":
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device(want)
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best_metric": self.best_metric,
            "rng": _rng_state(),
            "world_size": self.world_size,
            "config": self.config,
            "history": self.history,
        }

    def save(self, name: str = "last.pt") -> Path | None:
        path = self.run_dir / "checkpoints" / name
        if self.is_main:
            _atomic_save(self.state_dict(), path)
        else:  # every rank keeps its own DeNS-noise and dropout streams
            _atomic_save({"step": self.step, "rng": _rng_state()}, self._rank_rng_path(path))
        return path

    def _rank_rng_path(self, path: Path) -> Path:
        return path.with_name(f"{path.stem}.rng{self.rank}.pt")

    def load(self, path: str | Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=False)  # RNG states must stay on the CPU
        self.model.load_state_dict(state["model"])
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best_metric, self.history = state["best_metric"], state.get("history", [])
        rng = state["rng"]
        if self.rank > 0:
            rank_file = self._rank_rng_path(Path(path))
            own = (
                torch.load(rank_file, map_location="cpu", weights_only=False) if rank_file.exists() else None
            )
            if own is not None and own["step"] == self.step and state.get("world_size") == self.world_size:
                rng = own["rng"]
            else:  # another world size, or a kill between the writes: fresh but reproducible streams
                logger.warning("rank %d: no RNG state for step %d; reseeding", self.rank, self.step)
                torch.manual_seed(self.settings.seed * 1_000_003 + self.rank * 7919 + self.step)
                rng = None
        if rng is not None:
            _set_rng_state(rng)
        logger.info("resumed from %s at step %d", path, self.step)

    def _maybe_resume(self) -> None:
        resume = self.settings.resume
        if resume in (None, "null", "none", False):
            return
        path = self.run_dir / "checkpoints" / "last.pt" if resume == "auto" else Path(resume)
        if path.exists():
            self.load(path)
        elif resume != "auto":
            raise FileNotFoundError(f"trainer.resume={resume}: no checkpoint at {path}")

    # -- logging -----------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.history.append(record)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.settings.tensorboard and self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                logger.warning("tensorboard is not installed: metrics go to metrics.jsonl only")
                self.settings.tensorboard = False
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._writer.add_scalar(key, value, record["step"])
        if self.settings.wandb:
            import wandb

            if wandb.run is None:
                wandb.init(project=self.settings.wandb_project, config=self.config, dir=str(self.run_dir))
            wandb.log(record, step=record["step"])

    # -- training ----------------------------------------------------------------------------------
    def _autocast(self):
        if self.settings.amp is None:
            return contextlib.nullcontext()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[self.settings.amp]
        return torch.autocast(self.device.type, dtype=dtype)

    def _micro_batches(self):
        """Micro-batches of the current epoch from the saved position on; epochs advance forever."""
        while True:
            self.train_sampler.set_epoch_and_start_iteration(self.epoch, self.batch_in_epoch)
            for batch in self.train_loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    def train_step(
        self, micro_batches: list[Batch], corruptions: list[Corruption | None] | None = None
    ) -> dict[str, float]:
        """One optimiser step over ``grad_accumulation`` micro-batches (forward, loss, backward, step, EMA).

        ``corruptions`` replaces the DeNS draws of the micro-batches (one :class:`Corruption` or None
        each, on this trainer's device): the objective-fixture tests inject the official draws here.
        """
        self.ddp_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.dens.schedule_unit == "epoch":  # official MD17: lambda_DeNS(epoch), constant in an epoch
            progress = self.epoch / max(self.optim.max_epochs, 1e-12)
        else:
            progress = self.step / self.schedule_steps
        totals: dict[str, float] = {}
        use_dens = self.dens.enabled and self.model.uses_dens
        if corruptions is not None and len(corruptions) != len(micro_batches):
            raise ValueError(f"{len(corruptions)} corruptions for {len(micro_batches)} micro-batches")
        items = []
        for i, batch in enumerate(micro_batches):
            batch = batch.to(self.device)
            if corruptions is not None:
                items.append((batch, corruptions[i] if use_dens else None))
                continue
            # selection='batch': one coin per global batch, from the same generator state on every rank
            coin = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + self.step)
            items.append((batch, corrupt(batch, self.dens, batch_coin=coin) if use_dens else None))
        counts = step_counts(items, self.losses, self.dens)  # exact global means under accumulation
        for i, (batch, corruption) in enumerate(items):
            sync = i == len(items) - 1 or self.world_size == 1
            ctx = contextlib.nullcontext() if sync else self.ddp_model.no_sync()
            with ctx, self._autocast():
                kwargs: dict[str, Any] = {}
                if corruption is not None:
                    kwargs["pos"] = corruption.pos
                if self.model.uses_dens:
                    # Without force encoding (or DeNS this step) the encoder still runs, on masked-out zero
                    # forces: the same embedding as none (its l = 0 bias), but every parameter takes part,
                    # which DDP requires.
                    encode = corruption is not None and self.dens.force_encoding
                    kwargs["encoded_forces"] = (
                        batch.forces * self.dens.force_encoding_scale
                        if encode
                        else torch.zeros_like(batch.forces)
                    )
                    # head_mask: the corrupted atoms, and with dens.mask_atoms='all' the masked fixed ones
                    kwargs["encode_mask"] = corruption.head_mask if encode else torch.zeros_like(batch.fixed)
                    # the loss reads the force head on uncorrupted atoms and the noise head on corrupted
                    # ones: run each head only where it is read (exact, and the noise head costs ~nothing)
                    kwargs["noise_mask"] = None if corruption is None else corruption.head_mask
                    kwargs["split_heads"] = True
                if getattr(self.model.backbone, "stress_head", None) is not None:
                    # a stress head with use_denoising off zeroes exactly the DeNS structures
                    kwargs["denoising"] = False if corruption is None else corruption.dens_structures
                out = self.ddp_model(batch, **kwargs)
                loss, parts = training_loss(
                    out, batch, corruption, self.losses, self.dens, float(self.model.energy_mean),
                    float(self.model.energy_std), float(self.model.force_std), progress, counts=counts,
                )  # fmt: skip
                if self.stress is not None:
                    term = stress_term(
                        out, batch.extra.get("stress"), self.stress,
                        None if corruption is None else corruption.dens_structures,
                        counts["structures"] / self.world_size,
                    )  # fmt: skip
                    loss = loss + self.stress.coefficient * term
                    parts["stress"] = term.detach()
            if not self._all_finite(loss):
                ids = list(zip(_as_list(batch.sid), _as_list(batch.fid), strict=False))
                return self._skip_or_stop(
                    f"non-finite loss {loss.item()} at step {self.step} (this rank's structures (sid, fid): {ids})"
                )
            self.scaler.scale(loss).backward()
            totals["loss"] = totals.get("loss", 0.0) + loss.item()
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value.item()
        self.scaler.unscale_(self.optimizer)
        max_norm = self.optim.clip_grad_norm or math.inf
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)  # after DDP's all-reduce
        totals["grad_norm"] = float(grad_norm)
        if not torch.isfinite(grad_norm) and self.settings.amp != "fp16":  # fp16: the scaler skips the step
            return self._skip_or_stop(f"non-finite gradient norm {float(grad_norm)} at step {self.step}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema:
            self.ema.update(self.model)
        return totals

    def _all_finite(self, loss: Tensor) -> bool:
        """Whether the loss is finite on every rank (all ranks must take the same branch)."""
        flag = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _skip_or_stop(self, message: str) -> dict[str, float]:
        if self.settings.nonfinite != "skip":
            raise FloatingPointError(message)
        logger.warning("%s: skipping the step", message)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # the schedule follows the data, skipped steps included
        return {"skipped": 1.0}

    def validate(self) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        ctx = self.ema.applied(self.model) if self.ema else contextlib.nullcontext()
        with ctx:
            return evaluate_s2ef(self.model, self.val_loader, self.device, self.settings.val_max_batches)

    def fit(self) -> list[dict[str, Any]]:
        """Train to ``total_steps`` (resuming when a checkpoint exists); returns the validation history."""
        self._maybe_resume()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "config.json", "w") as fh:
                json.dump(self.config, fh, indent=2, default=str)
        if self.step == 0:
            self._log({"step": 0, **self._prefixed("val", self.validate())})
        bar = None
        if self.settings.progress_bar and self.is_main:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)
        batches = self._micro_batches()
        window_start, window_structures = time.perf_counter(), 0
        while self.step < self.total_steps:
            micro = [next(batches) for _ in range(self.settings.grad_accumulation)]
            stats = self.train_step(micro)
            self.step += 1
            window_structures += sum(b.num_graphs for b in micro) * self.world_size
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{stats.get('loss', float('nan')):.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}"
                )
            if self.step % self.settings.log_every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                record = {"step": self.step, "epoch": self.epoch, "lr": self.scheduler.get_last_lr()[0],
                          "structures_per_s": window_structures / max(elapsed, 1e-9),
                          "window_s": elapsed, "world_size": self.world_size,
                          **self._prefixed("train", stats)}  # fmt: skip
                self._log(record)
                window_start, window_structures = time.perf_counter(), 0
            if self.step % self.settings.eval_every == 0 or self.step == self.total_steps:
                metrics = self.validate()
                if metrics:
                    self._log({"step": self.step, **self._prefixed("val", metrics)})
                    if metrics[self.settings.primary_metric] < self.best_metric:
                        self.best_metric = metrics[self.settings.primary_metric]
                        self._save_best()
            if self.step % self.settings.checkpoint_every == 0 or self.step == self.total_steps:
                self.save()
        if bar is not None:
            bar.close()
        if self._writer is not None:
            self._writer.close()
        return [r for r in self.history if any(k.startswith("val/") for k in r)]

    def _save_best(self) -> None:
        """``best.pt``: EMA weights (when used), the normalisation and the config, for evaluation."""
        if not self.is_main:
            return
        ctx = self.ema.applied(self.model) if self.ema else contextlib.nullcontext()
        with ctx:
            _atomic_save({"model": self.model.state_dict(), "config": self.config, "step": self.step},
                         self.run_dir / "checkpoints" / "best.pt")  # fmt: skip

    @staticmethod
    def _prefixed(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
        return {f"{prefix}/{k}": v for k, v in values.items()}


def _as_list(ids: Any) -> list[Any]:
    if ids is None:
        return []
    return ids.tolist() if isinstance(ids, Tensor) else list(ids)
