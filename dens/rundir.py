"""A run directory's guards: one run at a time, resume only under the same configuration, honest records.

* :class:`RunDirLock`: an exclusive ``fcntl.flock`` on ``<run_dir>/.lock``, which names the holder (pid,
  host, start time). The kernel releases it when the process dies, so a killed run leaves no stale lock.
* :func:`config_differences`: the keys whose values differ between the configuration a checkpoint was
  trained with and the one given now (settings that only steer the run, such as ``trainer.max_steps``
  or ``trainer.log_every``, may change on resume: :data:`RUN_CONTROL_KEYS`).
* :func:`truncate_metrics`: on resume, ``metrics.jsonl`` keeps only the records up to the resumed step
  (a killed run wrote records after its last checkpoint, which the resumed run writes again).
* :func:`archive_run`: ``trainer.fresh=true`` moves the previous run's files to ``<run_dir>/previous/<time>``.

Examples
--------
>>> config_differences({"optim": {"lr": 5e-4}, "trainer": {"max_steps": 10}},
...                    {"optim": {"lr": 1e-2}, "trainer": {"max_steps": 20}})
{'optim.lr': (0.0005, 0.01)}
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "RUN_CONTROL_KEYS",
    "RunDirInUseError",
    "RunDirLock",
    "archive_run",
    "config_differences",
    "format_differences",
    "truncate_metrics",
]

logger = logging.getLogger(__name__)

#: Settings that steer a run without changing what it computes: they may differ on resume.
RUN_CONTROL_KEYS = frozenset(
    f"trainer.{k}"
    for k in (
        "run_dir", "device", "max_steps", "eval_every", "checkpoint_every", "log_every", "resume", "fresh",
        "num_workers", "progress_bar", "tensorboard", "wandb", "wandb_project", "val_max_batches",
        "compile", "compile_backend", "compile_options", "retain_freed_memory", "threads", "tune_threads",
    )
)  # fmt: skip


class RunDirInUseError(RuntimeError):
    """Another live process holds the run directory."""


class RunDirLock:
    """Exclusive lock of a run directory (``<run_dir>/.lock``), held until :meth:`release` or process exit.

    Parameters
    ----------
    run_dir : str or Path
        The folder (created).

    Raises
    ------
    RunDirInUseError
        From :meth:`acquire`, when another process holds it; the message names that process.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fh: Any = None

    def acquire(self) -> RunDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "an unknown process"
            fh.close()
            raise RunDirInUseError(
                f"run directory {self.path.parent} is in use by another run ({holder}); wait for it to finish, "
                f"stop it, or choose another trainer.run_dir"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(tree, tuple):
        tree = list(tree)
    return {prefix: tree}


def config_differences(
    old: Mapping[str, Any], new: Mapping[str, Any], ignore: frozenset[str] = RUN_CONTROL_KEYS
) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` of the values that differ; keys present on one side only are ignored
    (settings added to dens after the checkpoint was written), as are the ``ignore`` keys."""
    a, b = _flatten(old), _flatten(new)
    return {k: (a[k], b[k]) for k in sorted(a.keys() & b.keys()) if k not in ignore and a[k] != b[k]}


def format_differences(diff: Mapping[str, tuple[Any, Any]], limit: int = 12) -> str:
    """``"optim.lr: 0.0005 (checkpoint) -> 0.01 (now); ..."``."""
    items = [f"{k}: {old!r} (checkpoint) -> {new!r} (now)" for k, (old, new) in list(diff.items())[:limit]]
    if len(diff) > limit:
        items.append(f"... and {len(diff) - limit} more")
    return "; ".join(items)


def truncate_metrics(path: str | Path, step: int) -> int:
    """Keep the records of ``metrics.jsonl`` with ``step <= step`` (and drop a torn last line).

    Returns
    -------
    int
        The number of records removed.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    keep, removed = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill
            removed += 1
            continue
        if isinstance(record, dict) and int(record.get("step", 0)) > step:
            removed += 1
            continue
        keep.append(line)
    if removed:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
        logger.info("%s: removed %d record(s) written after the checkpoint of step %d", path, removed, step)
    return removed


def archive_run(run_dir: str | Path) -> Path | None:
    """Move a previous run's files (checkpoints, metrics, config, tensorboard) to ``previous/<time>``.

    Returns
    -------
    Path or None
        The archive folder, or None when there was nothing to move.
    """
    run_dir = Path(run_dir)
    names = ("checkpoints", "metrics.jsonl", "config.json", "tensorboard")
    present = [run_dir / n for n in names if (run_dir / n).exists()]
    if not present:
        return None
    target = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    suffix = 0
    while target.exists():
        suffix += 1
        target = target.with_name(f"{target.name.split('.')[0]}.{suffix}")
    target.mkdir(parents=True)
    for p in present:
        os.replace(p, target / p.name)
    logger.warning("trainer.fresh=true: the previous run in %s was moved to %s", run_dir, target)
    return target
