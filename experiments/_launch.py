"""Launching the runs: local commands (``torchrun`` for several GPUs), SLURM scripts, the state of a run
directory and the data a run still needs."""

from __future__ import annotations

import argparse
import functools
import math
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _paper import Run
from omegaconf import OmegaConf

import dens.train  # noqa: F401  (registers the demo_path resolver of the configs)


# ==================================================================================================
# Commands: local launches and SLURM scripts
# ==================================================================================================
@dataclass
class Plan:
    """One run as this invocation would launch it."""

    run: Run
    run_dir: Path
    overrides: list[str]
    nproc: int  # local processes (one per GPU)

    def command(self, python: str = "python") -> list[str]:
        """The training command (``torch.distributed.run`` is ``torchrun``)."""
        entry = ["-m", "dens.train", f"+experiment={self.run.experiment}", f"trainer.run_dir={self.run_dir}"]
        entry += self.overrides
        if self.nproc > 1:
            return [
                python,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={self.nproc}",
                *entry,
            ]
        return [python, *entry]


def run_status(run_dir: Path) -> str:
    """``finished`` (``FINISHED`` written), ``partial`` (a ``last.pt`` to resume from) or ``missing``."""
    if (run_dir / "FINISHED").is_file():
        return "finished"
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return "partial"
    return "missing"


def _layout(gpus: int, gpus_per_node: int) -> tuple[int, int]:
    """SLURM nodes and GPUs per node for ``gpus`` GPUs."""
    per_node = min(gpus, gpus_per_node)
    return math.ceil(gpus / per_node), per_node


def slurm_script(plan: Plan, gpus_per_node: int, time_limit: str, extra: Sequence[str]) -> str:
    """An sbatch script for the paper's number of GPUs (as ``experiments/slurm_example.sh``)."""
    gpus = plan.run.gpus
    nodes, per_node = _layout(gpus, gpus_per_node)
    args = " ".join(shlex.quote(a) for a in plan.command()[3:])  # after "python -m dens.train"
    if gpus > 1:
        launch = (
            f'srun python -m torch.distributed.run --nnodes "$SLURM_NNODES" --nproc_per_node {per_node} \\\n'
            '    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER:29500" \\\n'
            f"    -m dens.train {args}"
        )
    else:
        launch = f"srun python -m dens.train {args}"
    lines = [
        "#!/bin/bash",
        f"# {plan.run.experiment}: {gpus} x {plan.run.gpu_type} in the paper; global batch = the config's",
        f"#SBATCH --job-name=dens-{plan.run.experiment}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={per_node}",
        f"#SBATCH --cpus-per-task={8 * per_node}",
        f"#SBATCH --time={time_limit}",
        "#SBATCH --output=logs/%x-%j.out",
        "#SBATCH --requeue",
        *(f"#SBATCH {e}" for e in extra),
        "set -euo pipefail",
        "mkdir -p logs",
        'MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export OMP_NUM_THREADS=8 NCCL_ASYNC_ERROR_HANDLING=1",
        launch,
        f"touch {shlex.quote(str(plan.run_dir / 'FINISHED'))}",
        "",
    ]
    return "\n".join(lines)


@functools.cache
def experiment_config(experiment: str) -> Any:
    """The composed Hydra configuration of an experiment, without overrides (nothing instantiated)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("dens.conf", version_base=None):
        return compose("train", overrides=[f"experiment={experiment}"])


def missing_keys(experiment: str, overrides: Sequence[str]) -> list[str]:
    """Mandatory (``???``) config values the overrides leave unset, in override syntax (``data.train.0.path``)."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    keys = (re.sub(r"\[(\d+)\]", r".\1", k) for k in OmegaConf.missing_keys(experiment_config(experiment)))
    return sorted(k for k in keys if k not in given)


def train(plan: Plan, log: Path | None = None) -> bool:
    """Run (or resume) one training; write ``FINISHED`` on success. ``log``: capture the output there."""
    cmd = plan.command(sys.executable)
    print(f"--> {shlex.join(plan.command())}", flush=True)
    t0 = time.perf_counter()
    if log is None:
        rc = subprocess.run(cmd, check=False).returncode
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        tail = "" if log is None else "\n" + "\n".join(log.read_text().splitlines()[-20:])
        print(f"!!! {plan.run.experiment}: training failed (exit code {rc}){tail}", file=sys.stderr)
        return False
    (plan.run_dir / "FINISHED").write_text(shlex.join(plan.command()) + "\n")
    print(f"    {plan.run.experiment}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return True


def check_data(plans: Sequence[Plan]) -> None:
    """Stop when an unfinished run still has a ``???`` value (a data path) the overrides leave unset."""
    for plan in plans:
        needs = missing_keys(plan.run.experiment, plan.overrides)
        if needs and run_status(plan.run_dir) != "finished":
            raise SystemExit(
                f"{plan.run.experiment} needs {', '.join(needs)}: give them as KEY=VALUE overrides"
            )


def write_slurm(plans: Sequence[Plan], args: argparse.Namespace, folder: Path) -> None:
    """Write (and print, and with ``--submit`` submit) an sbatch script per unfinished run."""
    check_data(plans)
    folder.mkdir(parents=True, exist_ok=True)
    if args.submit:
        Path("logs").mkdir(exist_ok=True)  # the scripts' --output folder, opened before they start
    for plan in plans:
        if run_status(plan.run_dir) == "finished":
            continue
        path = folder / f"{plan.run.experiment}.sbatch"
        path.write_text(slurm_script(plan, args.gpus_per_node, args.time, args.sbatch))
        print(f"# ---- {path}\n{path.read_text()}")
        if args.submit:
            subprocess.run(["sbatch", str(path)], check=True)
    print(f"when the jobs have finished: python {sys.argv[0]} --collect-only ... (the same arguments)")


def train_all(plans: Sequence[Plan], smoke: bool) -> list[str]:
    """Train or resume every unfinished run; the experiments that failed."""
    if not smoke:
        check_data(plans)
    failed = []
    for plan in plans:
        if run_status(plan.run_dir) != "finished":
            if not train(plan, plan.run_dir / "train_output.log" if smoke else None):
                failed.append(plan.run.experiment)
    return failed
