"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` next to the repository root (real data samples and official fixtures).

    Tests that need it are skipped, with the reason, in a checkout that has no ``../shared``.
    """
    if not SHARED_DIR.is_dir():
        pytest.skip(f"{SHARED_DIR} is absent: the real-data samples and fixtures live there")
    return SHARED_DIR


@pytest.fixture
def float64_default():
    """Build float64 tensors by default within a test, then restore the previous default dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one thread: tiny models are fastest so, and busy machines are not oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
