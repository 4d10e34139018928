"""Equiformer v1 (MD17) with DeNS: official parity, parameter counts, symmetries, energy conservation."""

from __future__ import annotations

import math
from itertools import permutations

import pytest
import torch

from dens.models.equiformer import DepthwiseTensorProduct, Equiformer, EquivariantGraphAttention, IrrepsLinear
from dens.models.official.equiformer import (
    equiformer_from_official_config,
    export_official_equiformer,
    load_official_equiformer,
    load_official_equiformer_checkpoint,
    official_to_dens_name,
    run_equiformer_fixture,
)
from dens.testing import BackboneTests, random_rotation

F64 = torch.float64
FIXTURES = ["eqv1_md17_small", "eqv1_md17_dens_small"]


# ----------------------------------------------------------------------------------------------- helpers
def small_model(lmax: int = 2, dens: bool = True, seed: int = 0, **overrides) -> Equiformer:
    """A small float64 model with every feature of the MD17 configurations (DeNS widening included)."""
    torch.manual_seed(seed)
    degrees = range(lmax + 1)
    kwargs = dict(
        irreps_node_embedding="+".join(f"{m}x{l}e" for m, l in zip([8, 4, 4, 2], degrees, strict=False)),
        num_layers=2,
        irreps_sh="+".join(f"1x{l}e" for l in degrees),
        number_of_basis=8,
        fc_neurons=[8],
        irreps_feature="+".join(f"{m}x{l}e" for m, l in zip([16, 8, 8, 4], degrees, strict=False))
        if dens
        else "16x0e",
        irreps_head="+".join(f"{m}x{l}e" for m, l in zip([4, 2, 2, 1], degrees, strict=False)),
        num_heads=2,
        irreps_mlp_mid="+".join(f"{m}x{l}e" for m, l in zip([16, 8, 8, 4], degrees, strict=False)),
        dens_heads=dens,
        irreps_force_encoding="+".join(f"1x{l}e" for l in degrees),
    )
    kwargs.update(overrides)
    model = Equiformer(**kwargs).to(F64)
    with torch.no_grad():  # non-trivial norms and biases, as trained weights have
        for name, p in model.named_parameters():
            if "affine" in name or name.endswith("bias") or "net.1" in name or "net.4" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def molecule(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random atomic numbers and positions in a 2.6 Å box (every pair within the 5 Å cutoff)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        pos = torch.rand(n, 3, generator=g, dtype=F64) * 2.6
        dist = torch.cdist(pos, pos) + 10 * torch.eye(n, dtype=F64)
        if dist.min() > 0.8:
            break
    z = torch.tensor([1, 6, 7, 8], dtype=torch.long)[torch.randint(0, 4, (n,), generator=g)]
    return z, pos


def all_pairs(batch: torch.Tensor) -> torch.Tensor:
    """Every ordered pair of distinct atoms of the same structure: ``[2, E]`` (source, target)."""
    same = (batch[:, None] == batch[None, :]) & ~torch.eye(len(batch), dtype=torch.bool)
    target, source = torch.nonzero(same, as_tuple=True)
    return torch.stack([source, target])


def run(model, z, pos, batch=None, edge_index=None, **kwargs) -> dict[str, torch.Tensor]:
    batch = torch.zeros(len(z), dtype=torch.long) if batch is None else batch
    edge_index = all_pairs(batch) if edge_index is None else edge_index
    shift = torch.zeros(edge_index.shape[1], 3, dtype=pos.dtype)
    out = model(z, pos, batch, edge_index, shift, int(batch.max()) + 1, **kwargs)
    return {k: v.detach() for k, v in out.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These small models run many tiny ops: one intra-op thread is faster and immune to oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fixtures() -> dict[str, dict]:

    from conftest import shared_path

    folder = shared_path("fixtures/official")
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent: the official Equiformer fixtures live there")
    return {name: torch.load(folder / f"{name}.pt", weights_only=False) for name in FIXTURES}


# ------------------------------------------------------------------------------------- official parity
@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_official_fixture_parity(fixtures, name, dtype):
    """Every output of every mode; float64 to round-off, float32 within the official fp32 noise."""
    fixture = fixtures[name]
    reference = fixture["outputs_float64" if dtype == torch.float64 else "outputs"]
    tolerance = 1e-9 if dtype == torch.float64 else 2e-5  # required: 1e-6 and 2e-3
    results = run_equiformer_fixture(fixture, dtype=dtype)
    assert set(results) == set(reference)
    for mode, outputs in reference.items():
        assert set(results[mode]) == set(outputs), mode
        for key, expected in outputs.items():
            err = rel(results[mode][key].double(), expected.double())
            assert err < tolerance, f"{name} {mode} {key}: {err:.2e}"


def test_official_names_and_export_round_trip(fixtures):
    """dens exports exactly the official parameter names; export -> import reproduces the model."""
    fixture = fixtures["eqv1_md17_dens_small"]
    model = equiformer_from_official_config(fixture["config"], dens=True)
    assert load_official_equiformer(model, fixture["state_dict"]) == []  # e3nn >= 0.5 checkpoint
    exported = export_official_equiformer(model)
    official = {
        k
        for k, v in fixture["state_dict"].items()
        if not k.endswith(("output_mask", "gate.mul.weight"))
        and not (k.endswith("tp.weight") and v.numel() == 0)
    }
    assert set(exported) == official
    for key in official:
        assert torch.equal(exported[key], fixture["state_dict"][key]), key
    again = equiformer_from_official_config(fixture["config"], dens=True)
    load_official_equiformer(again, {f"module.{k}": v for k, v in exported.items()})  # DDP prefix
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_import_errors_name_the_keys(fixtures):
    fixture = fixtures["eqv1_md17_small"]
    state = dict(fixture["state_dict"])
    state["blocks.0.ga.not_a_weight"] = torch.zeros(3)
    del state["norm.affine_bias"]
    model = equiformer_from_official_config(fixture["config"], dens=False)
    with pytest.raises(
        ValueError, match=r"blocks\.0\.attention\.not_a_weight.*missing keys \['norm\.affine_bias'\]"
    ):
        load_official_equiformer(model, state)
    with pytest.raises(NotImplementedError, match="use_attn_head"):
        equiformer_from_official_config({**fixture["config"], "use_attn_head": True}, dens=False)


def _as_e3nn_044(state: dict, model: Equiformer) -> tuple[dict, int]:
    """What the fixture's network is as an e3nn 0.4.4 checkpoint: the (1, 2, 2)-type CG buffers have the
    opposite sign, and so do the weights of those paths (the official model computes the same function).
    """
    state = {k: v.clone() for k, v in state.items()}
    flipped = set(permutations((1, 2, 2))) | set(permutations((1, 3, 3)))
    modules = dict(model.named_modules())
    count = 0
    for key in list(state):
        if "_w3j_" not in key:
            continue
        ls = tuple(int(t) for t in key.rsplit("_w3j_", 1)[1].split("_"))
        if ls not in flipped:
            continue
        state[key] = -state[key]
        official_tp = key.split(".tp._compiled_main_left_right.")[0]
        tp = modules[official_to_dens_name(official_tp + ".tp.weight").removesuffix(".weight")]
        # official weight owner: the tensor product itself, or the radial MLP that feeds it
        radial = {"edge_deg_embed.dw": "edge_deg_embed.rad"}.get(official_tp, official_tp + "_rad")
        for *_, path_ls, sl in tp.paths:
            if path_ls == ls:
                count += 1
                if tp.weight is not None:
                    state[official_tp + ".tp.weight"][sl] *= -1
                else:
                    state[radial + ".net.6.weight"][sl] *= -1
                    state[radial + ".offset"][sl] *= -1
    return state, count


def test_e3nn_044_sign_trap(fixtures):
    """A checkpoint whose CG buffers carry e3nn 0.4.4 signs is imported to compute the same function."""
    fixture = fixtures["eqv1_md17_dens_small"]
    model = equiformer_from_official_config(fixture["config"], dens=True)
    state, count = _as_e3nn_044(fixture["state_dict"], model)
    assert count > 0
    flipped = load_official_equiformer(model, state)
    assert len(flipped) == count and all(
        ("1, 2, 2" in f or "2, 1, 2" in f or "2, 2, 1" in f) for f in flipped
    )
    fixture_044 = {**fixture, "state_dict": state}
    results = run_equiformer_fixture(fixture_044, dtype=torch.float64)
    for mode, outputs in fixture["outputs_float64"].items():
        for key, expected in outputs.items():
            assert rel(results[mode][key], expected) < 1e-9, (mode, key)
    # The trap is real: ignoring the checkpoint's CG buffers computes a different function.
    blind = {k: v for k, v in state.items() if "_w3j_" not in k}
    naive = run_equiformer_fixture({**fixture, "state_dict": blind}, dtype=torch.float64)
    assert rel(naive["s2ef"]["forces"], fixture["outputs_float64"]["s2ef"]["forces"]) > 1e-2
    # A buffer that is not e3nn's Clebsch-Gordan tensor at all is refused.
    bad = dict(state)
    key = next(k for k in bad if k.endswith("_w3j_1_1_1"))
    bad[key] = torch.ones_like(bad[key])
    with pytest.raises(ValueError, match="neither"):
        load_official_equiformer(equiformer_from_official_config(fixture["config"], dens=True), bad)


# ------------------------------------------------------------------------------------ presets and counts
@pytest.mark.parametrize(
    ("preset", "dens", "count"),
    [
        ("md17_l2", False, 3_496_001),
        ("md17_l2", True, 4_000_577),
        ("md17_l3", False, 5_500_865),
        ("md17_l3", True, 6_354_241),
    ],
)
def test_preset_parameter_counts(preset, dens, count):
    model = Equiformer.from_preset(preset, dens_heads=dens)
    assert sum(p.numel() for p in model.parameters()) == count
    assert (model.force_encoder is not None) == dens and (model.noise_head is not None) == dens


def test_official_checkpoint_loader_with_preset():
    model = Equiformer.from_preset("md17_l2", dens_heads=True)
    checkpoint = {"state_dict": {f"module.{k}": v for k, v in export_official_equiformer(model).items()}}
    loaded = load_official_equiformer_checkpoint(checkpoint, preset="md17_l2")
    assert loaded.has_dens_heads
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


# ------------------------------------------------------------------------------------------- symmetries
@pytest.mark.parametrize("lmax", [3])
def test_rotation_equivariance(lmax):
    """Energies invariant, forces and the DeNS noise prediction equivariant under proper rotations (L2 is
    in the suite below)."""
    model = small_model(lmax)
    z, pos = molecule()
    forces_in = torch.randn(len(z), 3, dtype=F64)
    mask = torch.tensor([True, False] * 4)
    rotation = random_rotation(dtype=F64, generator=torch.Generator().manual_seed(lmax))
    out = run(model, z, pos, extra_embedding=model.force_encoder(forces_in, mask), noise_mask=mask)
    rotated = run(
        model,
        z,
        pos @ rotation.T,
        extra_embedding=model.force_encoder(forces_in @ rotation.T, mask),
        noise_mask=mask,
    )
    assert rel(rotated["energy"], out["energy"]) < 1e-12
    assert rel(rotated["node_energy"], out["node_energy"]) < 1e-12
    assert rel(rotated["forces"], out["forces"] @ rotation.T) < 1e-11
    assert rel(rotated["noise_head"], out["noise_head"] @ rotation.T) < 1e-11


def test_reflections_se3_not_e3():
    """The edge harmonics are all parity 'e', so the model is SE(3)- but not E(3)-equivariant.

    A mirror image is a different input (the model is chirality-aware): its energy differs. A planar
    molecule is its own mirror image up to a rotation, so for it a reflection acts as that rotation.
    """
    model = small_model(3, dens=False)
    mirror = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=F64))
    z, pos = molecule()
    out, reflected = run(model, z, pos), run(model, z, pos @ mirror.T)
    assert rel(reflected["energy"], out["energy"]) > 1e-4
    assert rel(reflected["forces"], out["forces"] @ mirror.T) > 1e-4

    planar = pos.clone()
    planar[:, 2] = 0.0  # in the xy plane: x -> -x equals the rotation by pi about y
    rotation_y = torch.diag(torch.tensor([-1.0, 1.0, -1.0], dtype=F64))
    out, reflected = run(model, z, planar), run(model, z, planar @ mirror.T)
    assert rel(reflected["energy"], out["energy"]) < 1e-12
    assert rel(reflected["forces"], out["forces"] @ rotation_y.T) < 1e-11


def test_training_mode_forces_carry_gradients():
    model = small_model(2).train()
    z, pos = molecule(5, seed=6)
    batch = torch.zeros(5, dtype=torch.long)
    out = model(z, pos, batch, all_pairs(batch), torch.zeros(20, 3, dtype=F64), 1)
    out["forces"].pow(2).sum().backward()
    grad = model.blocks[0].attention.message_radial.net[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_dropouts_act_in_training_only():
    model = small_model(2, alpha_drop=0.3, proj_drop=0.3, out_drop=0.3, drop_path_rate=0.3)
    z, pos = molecule(seed=11)
    assert rel(run(model, z, pos)["energy"], run(model, z, pos)["energy"]) == 0.0  # eval: deterministic
    model.train()
    torch.manual_seed(0)
    first = run(model, z, pos)["energy"]
    torch.manual_seed(1)
    assert rel(run(model, z, pos)["energy"], first) > 1e-6


class TestEquiformerBackbone(BackboneTests):
    """The suite (dens.testing) on the L2 model: exact equivariance, gradient forces."""

    rotation_energy_tol = 1e-12
    rotation_forces_tol = 1e-11
    forces_tol = 1e-11
    fd_num_coordinates = None  # all 18

    def make_model(self, dens):
        return small_model(2, dens=dens)

    def structures(self):
        return [self._structure(*molecule(n, seed)) for n, seed in [(8, 4), (5, 5), (6, 1)]]

    def fd_structure(self):
        return self._structure(*molecule(6, seed=2))

    @staticmethod
    def _structure(z, pos):
        edge_index = all_pairs(torch.zeros(len(z), dtype=torch.long))
        shift = torch.zeros(edge_index.shape[1], 3, dtype=F64)
        return {"z": z, "pos": pos, "edge_index": edge_index, "shift": shift}


# ------------------------------------------------------------------------------------------------- DeNS
def test_dens_outputs_and_force_encoding():
    model = small_model(2)
    z, pos = molecule(seed=7)
    forces_in = torch.randn(len(z), 3, dtype=F64)
    mask = torch.tensor([True, True, False, False, True, False, False, False])
    plain = run(model, z, pos)  # S2EF mode: the encoder's bias only
    bias_only = run(model, z, pos, extra_embedding=model.force_encoder(forces_in, torch.zeros_like(mask)))
    assert rel(plain["energy"], bias_only["energy"]) < 1e-14
    dens = run(model, z, pos, extra_embedding=model.force_encoder(forces_in, mask), noise_mask=mask)
    unmasked = run(model, z, pos, extra_embedding=model.force_encoder(forces_in, mask))
    assert torch.equal(dens["forces"][mask], dens["noise_head"][mask])
    assert torch.equal(dens["forces"][~mask], unmasked["forces"][~mask])
    assert rel(dens["energy"], plain["energy"]) > 1e-6  # the encoding changes the prediction
    assert dens["noise_head"].shape == (len(z), 3)
    assert model.force_encoder(forces_in, mask).shape == (len(z), model.irreps_node.dim)


# ----------------------------------------------------------------------------------- Table 5 variants
def test_attention_off_sums_linear_messages_and_attention_averages():
    """Duplicating every edge doubles the summed linear messages but leaves attention unchanged."""
    torch.manual_seed(0)
    kwargs = dict(
        irreps_in="8x0e+4x1e+2x2e",
        irreps_sh="1x0e+1x1e+1x2e",
        irreps_out="8x0e+4x1e+2x2e",
        fc_neurons=[8, 8],
        irreps_head="4x0e+2x1e+1x2e",
        num_heads=2,
    )
    attention = EquivariantGraphAttention(**kwargs).double()
    summed = EquivariantGraphAttention(**kwargs, attention=False).double()
    assert not hasattr(summed, "alpha_dot") and not hasattr(summed, "value_tp")
    _, pos = molecule(6, seed=8)
    edge_index = all_pairs(torch.zeros(6, dtype=torch.long))
    vec = pos[edge_index[0]] - pos[edge_index[1]]
    from e3nn import o3

    sh = o3.spherical_harmonics([0, 1, 2], vec, normalize=True, normalization="component")
    basis = torch.randn(edge_index.shape[1], 8, dtype=F64)
    x = torch.randn(6, attention.merge_src.irreps_in.dim, dtype=F64)
    twice = torch.cat([edge_index, edge_index], 1)
    with torch.no_grad():
        a1 = attention(x, edge_index, sh, basis)
        a2 = attention(x, twice, torch.cat([sh, sh]), torch.cat([basis, basis]))
        bias = summed.proj(torch.zeros(1, summed.proj.irreps_in.dim, dtype=F64))
        s1 = summed(x, edge_index, sh, basis) - bias
        s2 = summed(x, twice, torch.cat([sh, sh]), torch.cat([basis, basis])) - bias
    assert rel(a2, a1) < 1e-12
    assert rel(s2, 2 * s1) < 1e-12


@pytest.mark.parametrize(
    "switches",
    [
        dict(attention=False),
        dict(layer_norm=False),
        dict(attention=False, layer_norm=False, weight_init="uniform"),  # SEGNN-like, §D.2 init
        dict(nonlinear_message=False),
    ],
)
def test_table5_variants_build_and_are_equivariant(switches):
    model = small_model(2, **switches)
    if not switches.get("layer_norm", True):
        assert not any("norm" in name and "affine" in name for name, _ in model.named_parameters())
    z, pos = molecule(seed=9)
    rotation = random_rotation(dtype=F64, generator=torch.Generator().manual_seed(1))
    out, rotated = run(model, z, pos), run(model, z, pos @ rotation.T)
    assert torch.isfinite(out["forces"]).all()
    assert rel(rotated["energy"], out["energy"]) < 1e-12
    assert rel(rotated["forces"], out["forces"] @ rotation.T) < 1e-11


def test_table5_preset_variant_and_uniform_initialisation():
    model = Equiformer.from_preset(
        "md17_l2", dens=True, attention=False, layer_norm=False, weight_init="uniform"
    )
    for module in model.modules():
        if isinstance(module, IrrepsLinear):
            for _, out_block, sl in module.paths:
                assert module.weight[sl].abs().max() <= 1 / math.sqrt(module.fan_in(out_block)) + 1e-7 or (
                    module is model.atom_embedding
                )
        if isinstance(module, DepthwiseTensorProduct) and module.weight is not None:
            assert module.weight.abs().max() <= 1.0
    z, pos = molecule(seed=10)
    out = run(model.double(), z, pos.double())
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()


# -------------------------------------------------------------------------------------------------- NVE
def test_nve_energy_conservation(shared_dir):
    """Velocity Verlet, 200 x 0.5 fs at ~300 K, ethanol, with a small model trained for a few steps.

    The model is fitted briefly (40 Adam steps) to rMD17 ethanol (kcal/mol, Å) so that the molecule
    stays bound; the graph is all pairs (ethanol never exceeds the 5 Å cutoff). Measured: the total
    energy stays within 8e-4 kcal/mol (0.03 meV) of its start over the 100 fs, with a kinetic energy of
    about 6 kcal/mol; bound: 1e-2 kcal/mol.
    """
    import numpy as np
    from ase.data import atomic_masses
    from ase.io import read

    frames = read(shared_dir / "data" / "md17" / "rmd17_ethanol_reduced_100_kcal.xyz", index=":")
    z = torch.tensor(frames[0].numbers)
    positions = torch.tensor(np.array([a.positions for a in frames]), dtype=F64)
    energies = torch.tensor([a.get_potential_energy() for a in frames], dtype=F64)
    forces = torch.tensor(np.array([a.get_forces() for a in frames]), dtype=F64)
    n, scale, shift = len(z), forces.std(), energies.mean()

    model = small_model(2, dens=False, seed=0, num_layers=1).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3)
    batch_size = 4
    batch = torch.arange(batch_size).repeat_interleave(n)
    edges = all_pairs(batch)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        idx = torch.randint(0, len(frames), (batch_size,), generator=generator)
        out = model(
            z.repeat(batch_size),
            positions[idx].reshape(-1, 3),
            batch,
            edges,
            torch.zeros(len(edges[0]), 3, dtype=F64),
            batch_size,
        )
        loss = (out["energy"] - (energies[idx] - shift) / scale).abs().mean()
        loss = loss + 20 * (out["forces"] - forces[idx].reshape(-1, 3) / scale).abs().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    model.eval()

    mass = torch.tensor(atomic_masses[z.numpy()], dtype=F64)[:, None]
    tau_fs = 48.88821  # time unit of (kcal/mol, Å, amu)
    dt = 0.5 / tau_fs
    single = all_pairs(torch.zeros(n, dtype=torch.long))

    def potential(x):
        out = run(model, z, x, edge_index=single)
        return (out["energy"] * scale).item(), out["forces"] * scale

    x = positions[0].clone()
    v = torch.randn(n, 3, generator=torch.Generator().manual_seed(1), dtype=F64) * torch.sqrt(0.596 / mass)
    v = v - (mass * v).sum(0) / mass.sum()  # no centre-of-mass motion
    e, f = potential(x)
    total0 = e + 0.5 * (mass * v * v).sum().item()
    totals = []
    for _ in range(200):
        v = v + 0.5 * dt * f / mass
        x = x + dt * v
        e, f = potential(x)
        v = v + 0.5 * dt * f / mass
        totals.append(e + 0.5 * (mass * v * v).sum().item())
    drift = np.abs(np.array(totals) - total0)
    assert torch.cdist(x, x).max() < 4.5  # still bound, inside the cutoff
    assert drift.max() < 1e-2, f"total-energy drift {drift.max():.3e} kcal/mol"


# ------------------------------------------------------------------------------- grouped tensor product
def _tp_reference(tp: DepthwiseTensorProduct, x: torch.Tensor, sh: torch.Tensor, weight: torch.Tensor):
    """The flat tensor-product output path by path, from e3nn's ``wigner_3j``: an independent layout check."""
    from e3nn import o3

    out = x.new_zeros(sh.shape[0], tp.irreps_out.dim)
    x_slices, sh_slices, out_slices = tp.irreps_in.slices(), tp.irreps_sh.slices(), tp.irreps_out.slices()
    x = x.expand(sh.shape[0], -1)
    for i, j, position, (l1, l2, l3), sl in tp.paths:
        mul = tp.irreps_in[i].mul
        xi = x[:, x_slices[i]].reshape(sh.shape[0], mul, 2 * l1 + 1)
        cg = o3.wigner_3j(l1, l2, l3, dtype=x.dtype) * math.sqrt(2 * l3 + 1)
        block = torch.einsum("eua,eb,abc->euc", xi, sh[:, sh_slices[j]], cg) * weight[:, sl].unsqueeze(-1)
        out[:, out_slices[position]] = block.reshape(sh.shape[0], mul * (2 * l3 + 1))
    return out


@pytest.mark.parametrize("edges", [5, 1, 0])
@pytest.mark.parametrize("rows", ["edges", "one"])
def test_tensor_product_groups_paths_by_output_irrep(edges, rows):
    """One ``[E, mul, 2l+1]`` block per irrep of ``irreps_out.simplify()``, in the unmerged flat layout; a
    linear map takes the groups whole, also into unmerged input irreps (one piece over several blocks)."""
    torch.manual_seed(0)
    tp = DepthwiseTensorProduct("4x0e+2x1e+3x2e", "1x0e+1x1e+1x2e", "1x0e+1x1e+1x2e").double()
    x = torch.randn(edges if rows == "edges" else 1, tp.irreps_in.dim, dtype=F64)
    sh, weight = torch.randn(edges, 9, dtype=F64), torch.randn(edges, tp.weight_numel, dtype=F64)
    blocks = tp(x, sh, weight, as_blocks=True)
    merged = tp.irreps_out.simplify()
    assert [b.shape for b in blocks] == [(edges, mul, ir.dim) for mul, ir in merged]
    flat = tp(x, sh, weight)
    torch.testing.assert_close(
        flat, torch.cat([b.reshape(edges, b.shape[1] * b.shape[2]) for b in blocks], dim=1)
    )
    torch.testing.assert_close(flat, _tp_reference(tp, x, sh, weight))
    for irreps_in in (tp.irreps_out, merged):  # unmerged: the 0e group spans three input blocks
        linear = IrrepsLinear(irreps_in, "3x0e+2x1e+1x2e").double()
        torch.testing.assert_close(linear(blocks), linear(flat))


def test_radial_weights_in_group_order_equal_the_reordered_ones():
    """``RadialProfile(x, order)`` picks the columns on its last layer's rows: the same values as reordering
    every edge's output, and the tensor product given them with ``grouped_weight`` the same blocks and
    gradients as given the flat weights."""
    from dens.models.irreps import RadialProfile

    torch.manual_seed(0)
    tp = DepthwiseTensorProduct("4x0e+2x1e+3x2e", "1x0e+1x1e+1x2e", "1x0e+1x1e+1x2e").double()
    assert tp.weight_order is not None  # paths are stored by input block, groups by output irrep
    radial = RadialProfile([6, 8, tp.weight_numel]).double()
    basis = torch.randn(7, 6, dtype=F64, requires_grad=True)
    x, sh = torch.randn(7, tp.irreps_in.dim, dtype=F64), torch.randn(7, 9, dtype=F64)
    torch.testing.assert_close(radial(basis, tp.weight_order), radial(basis)[:, tp.weight_order])
    grouped = tp(x, sh, radial(basis, tp.weight_order), as_blocks=True, grouped_weight=True)
    flat = tp(x, sh, radial(basis), as_blocks=True)
    for a, b in zip(grouped, flat, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    probe = [torch.randn(b.shape, dtype=F64) for b in flat]
    grads = [
        torch.autograd.grad(sum((b * p).sum() for b, p in zip(out, probe, strict=True)), (basis, *radial.parameters()))
        for out in (grouped, flat)
    ]  # fmt: skip
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    internal = DepthwiseTensorProduct("2x1e", "1x1e", "1x1e", internal_weights=True).double()
    with pytest.raises(ValueError, match="internal one is in path order"):
        internal(torch.randn(7, 6, dtype=F64), sh[:, 1:4], grouped_weight=True)


def test_linear_scales_and_mismatched_pieces():
    torch.manual_seed(0)
    tp = DepthwiseTensorProduct("4x0e+2x1e", "1x0e+1x1e", "1x0e+1x1e", internal_weights=True).double()
    x, sh = torch.randn(6, tp.irreps_in.dim, dtype=F64), torch.randn(6, 4, dtype=F64)
    linear = IrrepsLinear(tp.irreps_out.simplify(), "3x0e+1x1e").double()
    blocks, scales = tp.unweighted_blocks(x, sh)
    assert [s.shape[0] for s in scales] == [b.shape[1] for b in blocks]
    torch.testing.assert_close(linear(blocks, scales), linear(tp(x, sh)))
    with pytest.raises(ValueError, match="do not cover"):
        linear(blocks[:1])
    with pytest.raises(ValueError, match="do not match"):
        linear(blocks[::-1])
    unmerged = IrrepsLinear("2x0e+3x0o", "1x0e").double()
    with pytest.raises(ValueError, match="do not match"):  # same dimension, another irrep
        unmerged([torch.randn(6, 5, 1, dtype=F64)])
