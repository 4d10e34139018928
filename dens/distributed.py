"""Collectives and the process group's lifetime for DDP training, safe at interpreter exit.

A gloo collective runs on one of the process group's worker threads, and that thread drops its reference
to the collective's tensors *after* the caller's ``wait`` has returned. When the caller has already let go
of a tensor created in Python, the worker's reference is the last one, and freeing the tensor then frees
its Python object, which takes the GIL. If the main thread has meanwhile reached interpreter finalization
(the end of a training script), CPython ends any thread that asks for the GIL with ``pthread_exit``; the
forced unwind through the destructor of gloo's ``AsyncWork`` calls ``std::terminate``, and the rank dies
with SIGABRT ("terminate called without an active exception") after a successful run. A core dump of such
a rank shows exactly that stack (``ProcessGroupGloo::runLoop`` -> ``~AsyncAllreduceWork`` ->
``TensorImpl::decref_pyobject`` -> ``take_gil`` -> ``pthread_exit``), with the main thread in
``Py_FinalizeEx``. It happened to 3 of 30 two-rank runs of ``tests/test_trainer.py``'s DDP script, after the
trainer's last all-reduce (the union of the trained elements, whose tensor is dropped on return).
``destroy_process_group`` does not prevent it: it neither waits for nor joins the worker threads.

So every collective here runs on a private copy that this module keeps until the worker threads have
released it (its C++ use count is back to the one reference of its Python object), and :func:`shutdown`,
registered with ``atexit`` by :func:`init_process_group`, waits for that before closing the group, while the
interpreter is still whole. A worker's last reference is then never one to a live Python object.
"""

from __future__ import annotations

import atexit
import time

import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce", "in_flight", "init_process_group", "shutdown"]

# private copies handed to collectives, until the worker threads have dropped them
_in_flight: list[Tensor] = []


def _release_finished() -> None:
    # a copy's only references are its Python object's and, while a worker still holds the work, the work's
    _in_flight[:] = [t for t in _in_flight if t._use_count() > 1]


def init_process_group(backend: str) -> None:
    """Open the default process group (``env://``) and close it safely at exit (:func:`shutdown`)."""
    dist.init_process_group(backend=backend)
    atexit.register(shutdown)


def all_reduce(tensor: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """``dist.all_reduce`` in place, through a copy that outlives the worker thread's reference to it.

    Parameters
    ----------
    tensor
        Reduced in place over all ranks of the default group.
    op
        The reduction.

    Returns
    -------
    Tensor
        ``tensor``, reduced.
    """
    copy = tensor.detach().clone()
    dist.all_reduce(copy, op=op)
    tensor.copy_(copy)
    _release_finished()
    _in_flight.append(copy)
    return tensor


def shutdown(timeout: float = 10.0) -> None:
    """Wait (up to ``timeout`` seconds) until gloo's workers have released every collective's tensor, then
    close the default process group. Safe to call twice and without a group."""
    deadline = time.monotonic() + timeout
    _release_finished()
    while _in_flight and time.monotonic() < deadline:
        time.sleep(0.001)  # releases the GIL, which a worker may be waiting for to free its tensors
        _release_finished()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _in_flight.clear()


def in_flight() -> int:
    """How many collective copies a worker thread may still hold (for tests)."""
    _release_finished()
    return len(_in_flight)
