"""SO(2) convolution in edge frames: equivariance, roll invariance, official weight layout."""

import math

import pytest
import torch

from dens.models import CoefficientLayout, EdgeRotation, SO2Convolution, degree_rescale, edge_frames, wigner_D
from dens.testing import assert_equivariant, random_rotation

pytestmark = pytest.mark.usefixtures("float64_default")


def roll_about_y(angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    zero, one = torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack(
        [torch.stack([c, zero, s], -1), torch.stack([zero, one, zero], -1), torch.stack([-s, zero, c], -1)],
        -2,
    )


def make_conv(lmax=4, mmax=2, c_in=6, c_out=5, extra=3):
    torch.manual_seed(0)
    conv = SO2Convolution(
        c_in, c_out, lmax, mmax, edge_channels_list=[7, 8, 8], extra_m0_output_channels=extra
    )
    for p in conv.parameters():  # break the zero / unit initialisations
        p.data.normal_(0, 0.3)
    return conv.double()


def edge_op(conv, frames, x, x_edge, lmax, mmax):
    layout = CoefficientLayout(lmax, mmax)
    rot = EdgeRotation(frames, layout, degree_rescale(layout))
    out, extra = conv(rot.rotate(x), x_edge)
    return rot.rotate_back(out), extra


@pytest.mark.parametrize(("lmax", "mmax"), [(4, 2), (3, 3), (6, 1), (2, 0)])
def test_so2_convolution_is_so3_equivariant(lmax, mmax):
    conv = make_conv(lmax, mmax)
    n_edges = 40
    x = torch.randn(n_edges, (lmax + 1) ** 2, 6)
    x_edge = torch.randn(n_edges, 7)
    vec = torch.randn(n_edges, 3)
    fn = lambda x, vec, x_edge: edge_op(conv, edge_frames(vec), x, x_edge, lmax, mmax)  # noqa: E731
    err = assert_equivariant(fn, [x, vec, x_edge], [lmax, "cartesian", None], [lmax, None], atol=1e-10)
    assert err < 1e-12


def test_so2_convolution_invariant_to_roll():
    lmax, mmax = 4, 2
    conv = make_conv(lmax, mmax)
    x = torch.randn(30, 25, 6)
    x_edge = torch.randn(30, 7)
    frames = edge_frames(torch.randn(30, 3))
    rolled = roll_about_y(torch.rand(30) * 2 * math.pi) @ frames
    a, ea = edge_op(conv, frames, x, x_edge, lmax, mmax)
    b, eb = edge_op(conv, rolled, x, x_edge, lmax, mmax)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    torch.testing.assert_close(ea, eb, atol=1e-12, rtol=0)


def test_edge_rotation_round_trip_and_layout():
    lay = CoefficientLayout(5, 5)
    frames = edge_frames(torch.randn(10, 3))
    rot = EdgeRotation(frames, lay)
    x = torch.randn(10, 36, 4)
    torch.testing.assert_close(rot.rotate_back(rot.rotate(x)), x)
    # the rotated spherical harmonics of the edge itself are non-zero at m = 0 only
    from dens.models import spherical_harmonics

    vec = torch.randn(10, 3)
    rot = EdgeRotation(edge_frames(vec), lay)
    y = rot.rotate(spherical_harmonics(5, vec)[..., None])[..., 0]
    assert y[:, lay.m_size[0] :].abs().max() < 1e-12
    torch.testing.assert_close(y[:, :6], torch.sqrt(2 * torch.arange(6.0) + 1).expand(10, 6))


def test_parameter_shapes_match_official_layout():
    # EquiformerV2 small config: C=32, L=4, M=2, hidden 16, heads 4 x alpha 16, gates 16
    conv = SO2Convolution(
        64, 16, 4, 2, edge_channels_list=[664, 32, 32], extra_m0_output_channels=4 * 16 + 16
    )
    shapes = {k: tuple(v.shape) for k, v in conv.state_dict().items()}
    assert shapes["fc_m0.weight"] == (160, 320)
    assert shapes["so2_m_conv.0.fc.weight"] == (128, 256)
    assert shapes["so2_m_conv.1.fc.weight"] == (96, 192)
    assert shapes["rad_func.net.6.weight"] == (768, 32)
    assert "rad_func.net.1.weight" in shapes and "rad_func.net.4.weight" in shapes


def test_complex_structure_of_order_maps():
    # out_{+m} + i out_{-m} = (W_r + i W_i)(x_{+m} + i x_{-m}) for m > 0
    conv = make_conv(2, 1, c_in=1, c_out=1, extra=0)
    conv.rad_func = None
    lay = CoefficientLayout(2, 1)
    x = torch.zeros(1, lay.num_reduced, 1)
    x[0, 3, 0] = 1.0  # (l=1, m=+1)
    out, _ = conv(x)
    w = conv.so2_m_conv[0].fc.weight  # [2*2, 2]: rows W_r (l=1,2), W_i (l=1,2)
    torch.testing.assert_close(out[0, 3:5, 0], w[:2, 0])  # +m rows get W_r x_+
    torch.testing.assert_close(out[0, 5:7, 0], w[2:, 0])  # -m rows get W_i x_+


def test_wigner_rows_are_rotation_rows():
    frames = random_rotation(4)
    lay = CoefficientLayout(3, 1)
    rot = EdgeRotation(frames, lay)
    torch.testing.assert_close(rot.wigner, wigner_D(frames, 3)[:, lay.m_major])


def test_order_map_three_products_equal_the_official_four():
    # Gauss's three products give the official one-product map (fc over both rows, split into r/i parts)
    torch.manual_seed(0)
    conv = make_conv(4, 3, c_in=6, c_out=5, extra=0).double()
    for order in conv.so2_m_conv:
        x = torch.randn(7, 2, order.fc.in_features, dtype=torch.float64, requires_grad=True)
        r_plus, i_plus, r_minus, i_minus = order.fc(x).reshape(7, 4, -1).unbind(1)
        official = torch.stack([r_plus - i_minus, r_minus + i_plus], dim=1)
        torch.testing.assert_close(order(x), official, atol=1e-13, rtol=0)
        grads = torch.autograd.grad(order(x).square().sum(), (x, order.fc.weight))
        expected = torch.autograd.grad(official.square().sum(), (x, order.fc.weight))
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_order_map_under_cpu_autocast_is_close_to_the_official_products():
    """On the CPU, bf16 autocast keeps the three products: within bf16's rounding of the official four,
    in bf16, also for no edge (a DeNS head in inference)."""
    torch.manual_seed(0)
    order = make_conv(4, 3, c_in=6, c_out=5, extra=0).so2_m_conv[0].float()
    x = torch.randn(7, 2, order.fc.in_features, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r_plus, i_plus, r_minus, i_minus = order.fc(x).reshape(7, 4, -1).unbind(1)
        official = torch.stack([r_plus - i_minus, r_minus + i_plus], dim=1)
        out = order(x)
        assert order(x[:0]).shape == (0, 2, order.fc.out_features // 2)
    assert out.dtype == torch.bfloat16
    scale = float(official.abs().max())
    torch.testing.assert_close(out.float(), official.float(), rtol=0, atol=0.03 * scale)


def test_half_precision_orders_are_matrix_products_when_traced():
    """Under CPU autocast the order maps are matrix products. A linear of the 3-d ``[E, 2, F]`` block (a
    strided view of the input) was traced as a ``bmm`` with the weight expanded and copied for every edge:
    compiled bf16 inference of EquiformerV2 OC20-2M was 10x slower than eager (the official form, which
    accelerators keep in half precision, now also passes one ``[2E, F]`` matrix)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    targets = set()

    class Record(CustomGraphPass):  # sees the graph inductor generates code for
        def __call__(self, graph: torch.fx.Graph) -> None:
            targets.update(str(node.target) for node in graph.nodes)

        def uuid(self) -> None:  # no cache entry: the pass must run
            return None

    torch._dynamo.reset()
    conv = SO2Convolution(6, 5, lmax=4, mmax=2).float()
    # bf16 already, as the output of an earlier product under autocast: the order blocks are then strided
    # views of it (autocast's cast of a float32 input would copy them)
    x = torch.randn(9, CoefficientLayout(4, 2).num_reduced, 6, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        options = {"post_grad_custom_post_pass": Record(), "fx_graph_cache": False}
        out, _ = torch.compile(conv, fullgraph=True, dynamic=True, options=options)(x)
        eager, _ = conv(x)
    # inductor rounds the three products' sums in its own order: bf16 rounding apart
    torch.testing.assert_close(out.float(), eager.float(), rtol=0, atol=0.02 * float(eager.abs().max()))
    assert "aten.mm.default" in targets and "aten.bmm.default" not in targets, sorted(targets)
