"""Sphere grids and grid activations."""

import e3nn.o3 as o3
import pytest
import torch
from conftest import shared_path

from dens.models import (
    CoefficientLayout,
    S2Activation,
    SeparableS2Activation,
    SphereGrid,
    wigner_D,
)
from dens.testing import assert_equivariant, random_rotation

pytestmark = pytest.mark.usefixtures("float64_default")


FIXTURES = shared_path("fixtures/official")


def y_rotation(angle: float) -> torch.Tensor:
    a = torch.tensor(angle)
    c, s = torch.cos(a), torch.sin(a)
    return torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


@pytest.mark.parametrize("normalization", ["component", "integral"])
@pytest.mark.parametrize(("lmax", "res"), [(4, (18, 18)), (4, (10, 5)), (6, (14, 15)), (6, (14, 5))])
def test_grid_matrices_match_e3nn(normalization, lmax, res):
    to = o3.ToS2Grid(lmax, res, normalization=normalization)
    fr = o3.FromS2Grid(res, lmax, normalization=normalization)
    ref_to = torch.einsum("mbi,am->bai", to.shb, to.sha).reshape(-1, (lmax + 1) ** 2)
    ref_from = torch.einsum("am,mbi->bai", fr.sha, fr.shb).reshape(-1, (lmax + 1) ** 2)
    ours = SphereGrid(lmax, resolution=res, normalization=normalization)
    assert (ours.to_grid_mat - ref_to).abs().max() < 2e-6
    assert (ours.from_grid_mat.T - ref_from).abs().max() < 2e-6


@pytest.mark.skipif(not (FIXTURES / "eqv2_small.pt").exists(), reason="../shared/fixtures is absent")
def test_grid_matrices_match_official_equiformer_v2_buffers():
    sd = torch.load(FIXTURES / "eqv2_small.pt", weights_only=False)["state_dict"]
    for key, grid in [("4.4", SphereGrid(4, 4, 18)), ("4.2", SphereGrid(4, 2, 18, rescale=True))]:
        to = sd[f"blocks.0.ffn.SO3_grid.{key}.to_grid_mat"].double()
        fr = sd[f"blocks.0.ffn.SO3_grid.{key}.from_grid_mat"].double()
        assert (grid.to_grid_mat.reshape(to.shape) - to).abs().max() < 1e-6
        assert (grid.from_grid_mat.T.reshape(fr.shape) - fr).abs().max() < 1e-6


@pytest.mark.parametrize("m_major", [False, True])
def test_grid_round_trip_is_exact_for_band_limited_functions(m_major):
    lay = CoefficientLayout(4, 2)
    x = torch.randn(3, lay.num_reduced, 5)
    grid = SphereGrid(4, 2, resolution=(18, 18), m_major=m_major).double()
    torch.testing.assert_close(grid.from_grid(grid.to_grid(x)), x, atol=1e-6, rtol=0)
    # EquiformerV2's rescaled grid applies sqrt((2l+1)/(2M+1)) in both directions
    rescaled = SphereGrid(4, 2, resolution=(18, 18), rescale=True, m_major=m_major).double()
    degree = (lay.l[lay.m_major] if m_major else lay.l[lay.reduced]).double()
    factor = torch.where(degree > 2, (2 * degree + 1) / 5, 1.0)
    torch.testing.assert_close(
        rescaled.from_grid(rescaled.to_grid(x)), x * factor[:, None], atol=1e-6, rtol=0
    )


def test_s2_activation_exact_for_grid_symmetries_and_approximate_otherwise():
    lmax = 4
    act = S2Activation(SphereGrid(lmax, resolution=18)).double()
    x = torch.randn(20, 25, 8)
    # a rotation about the polar axis by a multiple of 360/18 degrees maps the grid onto itself
    exact = assert_equivariant(
        act, [x], [lmax], [lmax], rotation=y_rotation(2 * torch.pi / 18 * 3), atol=1e-7
    )
    assert exact < 1e-7
    # a generic rotation: equivariant within the quadrature error of the 18 x 18 grid (measured ~1e-2
    # relative for a random signal; the bound is what a point-wise SiLU on this grid achieves)
    errs = [
        assert_equivariant(act, [x], [lmax], [lmax], rotation=random_rotation(), atol=1.0) for _ in range(5)
    ]
    assert max(errs) < 5e-2


def test_separable_s2_activation_l0_is_exact():
    grid = SphereGrid(4, resolution=18).double()
    act = SeparableS2Activation(grid)
    scalars, tensors = torch.randn(6, 8), torch.randn(6, 25, 8)
    out = act(scalars, tensors)
    torch.testing.assert_close(out[:, 0], torch.nn.functional.silu(scalars))
    R = y_rotation(2 * torch.pi / 18)
    err = assert_equivariant(act, [scalars, tensors], [None, 4], [4], rotation=R, atol=1e-7)
    assert err < 1e-7


def test_m_major_grid_consistent_with_l_major():
    lay = CoefficientLayout(4, 2)
    a = SphereGrid(4, 2, 18, rescale=True)
    b = SphereGrid(4, 2, 18, rescale=True, m_major=True)
    pos = {int(i): k for k, i in enumerate(lay.reduced)}
    perm = torch.tensor([pos[int(i)] for i in lay.m_major])
    torch.testing.assert_close(b.to_grid_mat, a.to_grid_mat[:, perm])
    D = wigner_D(random_rotation(), 4)
    assert D.shape == (25, 25)


class _PlainSiLU(torch.nn.SiLU):
    """A SiLU that S2Activation does not recognise: the unfused reference path."""


@pytest.mark.parametrize(("num", "channels"), [(50, 20), (3, 4), (0, 4)])
def test_fused_grid_silu_equals_plain_path(num, channels):
    """The chunked, recomputing SiLU path gives the plain ``from_grid(silu(to_grid(x)))`` and its gradient
    (50 x 20 rows span three chunks of an 18 x 18 grid); ``first_row`` drops leading rows."""
    grid = SphereGrid(6, 2, resolution=18, rescale=True, m_major=True)
    fused, plain = S2Activation(grid), S2Activation(grid, _PlainSiLU())
    x = torch.randn(num, grid.to_grid_mat.shape[1], channels)
    for first_row in (0, 1):
        xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        yf, yp = fused(xf, first_row=first_row), plain(xp, first_row=first_row)
        assert yf.shape == (num, x.shape[1] - first_row, channels)
        torch.testing.assert_close(yf, yp, rtol=0, atol=1e-12)
        g = torch.randn_like(yp)
        (gf,) = torch.autograd.grad(yf, xf, g)
        (gp,) = torch.autograd.grad(yp, xp, g)
        torch.testing.assert_close(gf, gp, rtol=0, atol=1e-12)


def test_fused_grid_silu_second_derivatives():
    """Gradient-force training differentiates the backward: it must be exact (gradgradcheck)."""
    act = S2Activation(SphereGrid(2, 2, resolution=(6, 5), m_major=True))
    x = torch.randn(2, 9, 3, requires_grad=True)
    assert torch.autograd.gradcheck(act, (x,))
    assert torch.autograd.gradgradcheck(act, (x,))


def test_fused_grid_silu_refuses_trainable_grid():
    grid = SphereGrid(2, resolution=6)
    grid.to_grid_mat.requires_grad_(True)
    with pytest.raises(ValueError, match="grid matrices"):
        S2Activation(grid)(torch.randn(2, 9, 3))


@pytest.mark.parametrize("shape", [(29, 4), (2, 3, 29, 4)])
def test_s2_activation_keeps_leading_dimensions(shape):
    """Inputs other than ``[N, K, C]`` take the plain path, as before the fused one existed."""
    grid = SphereGrid(6, 2, resolution=18, rescale=True, m_major=True)
    x = torch.randn(*shape)
    out = S2Activation(grid)(x, first_row=1)
    torch.testing.assert_close(out, S2Activation(grid, _PlainSiLU())(x, first_row=1))
    assert out.shape == (*shape[:-2], 28, shape[-1])


def test_fused_grid_silu_under_bf16_autocast_matches_the_plain_path():
    """Under autocast the products run in bf16 in both directions, as the plain path's would; the input's
    gradient keeps the input's dtype."""
    grid = SphereGrid(6, 2, resolution=18, rescale=True, m_major=True).float()
    x = torch.randn(20, 29, 8, dtype=torch.float32)
    grads = []
    for act in (S2Activation(grid), S2Activation(grid, _PlainSiLU())):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = act(xi)
        assert y.dtype == torch.bfloat16
        y.float().pow(2).sum().backward()
        grads.append(xi.grad)
    assert grads[0].dtype == torch.float32
    torch.testing.assert_close(grads[0], grads[1], rtol=0.05, atol=0.05 * float(grads[1].abs().max()))


def test_fused_grid_silu_operators_pass_opcheck():
    """``dens::grid_silu`` and its backward, the fused activation as torch.compile sees it: schema, fake
    (shape) functions, autograd and tracing with dynamic shapes (``torch.library.opcheck``)."""
    from dens.models.s2 import _chunk_rows

    grid = SphereGrid(6, 2, resolution=18, rescale=True, m_major=True)
    to_grid, from_grid = grid.to_grid_mat.T, grid.from_grid_mat.T
    several = 3 * _chunk_rows(torch.empty(0), to_grid.shape[1]) + 5
    inputs = [torch.randn(rows, to_grid.shape[0]) for rows in (3, several)]
    inputs.append(
        torch.randn(1, 8, to_grid.shape[0]).transpose(1, 2).reshape(8, -1)
    )  # one node: strided rows
    for x in inputs:
        x.requires_grad_()
        torch.library.opcheck(torch.ops.dens.grid_silu.default, (x, to_grid, from_grid))
        grad = torch.randn(x.shape[0], from_grid.shape[1])
        torch.library.opcheck(
            torch.ops.dens.grid_silu_backward.default, (x.detach(), grad, to_grid, from_grid)
        )


@pytest.mark.parametrize("amp", [False, True])
def test_compiled_grid_silu_stays_fused(amp):
    """Under torch.compile the activation and its backward are the fused operators (not a graph that stores
    the grid), with the eager values and gradients; under bf16 autocast its products run in bf16, as eager."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    seen = {"forward": [], "backward": []}

    def backend(gm, inputs):
        def keep(kind):
            def compiler(graph, _):
                seen[kind].extend(str(node.target) for node in graph.graph.nodes)
                return make_boxed_func(graph.forward)

            return compiler

        return aot_module_simplified(gm, inputs, fw_compiler=keep("forward"), bw_compiler=keep("backward"))

    grid = SphereGrid(6, 2, resolution=18, rescale=True, m_major=True)
    dtype = torch.float32 if amp else torch.float64
    act = S2Activation(grid).to(dtype)
    x = torch.randn(40, 29, 8, dtype=dtype)
    outputs, grads = [], []
    torch._dynamo.reset()
    for run in (act, torch.compile(act, backend=backend, fullgraph=True, dynamic=True)):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = run(xi, first_row=1)
        y.float().pow(2).sum().backward()
        outputs.append(y)
        grads.append(xi.grad)
    assert "dens.grid_silu.default" in seen["forward"], seen["forward"]
    assert "dens.grid_silu_backward.default" in seen["backward"], seen["backward"]
    assert outputs[1].dtype == outputs[0].dtype == (torch.bfloat16 if amp else torch.float64)
    tol = dict(rtol=0.02, atol=0.02 * float(grads[0].abs().max())) if amp else dict(rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[1], grads[0], **tol)
    torch.testing.assert_close(outputs[1].float(), outputs[0].float(), **(tol if amp else {}))


def test_compiled_grid_silu_has_second_derivatives_where_autograd_runs_eagerly():
    """dynamo's eager backend leaves autograd to run eagerly: a double backward through the operator (as
    gradient-force training differentiates) works and is exact."""
    act = S2Activation(SphereGrid(2, 2, resolution=(6, 5), m_major=True))
    x = torch.randn(2, 9, 3, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(act, backend="eager", fullgraph=True)
    assert torch.autograd.gradgradcheck(compiled, (x,))
