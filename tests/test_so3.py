"""Spherical harmonics, Wigner-D matrices, edge frames, coefficient layout and SO(3) linear."""

import math

import e3nn.o3 as o3
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dens.models import (
    CoefficientLayout,
    SO3Linear,
    edge_frames,
    edge_frames_official,
    spherical_harmonics,
    wigner_D,
)
from dens.testing import assert_equivariant, random_rotation

pytestmark = pytest.mark.usefixtures("float64_default")


AXES = torch.tensor(
    [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1], [1, 1, 0], [0, 1e-9, 1]],
    dtype=torch.float64,
)

quaternions = st.lists(st.floats(-1, 1, allow_nan=False), min_size=4, max_size=4).filter(
    lambda q: sum(v * v for v in q) > 1e-2
)


def quat_to_matrix(q):
    q = torch.tensor(q, dtype=torch.float64)
    return o3.quaternion_to_matrix(q / q.norm())


@pytest.mark.parametrize("normalization", ["component", "norm", "integral"])
@pytest.mark.parametrize("normalize", [True, False])
def test_spherical_harmonics_match_e3nn(normalization, normalize):
    v = torch.randn(500, 3) * 3
    ours = spherical_harmonics(10, v, normalize=normalize, normalization=normalization)
    ref = o3.spherical_harmonics(list(range(11)), v, normalize=normalize, normalization=normalization)
    assert (ours - ref).abs().max() <= 1e-12 * ref.abs().max()


def test_spherical_harmonics_normalisation_and_l1():
    v = torch.nn.functional.normalize(torch.randn(100, 3), dim=-1)
    sh = spherical_harmonics(6, v)
    for l in range(7):
        block = sh[:, l * l : (l + 1) ** 2]
        torch.testing.assert_close(block.pow(2).sum(-1), torch.full((100,), 2.0 * l + 1))
    torch.testing.assert_close(sh[:, 1:4], math.sqrt(3) * v)  # (x, y, z) with y the polar axis


def test_spherical_harmonics_rejects_bad_shape():
    with pytest.raises(ValueError, match="last dimension of 3"):
        spherical_harmonics(2, torch.randn(4, 2))


def test_wigner_matches_e3nn_angles():
    R = random_rotation(20)
    D = wigner_D(R, 10)
    for l in range(11):
        ref = o3.wigner_D(l, *o3.matrix_to_angles(R))
        block = D[:, l * l : (l + 1) ** 2, l * l : (l + 1) ** 2]
        assert (block - ref).abs().max() < 1e-9  # same basis: the change of basis is the identity
    off_block = D.clone()
    for l in range(11):
        off_block[:, l * l : (l + 1) ** 2, l * l : (l + 1) ** 2] = 0
    assert off_block.abs().max() == 0


@settings(max_examples=25, deadline=None)
@given(q1=quaternions, q2=quaternions, lmax=st.integers(0, 8))
def test_wigner_is_orthogonal_representation(q1, q2, lmax):
    r1, r2 = quat_to_matrix(q1), quat_to_matrix(q2)
    d1, d2, d12 = wigner_D(r1, lmax), wigner_D(r2, lmax), wigner_D(r1 @ r2, lmax)
    eye = torch.eye((lmax + 1) ** 2)
    torch.testing.assert_close(d12, d1 @ d2, atol=1e-10, rtol=0)
    torch.testing.assert_close(d1 @ d1.T, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(d1[1:4, 1:4] if lmax > 0 else d1, r1 if lmax > 0 else eye, atol=1e-12, rtol=0)


@settings(max_examples=25, deadline=None)
@given(q=quaternions, lmax=st.integers(0, 10))
def test_spherical_harmonics_rotate_with_wigner(q, lmax):
    R = quat_to_matrix(q)
    v = torch.randn(16, 3)
    lhs = spherical_harmonics(lmax, v @ R.T)
    rhs = spherical_harmonics(lmax, v) @ wigner_D(R, lmax).T
    torch.testing.assert_close(lhs, rhs, atol=1e-9, rtol=0)


def test_wigner_float32_accuracy_near_axes():
    # edges almost parallel to every axis: the case where Euler angles lose accuracy in float32
    eps = torch.tensor([0.0, 1e-7, 1e-4])
    vecs = torch.stack([a + e * torch.randn(3) for a in AXES for e in eps])
    frames = edge_frames(vecs)
    d64 = wigner_D(frames, 6)
    d32 = wigner_D(frames.float(), 6).double()
    assert (d32 - d64).abs().max() < 1e-5


def test_wigner_rows_subset():
    R = random_rotation(5)
    lay = CoefficientLayout(6, 2)
    torch.testing.assert_close(wigner_D(R, 6, rows=lay.m_major), wigner_D(R, 6)[:, lay.m_major])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edge_frames_map_edges_to_y(dtype):
    vec = torch.cat([AXES, torch.randn(200, 3) * 4]).to(dtype)
    R = edge_frames(vec)
    x_hat = torch.nn.functional.normalize(vec, dim=-1)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(
        torch.einsum("eij,ej->ei", R, x_hat),
        torch.tensor([0.0, 1.0, 0.0], dtype=dtype).expand_as(vec),
        atol=tol,
        rtol=0,
    )
    torch.testing.assert_close(
        R @ R.transpose(1, 2), torch.eye(3, dtype=dtype).expand_as(R), atol=tol, rtol=0
    )
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(len(vec), dtype=dtype), atol=tol, rtol=0)
    torch.testing.assert_close(edge_frames(vec), R, atol=0, rtol=0)  # deterministic


def test_official_frame_construction():
    # the official recipe (fixture README): rows (z', x_hat, -y') with the helper swapped when it is
    # closer to the edge than its 90-degree copies
    vec = torch.randn(50, 3)
    rand = torch.rand(50, 3)
    R = edge_frames_official(vec, rand - 0.5)
    x_hat = torch.nn.functional.normalize(vec, dim=-1)
    torch.testing.assert_close(R[:, 1], x_hat)
    torch.testing.assert_close(torch.einsum("eij,ej->ei", R, x_hat)[:, 1], torch.ones(50))


def test_gradients_finite_for_axis_aligned_edges():
    vec = torch.cat([AXES, -AXES, 1e-3 * AXES]).clone().requires_grad_(True)
    lay = CoefficientLayout(6, 2)
    D = wigner_D(edge_frames(vec), 6, rows=lay.m_major)
    x = torch.randn(D.shape[-1], 3)
    out = (D @ x).pow(2).sum() + spherical_harmonics(6, vec).sum()
    (grad,) = torch.autograd.grad(out, vec)
    assert torch.isfinite(grad).all()


def test_layout_orders():
    lay = CoefficientLayout(4, 2)
    assert lay.num_reduced == 19 and lay.m_size == [5, 4, 3]
    lm = [(int(lay.l[i]), int(lay.m[i])) for i in lay.m_major]
    expected = [(l, 0) for l in range(5)] + [(l, 1) for l in range(1, 5)] + [(l, -1) for l in range(1, 5)]
    expected += [(l, 2) for l in range(2, 5)] + [(l, -2) for l in range(2, 5)]
    assert lm == expected
    assert sorted(lay.m_major.tolist()) == lay.reduced.tolist()
    with pytest.raises(ValueError):
        CoefficientLayout(2, 3)


def test_so3_linear_equivariant_and_bias_on_l0_only():
    lin = SO3Linear(6, 5, lmax=4)
    with torch.no_grad():
        lin.bias.normal_()
    lin = lin.double()
    x = torch.randn(7, 25, 6)
    assert_equivariant(lin, [x], [4], [4], atol=1e-10)
    out0 = lin(torch.zeros(1, 25, 6))
    assert out0[0, 1:].abs().max() == 0 and torch.allclose(out0[0, 0], lin.bias)
