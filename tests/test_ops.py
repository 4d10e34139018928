"""Scatter operations: native torch path, and the optional torch-scatter backend gives the same numbers."""

import importlib.util

import pytest
import torch

from dens.ops import get_scatter_backend, scatter_mean, scatter_sum, segment_softmax, set_scatter_backend

HAS_TORCH_SCATTER = importlib.util.find_spec("torch_scatter") is not None


@pytest.fixture
def backend():
    yield
    set_scatter_backend("auto")


def test_segment_softmax_matches_dense_softmax(backend):
    set_scatter_backend("torch")
    logits = torch.randn(12, 3, dtype=torch.float64) * 50  # large logits: max subtraction needed
    index = torch.tensor([0, 0, 0, 2, 2, 3, 3, 3, 3, 5, 5, 5])
    out = segment_softmax(logits, index, 6)
    for seg in index.unique():
        torch.testing.assert_close(out[index == seg], torch.softmax(logits[index == seg], dim=0))
    assert torch.isfinite(out).all()


def test_scatter_sum_and_mean(backend):
    set_scatter_backend("torch")
    src = torch.arange(12.0).reshape(6, 2)
    index = torch.tensor([1, 1, 3, 3, 3, 0])
    assert scatter_sum(src, index, 5).tolist() == [[10, 11], [2, 4], [0, 0], [18, 21], [0, 0]]
    torch.testing.assert_close(scatter_mean(src, index, 5)[3], torch.tensor([6.0, 7.0]))
    assert scatter_mean(src, index, 5)[2].tolist() == [0.0, 0.0]


def test_backend_selection(backend, monkeypatch):
    with pytest.raises(ValueError):
        set_scatter_backend("cuda")
    set_scatter_backend("torch")
    assert get_scatter_backend() == "torch"
    set_scatter_backend("auto")
    monkeypatch.setenv("DENS_SCATTER_BACKEND", "torch")
    assert get_scatter_backend() == "torch"


@pytest.mark.skipif(not HAS_TORCH_SCATTER, reason="torch-scatter (the 'pyg' extra) is not installed")
def test_pyg_backend_gives_same_numbers(backend):
    torch.manual_seed(0)
    src = torch.randn(500, 4, 3, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 40, (500,))
    results = {}
    for name in ("torch", "pyg"):
        set_scatter_backend(name)
        s = scatter_sum(src, index, 45)
        p = segment_softmax(src, index, 45)
        (g,) = torch.autograd.grad((s.sin().sum() + (p * src).sum()), src)
        results[name] = (s, p, g)
    for a, b in zip(results["torch"], results["pyg"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
