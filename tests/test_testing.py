"""dens.testing.BackboneTests on a fourth backbone written here (what a user does for their own model), and
the suite failing on models that break each property (so that none of its tests passes vacuously)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from dens.ops import scatter_sum
from dens.testing import BackboneTests


class NormForceEncoder(nn.Module):
    """DeNS force encoding of a scalar-feature model: ``bias + mask * |F| * weight`` (rotation invariant)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels))
        self.bias = nn.Parameter(torch.randn(channels))

    def forward(self, forces: Tensor, mask: Tensor) -> Tensor:
        return self.bias + mask[:, None].to(forces.dtype) * forces.norm(dim=-1, keepdim=True) * self.weight


class PairLayer(nn.Module):
    """Per-atom energies from smooth pair terms ``w(|r_ij|) . h_i * h_j`` within a 5 Å cutoff."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("centers", torch.linspace(0.0, 5.0, 8), persistent=False)
        self.radial = nn.Linear(8, channels)

    def forward(self, h: Tensor, vec: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        d = vec.norm(dim=-1)
        envelope = torch.cos(0.5 * torch.pi * (d / 5.0).clamp(max=1.0)) ** 2
        w = self.radial(torch.exp(-((d[:, None] - self.centers.to(d.dtype)) ** 2))) * envelope[:, None]
        src, dst = edge_index
        return scatter_sum((w * h[src] * h[dst]).sum(-1), dst, h.shape[0]), w


class PairModel(nn.Module):
    """A gradient-force pair potential with the dens backbone interface and a DeNS noise head."""

    # the backbone contract (dens.models.Backbone)
    cutoff = 5.0
    max_num_elements = 30
    direct_forces = False
    splits_heads = False
    stress_head = None

    @property
    def has_dens_heads(self) -> bool:
        return self.force_encoder is not None

    def compile_regions(self) -> list[nn.Module]:
        return list(self.layers)

    def __init__(self, dens: bool, channels: int = 6) -> None:
        super().__init__()
        self.embedding = nn.Embedding(30, channels)
        self.layers = nn.ModuleList([PairLayer(channels)])
        self.force_encoder = NormForceEncoder(channels) if dens else None
        self.noise = nn.Linear(channels, 1) if dens else None

    def forward(
        self,
        atomic_numbers: Tensor,
        pos: Tensor,
        batch: Tensor,
        edge_index: Tensor,
        edge_shift: Tensor,
        num_graphs: int,
        extra_embedding: Tensor | None = None,
        noise_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        n = atomic_numbers.shape[0]
        with torch.enable_grad():
            if not pos.requires_grad:
                pos = pos.detach().requires_grad_(True)
            h = self.embedding(atomic_numbers).to(pos.dtype)
            if extra_embedding is None and self.force_encoder is not None:
                extra_embedding = self.force_encoder.bias.expand(n, -1)  # the encoding of no atom
            if extra_embedding is not None:
                h = h + extra_embedding
            vec = pos[edge_index[0]] + edge_shift.to(pos.dtype) - pos[edge_index[1]]
            node_energy, w = self.layers[0](h, vec, edge_index)
            energy = scatter_sum(node_energy, batch, num_graphs)
            (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=self.training)
        out = {"energy": energy, "node_energy": node_energy, "forces": -grad}
        if self.noise is not None:
            coefficient = self.noise(w * h[edge_index[0]])
            out["noise_head"] = scatter_sum(coefficient * vec, edge_index[1], n)
            if noise_mask is not None:
                out["forces"] = torch.where(noise_mask[:, None], out["noise_head"], out["forces"])
        return out


def pair_model(dens: bool, cls: type[PairModel] = PairModel) -> PairModel:
    torch.manual_seed(0)
    return cls(dens).double().eval()


class TestPairModel(BackboneTests):
    def make_model(self, dens):
        return pair_model(dens)


# ------------------------------------------------------------------------------------------------
# Models that break one property each: the suite's test of that property fails
# ------------------------------------------------------------------------------------------------
class NotTranslationInvariant(PairModel):
    def forward(self, atomic_numbers, pos, batch, edge_index, edge_shift, num_graphs, **kw):
        out = super().forward(atomic_numbers, pos, batch, edge_index, edge_shift, num_graphs, **kw)
        out["energy"] = out["energy"] + 1e-3 * scatter_sum(pos[:, 0], batch, num_graphs)
        return out


class IndexDependent(PairModel):
    def forward(self, atomic_numbers, pos, batch, edge_index, edge_shift, num_graphs, **kw):
        out = super().forward(atomic_numbers, pos, batch, edge_index, edge_shift, num_graphs, **kw)
        out["node_energy"] = out["node_energy"] + 1e-3 * torch.arange(len(pos), dtype=pos.dtype)
        return out


class WrongForces(PairModel):
    def forward(self, *args, **kw):
        out = super().forward(*args, **kw)
        out["forces"] = 1.01 * out["forces"]
        return out


class NoiseHeadIgnored(PairModel):
    def forward(self, *args, noise_mask=None, **kw):
        return super().forward(*args, **kw)


class DeNSFlagWrong(PairModel):
    has_dens_heads = False


class NotRotationEquivariant(PairModel):
    def forward(self, *args, **kw):
        out = super().forward(*args, **kw)
        out["forces"] = out["forces"] + 1e-3 * torch.tensor([1.0, 0.0, 0.0], dtype=out["forces"].dtype)
        return out


class NotFiniteUnderAutocast(PairModel):
    def forward(self, *args, **kw):
        out = super().forward(*args, **kw)
        if torch.is_autocast_enabled("cpu"):
            out["forces"] = out["forces"] * float("nan")
        return out


@pytest.mark.parametrize(
    ("cls", "test"),
    [
        (NotFiniteUnderAutocast, "test_bf16_autocast_is_close_to_float32"),
        (NotTranslationInvariant, "test_translation_invariance"),
        (IndexDependent, "test_permutation_equivariance"),
        (IndexDependent, "test_batch_equals_single_structures"),
        (WrongForces, "test_energy_gradient_matches_finite_differences"),
        (NoiseHeadIgnored, "test_dens_mode_outputs"),
        (NotRotationEquivariant, "test_rotation_equivariance"),
        (DeNSFlagWrong, "test_declares_the_contract"),
    ],
)
def test_the_suite_fails_a_broken_model(cls, test):
    class Suite(BackboneTests):
        def make_model(self, dens):
            return pair_model(dens, cls)

    getattr(TestPairModel(), test)()  # the sound model passes
    with pytest.raises((AssertionError, TypeError)):
        getattr(Suite(), test)()


def test_force_field_refuses_a_model_without_the_contract():
    from dens.models import ForceField

    class Undeclared(nn.Module):
        def forward(self, *args, **kwargs):
            return {}

    with pytest.raises(TypeError, match="does not declare cutoff, max_num_elements, direct_forces"):
        ForceField(Undeclared(), cutoff=5.0)
    ForceField(pair_model(True))  # the declared cutoff
