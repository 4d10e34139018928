"""Equivariant norms, radial basis and MLP, dropout and drop path."""

import pytest
import torch

from dens.models import (
    EquivariantDropout,
    EquivariantLayerNorm,
    GaussianSmearing,
    GraphDropPath,
    LayerNormSH,
    RadialMLP,
    RMSNormSH,
    get_normalization,
)
from dens.testing import assert_equivariant, random_rotation

pytestmark = pytest.mark.usefixtures("float64_default")


def randomise(module):
    for p in module.parameters():
        p.data.normal_(1.0, 0.3)
    return module.double()


@pytest.mark.parametrize("norm_type", ["layer_norm", "layer_norm_sh", "rms_norm_sh"])
def test_norms_are_equivariant(norm_type):
    lmax = 4
    norm = randomise(get_normalization(norm_type, lmax, 8))
    x = torch.randn(10, 25, 8) * 3
    assert assert_equivariant(norm, [x], [lmax], [lmax], atol=1e-11) < 1e-11
    # also under an improper rotation (the norms are O(3) equivariant)
    reflection = -random_rotation()
    assert assert_equivariant(norm, [x], [lmax], [lmax], rotation=reflection, atol=1e-11) < 1e-11


def test_layer_norm_sh_formula():
    lmax, c = 3, 4
    norm = randomise(LayerNormSH(lmax, c))
    x = torch.randn(5, 16, c)
    out = norm(x)
    torch.testing.assert_close(out[:, 0], norm.norm_l0(x[:, 0]))
    w = torch.tensor([1 / ((2 * l + 1) * lmax) for l in range(1, lmax + 1) for _ in range(2 * l + 1)])
    s = (x[:, 1:].pow(2) * w[None, :, None]).sum(1).mean(-1)  # [N]
    expected = x[:, 1:] / torch.sqrt(s + 1e-5)[:, None, None]
    expected = (
        expected * norm.affine_weight[torch.tensor([l - 1 for l in range(1, 4) for _ in range(2 * l + 1)])]
    )
    torch.testing.assert_close(out[:, 1:], expected)
    assert set(norm.state_dict()) == {"norm_l0.weight", "norm_l0.bias", "affine_weight"}


def test_rms_norm_and_layer_norm_scale_invariance():
    x = torch.randn(6, 9, 5)
    for norm in (RMSNormSH(2, 5), EquivariantLayerNorm(2, 5)):
        # up to eps = 1e-5 in the RMS, which is negligible for large inputs
        torch.testing.assert_close(norm(10.0 * x), norm(70.0 * x), atol=1e-6, rtol=1e-6)


def test_gaussian_smearing_matches_official_formula():
    g = GaussianSmearing(0.0, 12.0, 600, 2.0)
    d = torch.tensor([0.0, 1.234, 11.9])
    offset = torch.linspace(0, 12, 600)
    spacing = 12 / 599
    expected = torch.exp(-0.5 * ((d[:, None] - offset) / (2 * spacing)) ** 2)
    torch.testing.assert_close(g(d), expected)
    assert list(g.state_dict()) == ["offset"]


def test_radial_mlp_layout():
    mlp = RadialMLP([664, 32, 32, 160])
    assert [k for k in mlp.state_dict() if k.endswith("weight")] == [
        "net.0.weight",
        "net.1.weight",
        "net.3.weight",
        "net.4.weight",
        "net.6.weight",
    ]
    assert mlp(torch.randn(3, 664)).shape == (3, 160)


def test_equivariant_dropout_drops_whole_channels():
    drop = EquivariantDropout(0.5).train()
    torch.manual_seed(0)
    x = torch.randn(50, 9, 16)
    out = drop(x)
    ratio = out / x
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio))  # one mask for all orders
    assert set(ratio[:, 0].flatten().round(decimals=6).tolist()) <= {0.0, 2.0}
    torch.manual_seed(1)
    mask_rot = drop(torch.ones_like(x))
    torch.manual_seed(1)
    R = random_rotation()
    # with the same mask the layer commutes with rotations
    assert assert_equivariant(lambda t: t * mask_rot, [x], [2], [2], rotation=R, atol=1e-12) < 1e-12
    assert torch.equal(drop.eval()(x), x)


def test_graph_drop_path_drops_per_structure():
    torch.manual_seed(0)
    dp = GraphDropPath(0.5).train()
    batch = torch.tensor([0] * 5 + [1] * 7 + [2] * 3 + [3] * 4)
    x = torch.ones(19, 9, 4)
    out = dp(x, batch, 4)
    for g in range(4):
        vals = out[batch == g].unique()
        assert len(vals) == 1 and vals.item() in (0.0, 2.0)
    assert torch.equal(dp.eval()(x, batch, 4), x)
