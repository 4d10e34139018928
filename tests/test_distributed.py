"""dens.distributed: collectives whose tensors no gloo worker thread frees at interpreter exit."""

import socket
import threading
import time

import pytest
import torch
import torch.distributed as dist

from dens import distributed


@pytest.fixture
def one_rank_group(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "1",
    }.items():
        monkeypatch.setenv(key, value)
    distributed.init_process_group("gloo")
    yield
    distributed.shutdown()


def test_all_reduce_reduces_in_place_through_a_copy_python_keeps(one_rank_group, monkeypatch):
    handed = []
    real = dist.all_reduce

    def recording(tensor, op=dist.ReduceOp.SUM):
        handed.append(tensor)
        return real(tensor, op=op)

    monkeypatch.setattr(dist, "all_reduce", recording)
    flag = torch.tensor([3.0, -1.0], requires_grad=False)
    assert distributed.all_reduce(flag, op=dist.ReduceOp.MIN) is flag
    torch.testing.assert_close(flag, torch.tensor([3.0, -1.0]))
    (copy,) = handed
    # the worker thread got a private copy, not the caller's tensor, which the caller may drop at once
    assert copy is not flag
    assert copy.data_ptr() != flag.data_ptr()
    assert any(t is copy for t in distributed._in_flight)
    del handed[:]
    deadline = time.monotonic() + 5
    while copy._use_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    # once the worker has released the copy, the next collective lets go of it
    distributed.all_reduce(torch.zeros(1))
    assert not any(t is copy for t in distributed._in_flight)


def test_shutdown_waits_for_a_worker_to_release_its_tensor(one_rank_group):
    # a copy a "worker" still holds: a view keeps a C++ reference to its base, as gloo's work does
    copy = torch.zeros(4)
    worker_reference = copy[1:]
    distributed._in_flight.append(copy)
    del copy
    assert distributed.in_flight() == 1

    def release():
        time.sleep(0.2)
        nonlocal worker_reference
        worker_reference = None

    thread = threading.Thread(target=release)
    start = time.monotonic()
    thread.start()
    distributed.shutdown()
    waited = time.monotonic() - start
    thread.join()
    assert waited >= 0.2
    assert distributed.in_flight() == 0
    assert not dist.is_initialized()


def test_shutdown_gives_up_after_its_timeout_and_still_closes_the_group(one_rank_group):
    copy = torch.zeros(2)
    stuck = copy[:1]  # never released
    distributed._in_flight.append(copy)
    start = time.monotonic()
    distributed.shutdown(timeout=0.1)
    assert 0.1 <= time.monotonic() - start < 5
    assert not dist.is_initialized()
    assert distributed.in_flight() == 0
    del stuck


def test_shutdown_without_a_group_is_a_no_op():
    assert not dist.is_initialized()
    distributed.shutdown()
    distributed.shutdown()
