"""Checkpoint files: atomic writes, a checksum of their tensors, verified loads, and the training elements.

Every checkpoint dens writes (``last.pt``, ``best.pt``) goes through :func:`save_checkpoint`: the file is
written to a temporary file in the same folder, flushed to disk and renamed, so a killed write leaves the
previous file; it carries a SHA-256 of every tensor and array it holds (``"checksum"``).
:func:`load_checkpoint` is the one reader (trainer, :meth:`dens.models.ForceField.from_checkpoint`,
:func:`dens.evaluate.load_model`, the calculator): every error names the file, and a checksum that does
not match (flipped bits inside tensor data, which unpickle without complaint) is refused. Checkpoints
written before checksums existed load with a note in the log.

Examples
--------
>>> import tempfile, torch
>>> path = Path(tempfile.mkdtemp()) / "w.pt"
>>> save_checkpoint({"model": {"w": torch.ones(2)}}, path)
>>> load_checkpoint(path)["model"]["w"].tolist()
[1.0, 1.0]
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase.data import chemical_symbols

__all__ = [
    "CHECKSUM_KEY",
    "CheckpointError",
    "atomic_save",
    "checksum",
    "element_names",
    "load_checkpoint",
    "remove_stale_temporaries",
    "save_checkpoint",
    "unseen_elements",
]

logger = logging.getLogger(__name__)

CHECKSUM_KEY = "checksum"
_TMP = re.compile(r"^\..+\.tmp(\d+)$")  # the temporary files of atomic_save: .<name>.tmp<pid>


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (names the file and the reason)."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A write killed at any point leaves the previous ``path`` intact (and at worst a ``.<name>.tmp<pid>``
    file, which :func:`remove_stale_temporaries` deletes on the next start).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the rename
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or an exception: no half-written file stays behind
        raise


def _walk(obj: Any, prefix: str) -> Iterable[tuple[str, Any]]:
    """(path, tensor or array) of every tensor and array in nested dicts, lists and tuples, in a fixed order."""
    if isinstance(obj, torch.Tensor | np.ndarray):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key in sorted(obj, key=str):
            if not (prefix == "" and key == CHECKSUM_KEY):
                yield from _walk(obj[key], f"{prefix}/{key}")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from _walk(value, f"{prefix}/{i}")


def checksum(state: Mapping[str, Any]) -> str:
    """SHA-256 of every tensor and array in ``state`` (names, dtypes, shapes and bytes), as hex."""
    digest = hashlib.sha256()
    for name, value in _walk(state, ""):
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
            kind = str(t.dtype)
        else:
            raw = np.ascontiguousarray(value).view(np.uint8) if value.size else b""
            kind = str(value.dtype)
        digest.update(f"{name}|{kind}|{tuple(value.shape)}|".encode())
        digest.update(memoryview(raw) if len(raw) else b"")
    return digest.hexdigest()


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> None:
    """Write ``state`` (a dict) atomically to ``path`` with its :func:`checksum` under ``"checksum"``."""
    atomic_save({**state, CHECKSUM_KEY: checksum(state)}, path)


def load_checkpoint(
    path: str | Path, verify: bool = True, what: str = "checkpoint", mmap: bool = False
) -> dict[str, Any]:
    """Read a checkpoint on the CPU and verify its checksum; every error names the file.

    Parameters
    ----------
    path : str or Path
        The file.
    verify : bool
        Check the stored checksum (files without one load, with a note in the log).
    what : str
        What the file is, for messages.
    mmap : bool
        Map the tensors instead of reading them (for metadata such as ``step``; use with ``verify=False``,
        since verifying reads every byte).

    Returns
    -------
    dict
        The stored dict (the checksum entry removed).

    Raises
    ------
    FileNotFoundError
        No such file.
    CheckpointError
        An empty, truncated, unreadable or damaged file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(
            f"{path}: the {what} is empty (0 bytes), e.g. an interrupted copy or a full disk"
        )
    try:
        # RNG states must stay on the CPU
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:
        raise CheckpointError(
            f"{path}: not a readable PyTorch {what} ({size} bytes; {type(err).__name__}: {err}); the file is "
            f"truncated or damaged"
        ) from err
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a {what} dict")
    state = dict(state)
    stored = state.pop(CHECKSUM_KEY, None)
    if verify:
        if stored is None:
            logger.info("%s has no checksum (written before dens stored them): loaded unverified", path)
        else:
            actual = checksum(state)
            if actual != stored:
                raise CheckpointError(
                    f"{path}: checksum mismatch (stored {str(stored)[:16]}..., computed {actual[:16]}...): the "
                    f"{what}'s tensor data are damaged; use another copy (e.g. last.pt instead of best.pt)"
                )
    return state


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the ``.<name>.tmp<pid>`` files of killed writes in ``folder`` (those of live processes stay).

    Returns
    -------
    list of Path
        The files deleted.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for f in folder.iterdir():
        m = _TMP.match(f.name)
        if m is None or not f.is_file() or _alive(int(m.group(1))):
            continue
        f.unlink(missing_ok=True)
        removed.append(f)
    if removed:
        logger.info("removed %d file(s) of interrupted checkpoint writes in %s", len(removed), folder)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def element_names(numbers: Iterable[int]) -> str:
    """``"Ac (Z=89), N (Z=7)"`` for messages."""
    return ", ".join(
        f"{chemical_symbols[z] if 0 < z < len(chemical_symbols) else '?'} (Z={z})" for z in numbers
    )


def unseen_elements(model: Any, numbers: Iterable[int]) -> list[int]:
    """Atomic numbers of ``numbers`` the model never saw in training (``model.training_elements``).

    Models without that record (official checkpoints, runs written before it) give an empty list.
    """
    seen = getattr(model, "training_elements", None)
    if not seen:
        return []
    known = set(seen)
    return sorted({int(z) for z in numbers} - known)
