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

from . import distributed
from .checkpoint import (
    CheckpointError,
    atomic_save,
    element_names,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from .data import BalancedBatchSampler, Batch, collate, get_natoms
from .data.dataset import require_labels
from .evaluate import S2EFMetrics
from .losses import Corruption, DeNSSettings, LossSettings, corrupt, model_inputs, step_counts, training_loss
from .losses.stress import materials_settings, stress_term
from .models.potential import ForceField, compile_backbone, require_compilable
from .rundir import RunDirLock, archive_run, config_differences, format_differences, truncate_metrics
from .runtime import ThreadChoice, native_half_products, retain_freed_memory, training_threads
from .settings import check_settings

__all__ = ["EMA", "OptimSettings", "Trainer", "TrainerSettings", "cosine_lambda", "evaluate_s2ef"]

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # trainer.amp

logger = logging.getLogger(__name__)

#: A validation metric this many times worse than the untrained model's (step 0) never becomes best.pt.
EXPLODED_FACTOR = 10.0


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
    max_steps: int | None = None  # cuts a run; the schedule keeps the length of optim.max_epochs
    steps: int | None = None  # train exactly this many steps: the schedule (and its warm-up) sized to them
    init_from: str | None = (
        None  # start from these weights (dens/official checkpoint; dens.train, fine-tuning)
    )
    init_normalizer: str = "refit"  # refit | keep: the normaliser and references of init_from's model
    grad_accumulation: int = 1
    amp: str | None = None  # None | bf16 | fp16 (CPU autocast too: bf16 on CPUs with bf16 instructions)
    # torch.compile the backbone (dynamic shapes; the wrapper stays eager), after the thread choice if any
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend ("aot_eager": tracing only, for checks)
    # inductor settings over dens's (e.g. {"cpp_wrapper": true}: see docs/performance.md)
    compile_options: dict[str, Any] = field(default_factory=dict)
    retain_freed_memory: bool = True  # CPU training: reuse freed memory, no page faults (dens.runtime)
    eval_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 20
    resume: str | None = "auto"  # auto | force | null | a checkpoint path (see Trainer._maybe_resume)
    fresh: bool = False  # start anew in a run_dir that holds a run (its files move to run_dir/previous/)
    deterministic: bool = False
    seed: int = 0
    num_workers: int = 0
    threads: int | None = None  # CPU threads; None: usable cores less num_workers (runtime.training_threads)
    tune_threads: bool = True  # threads None: time the first steps with fewer threads too, keep the fastest
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


_atomic_save = atomic_save  # the name the tests and older code import


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
    """Energy MAE (meV), force MAE (meV/Å, free atoms) and counts over a loader; summed over DDP ranks.

    With a stress head and stress labels also the stress MAE over the nine components of the labelled
    structures: ``stress_mae_meV_A3`` (meV/Å³) and ``stress_mae_GPa``. The numbers are those of
    :class:`dens.evaluate.S2EFMetrics` (the one implementation) under the trainer's names, which the
    history, the logs and ``primary_metric`` use.
    """
    model.eval()
    metrics = S2EFMetrics(device=device)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = batch.to(device)
        with torch.enable_grad() if not model.direct_forces else contextlib.nullcontext():
            pred = model.predict(batch)
        metrics.update(pred["energy"], pred["forces"], batch)
        if "stress" in pred:
            metrics.update_stress(pred["stress"], batch)
    metrics.all_reduce()
    values = metrics.compute()
    out = {
        "energy_mae_meV": values.get("energy_mae", 0.0),
        "forces_mae_meV_A": values.get("forces_mae", 0.0),
        "structures": int(values["structures"]),
    }
    if "stress_mae" in values:
        out.update(stress_mae_meV_A3=values["stress_mae"], stress_mae_GPa=values["stress_mae_GPa"])
    return out


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
        check_settings(optim, dens, settings)  # named errors before any device or data is touched
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

        # set when the thread count is to be chosen from the first steps (_timed_step)
        self.thread_choice: ThreadChoice | None = None
        self._process_threads: int | None = None  # restored after fit: the next trainer starts from it
        if self.device.type == "cpu":
            self._process_threads = torch.get_num_threads()
            threads = settings.threads or training_threads(settings.num_workers)
            torch.set_num_threads(threads)
            # Not with several ranks (a step's time includes waiting for the others) or deterministic runs
            # (the count changes the order of sums). A compiled run chooses on eager steps and compiles
            # after: a new thread count would recompile every graph.
            if (settings.threads is None and settings.tune_threads and threads > 1 and self.world_size == 1
                    and not settings.deterministic):  # fmt: skip
                self.thread_choice = ThreadChoice(threads)
            if settings.retain_freed_memory:
                retain_freed_memory()
        self.model = model.to(self.device)
        self._element_limit = _element_limit(self.model)
        if (
            dens.enabled
            and dens.force_encoding
            and self.model.has_dens_heads
            and not self.model.has_force_encoder
        ):
            raise ValueError(
                "dens.force_encoding=true, but the model has no force encoder (built with encode_forces=false, "
                "the official no-encoding ablation): set dens.force_encoding=false"
            )
        for dataset in (train_set, val_set):
            if dataset is not None:  # missing labels / unembedded elements: errors that name file and frame
                require_labels(dataset, ("energy", "forces"), self._element_limit)
        # compiled now, or at the first step after the thread choice (fit's eager steps time the counts: a
        # new count would recompile every graph); refused now if it cannot be compiled
        self._compile_pending = settings.compile
        self._choosing_threads = False
        if settings.compile:
            if self.thread_choice is None:
                self._compile()
            else:  # compile_backbone refuses when it runs; a deferred compile is refused here instead
                require_compilable(self.model.backbone, training=True)
                logger.info("trainer.compile: the backbone is compiled once the thread count is chosen (after "
                            "%d eager steps)", self.thread_choice.decided_after)  # fmt: skip
        self.ddp_model: nn.Module = self.model
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        # fused: one kernel for all tensors instead of ~10 per tensor (a small model's step spent 6 % in
        # the per-tensor update on CPU); a checkpoint keeps the setting it was written with
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, optim.weight_decay),
            lr=optim.lr,
            betas=tuple(optim.betas),
            amsgrad=optim.amsgrad,
            fused=self.device.type in ("cpu", "cuda"),
        )
        self.ema = EMA(self.model, optim.ema_decay) if optim.ema_decay else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.amp == "fp16")
        if self.device.type == "cpu" and settings.amp is not None:
            if native_half_products(_AMP_DTYPES[settings.amp]) is None:
                logger.warning("trainer.amp=%s: this CPU has no %s matrix instructions, so the products are "
                               "converted to float32 and back, slower than trainer.amp=null "
                               "(docs/performance.md)", settings.amp, settings.amp)  # fmt: skip

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
        schedule_steps = max(1, int(optim.max_epochs * self.steps_per_epoch))
        warmup = int(optim.warmup_epochs * self.steps_per_epoch)
        if settings.steps is not None:  # the whole schedule, warm-up and milestones scaled to `steps`
            scale = settings.steps / schedule_steps
            self.total_steps = schedule_steps = max(1, int(settings.steps))
            warmup = round(warmup * scale)
            optim.decay_epochs = [e * scale for e in optim.decay_epochs]
        if settings.max_steps is not None:
            self.total_steps = min(self.total_steps, settings.max_steps)
        self.schedule_steps = schedule_steps
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
        self.training_elements: set[int] = set()  # atomic numbers in the batches trained on so far
        self.initial_metric: float | None = None  # the untrained model's validation metric (step 0)
        self._lock: RunDirLock | None = None
        self._purge_step: int | None = None
        # called with (metrics, step) after every validation on the main rank (dens.feedback.ValidationTable)
        self.on_validation: Any = None

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
            # closed at exit once gloo's worker threads are done with our tensors (dens.distributed)
            distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

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
            "training_elements": sorted(self.training_elements),
            "initial_metric": self.initial_metric,
        }

    def save(self, name: str = "last.pt") -> Path | None:
        path = self.run_dir / "checkpoints" / name
        self._gather_elements()
        if self.is_main:
            save_checkpoint(self.state_dict(), path)
        else:  # every rank keeps its own DeNS-noise and dropout streams
            save_checkpoint({"step": self.step, "rng": _rng_state()}, self._rank_rng_path(path))
        return path

    def _rank_rng_path(self, path: Path) -> Path:
        return path.with_name(f"{path.stem}.rng{self.rank}.pt")

    def load(self, path: str | Path, state: dict[str, Any] | None = None) -> None:
        """Resume the full training state of checkpoint ``path`` (``state``: its contents, if already read)."""
        state = load_checkpoint(path) if state is None else state
        _check_resumable(state, path)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise CheckpointError(
                f"{path}: its weights do not fit this model (another model size or architecture; "
                f"{str(err).splitlines()[0]} ...); train in another trainer.run_dir, or start anew in this one "
                f"with trainer.fresh=true"
            ) from err
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best_metric, self.history = state["best_metric"], state.get("history", [])
        self.training_elements = set(state.get("training_elements") or [])
        self.initial_metric = state.get("initial_metric")
        rng = state["rng"]
        if self.rank > 0:
            rank_file = self._rank_rng_path(Path(path))
            own = load_checkpoint(rank_file) if rank_file.exists() else None
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
        """Resume as ``trainer.resume`` and ``trainer.fresh`` say.

        * ``auto`` (default): continue ``run_dir/checkpoints/last.pt`` when it exists and was trained with
          the same configuration; a different one is an error that lists the differing keys (the settings
          of :data:`dens.rundir.RUN_CONTROL_KEYS`, e.g. ``max_steps``, may change).
        * ``force``: continue ``last.pt`` even so; the differences are logged and kept in ``config.json``
          (``resumed_with_changes``). The saved training state (weights, optimiser, schedule) continues.
        * a path: continue that checkpoint (differences are logged).
        * ``null``: never resume; a run_dir that already holds a run is then an error, unless
          ``trainer.fresh=true``, which moves that run's files to ``run_dir/previous/<time>`` first.
        """
        resume, last = self.settings.resume, self.run_dir / "checkpoints" / "last.pt"
        never = resume in (None, "null", "none", False)
        if self.settings.fresh:
            if self.is_main:
                archive_run(self.run_dir)
            self._barrier()
            if never or resume in ("auto", "force"):
                return
        elif never:
            if last.exists():
                raise FileExistsError(
                    f"trainer.resume=null but {self.run_dir} holds a run ({last}); to start anew there set "
                    f"trainer.fresh=true (the old files move to {self.run_dir / 'previous'}), or choose "
                    f"another trainer.run_dir"
                )
            return
        explicit = resume not in ("auto", "force")
        path = Path(resume) if explicit else last
        if not path.exists():
            if explicit:
                raise FileNotFoundError(f"trainer.resume={resume}: no checkpoint at {path}")
            return
        state = load_checkpoint(path)
        _check_resumable(state, path)
        diff = config_differences(state.get("config") or {}, self.config)
        if diff and resume == "auto":
            raise ValueError(
                f"{self.run_dir} holds a run trained with another configuration, which trainer.resume=auto "
                f"will not continue: {format_differences(diff)}. Use trainer.resume=force to continue it with "
                f"the new values, trainer.fresh=true to start anew in this directory (the old run moves to "
                f"{self.run_dir / 'previous'}), or another trainer.run_dir"
            )
        if diff:
            logger.warning("resuming %s with a changed configuration: %s", path, format_differences(diff))
            self.config = {**self.config, "resumed_with_changes": {k: list(v) for k, v in diff.items()}}
        self.load(path, state)

    def _barrier(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()

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

                # a resumed run drops the events written after its checkpoint
                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self._purge_step)
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
        return torch.autocast(self.device.type, dtype=_AMP_DTYPES[self.settings.amp])

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
        if self._compile_pending and not self._choosing_threads:
            self._compile()
        self.ddp_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.dens.schedule_unit == "epoch":  # official MD17: lambda_DeNS(epoch), constant in an epoch
            progress = self.epoch / max(self.optim.max_epochs, 1e-12)
        else:
            progress = self.step / self.schedule_steps
        totals: dict[str, float] = {}
        use_dens = self.dens.enabled and self.model.has_dens_heads
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
                inputs = model_inputs(
                    batch,
                    corruption,
                    self.dens,
                    self.model.has_dens_heads,
                    self.model.has_stress_head,
                    self.model.has_force_encoder,
                )
                out = self.ddp_model(batch, **inputs)
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
        # after DDP's all-reduce; without clipping only the norm (logged, and checked for non-finite values)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = nn.utils.get_total_norm(grads)
        if self.optim.clip_grad_norm:
            nn.utils.clip_grads_with_norm_(self.model.parameters(), self.optim.clip_grad_norm, grad_norm)
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
            distributed.all_reduce(flag, op=dist.ReduceOp.MIN)
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
        """Train to ``total_steps`` (resuming when a checkpoint exists); returns the validation history.

        The run directory is locked for the duration (a second run on it fails, naming this one).
        """
        if self.is_main:
            self._lock = RunDirLock(self.run_dir).acquire()
        try:
            return self._fit()
        finally:
            if self._process_threads is not None:
                torch.set_num_threads(self._process_threads)
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _fit(self) -> list[dict[str, Any]]:
        if self.is_main:
            for folder in (self.run_dir, self.run_dir / "checkpoints"):  # leftovers of killed writes
                remove_stale_temporaries(folder)
        self._maybe_resume()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            self._purge_step = self.step + 1 if self.step > 0 else None  # TensorBoard: the same truncation
            atomic_write_json(self.run_dir / "config.json", self.config)
        if self.step == 0:
            metrics = self.validate()
            if metrics:
                self.initial_metric = metrics[self.settings.primary_metric]
            self._log({"step": 0, **self._prefixed("val", metrics)})
            self._report(metrics)
        bar = None
        if self.settings.progress_bar and self.is_main:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)
        batches = self._micro_batches()
        window_start, window_structures = time.perf_counter(), 0
        while self.step < self.total_steps:
            micro = [next(batches) for _ in range(self.settings.grad_accumulation)]
            for b in micro:
                self._check_batch(b)
            stats = self._timed_step(micro)
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
                    self._report(metrics)
                    if self._is_new_best(metrics[self.settings.primary_metric]):
                        self.best_metric = metrics[self.settings.primary_metric]
                        self._save_best()
            if self.step % self.settings.checkpoint_every == 0 or self.step == self.total_steps:
                self.save()
        if bar is not None:
            bar.close()
        if self.val_loader is None and self.step > 0:
            self._save_best()  # no validation set: best.pt holds the final weights, so its commands work
        if self._writer is not None:
            self._writer.close()
        return [r for r in self.history if any(k.startswith("val/") for k in r)]

    def _compile(self) -> None:
        """``trainer.compile``: the backbone compiled in place (block by block, or a gradient-force model's
        energy with its gradient): parameter names, checkpoints and DDP see the unchanged module."""
        compile_backbone(
            self.model.backbone, training=True, backend=self.settings.compile_backend,
            options=dict(self.settings.compile_options),
        )  # fmt: skip
        self._compile_pending = False

    def _timed_step(self, micro: list[Batch]) -> dict[str, float]:
        """:meth:`train_step`, with the thread count of :attr:`thread_choice` while it is being chosen."""
        choice = self.thread_choice
        if choice is None or choice.chosen is not None:
            return self.train_step(micro)
        threads = choice.next_threads()
        torch.set_num_threads(threads)
        start = time.perf_counter()
        self._choosing_threads = True
        try:
            stats = self.train_step(micro)
        finally:
            self._choosing_threads = False
        chosen = choice.record(threads, time.perf_counter() - start)
        if chosen is not None:
            torch.set_num_threads(chosen)
            medians = ", ".join(f"{n}: {1000 * choice.median(n):.1f} ms" for n in choice.candidates)
            logger.info(
                "CPU threads: %d from here on (median step time per thread count: %s)", chosen, medians
            )
        return stats

    def _is_new_best(self, value: float) -> bool:
        """Whether a validation metric becomes best.pt: finite, better than the best so far, and not
        :data:`EXPLODED_FACTOR` times worse than the untrained model's (weights that exploded under
        ``trainer.nonfinite=skip`` can still give finite, absurd errors)."""
        if not math.isfinite(value):
            logger.warning("step %d: validation %s is %s; not a candidate for best.pt", self.step,
                           self.settings.primary_metric, value)  # fmt: skip
            return False
        if self.initial_metric is not None and value > EXPLODED_FACTOR * self.initial_metric:
            logger.warning(
                "step %d: validation %s = %.4g is over %g x the untrained model's %.4g (exploded weights?); "
                "not saved as best.pt", self.step, self.settings.primary_metric, value, EXPLODED_FACTOR,
                self.initial_metric,
            )  # fmt: skip
            return False
        return value < self.best_metric

    def _check_batch(self, batch: Batch) -> None:
        """Labels and embeddable elements of a training batch (readers that are no StructureDataset are
        not covered by :func:`~dens.data.dataset.require_labels`); records the elements trained on."""
        missing = [key for key in ("energy", "forces") if getattr(batch, key) is None]
        ids = list(zip(_as_list(batch.sid), _as_list(batch.fid), strict=False))
        if missing:
            raise ValueError(
                f"a training batch has no {' or '.join(missing)} labels (structures (sid, fid): {ids})"
            )
        present = torch.unique(batch.atomic_numbers).tolist()
        if self._element_limit is not None and present and max(present) >= self._element_limit:
            raise ValueError(
                f"training batch with structures (sid, fid) {ids} has {element_names([max(present)])}, which the "
                f"model does not embed (max_num_elements={self._element_limit})"
            )
        self.training_elements.update(int(z) for z in present)

    def _gather_elements(self) -> None:
        """The union of the elements every rank trained on (called by all ranks before a save)."""
        if self.world_size == 1:
            return
        seen = torch.zeros(256, dtype=torch.float32, device=self.device)  # Z <= 118 (validated)
        if self.training_elements:
            seen[sorted(self.training_elements)] = 1.0
        distributed.all_reduce(seen, op=dist.ReduceOp.MAX)
        self.training_elements = {int(z) for z in torch.nonzero(seen).flatten().tolist()}

    def _report(self, metrics: dict[str, float]) -> None:
        if self.is_main and self.on_validation is not None and metrics:
            self.on_validation(metrics, self.step)

    def _save_best(self) -> None:
        """``best.pt``: EMA weights (when used), the normalisation, the config and the elements trained on."""
        self._gather_elements()
        if not self.is_main:
            return
        ctx = self.ema.applied(self.model) if self.ema else contextlib.nullcontext()
        with ctx:
            save_checkpoint({"model": self.model.state_dict(), "config": self.config, "step": self.step,
                             "training_elements": sorted(self.training_elements)},
                            self.run_dir / "checkpoints" / "best.pt")  # fmt: skip

    @staticmethod
    def _prefixed(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
        return {f"{prefix}/{k}": v for k, v in values.items()}


def _element_limit(model: nn.Module) -> int | None:
    from .calculator import element_limit

    return element_limit(model)


def _check_resumable(state: dict[str, Any], path: str | Path) -> None:
    """A checkpoint to resume must hold the training state, not only weights (best.pt)."""
    missing = [k for k in ("model", "optimizer", "scheduler", "step", "rng") if k not in state]
    if missing:
        raise CheckpointError(
            f"{path} holds no training state (no {', '.join(missing)}): best.pt keeps only the weights, for "
            f"evaluation, so it cannot resume a run. Resume from last.pt, or start a new run from these "
            f"weights with trainer.init_from={path} (fine-tuning)"
        )


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename (a kill never leaves half a config.json)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _as_list(ids: Any) -> list[Any]:
    if ids is None:
        return []
    return ids.tolist() if isinstance(ids, Tensor) else list(ids)
