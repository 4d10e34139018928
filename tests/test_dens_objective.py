"""DeNS corruption (Algorithm 2) statistics and the loss of Eq. 1 / Eq. 6 against hand computations."""

import math

import pytest
import torch

from dens.data import collate, make_structure
from dens.losses import (
    CorruptionDraws,
    DeNSSettings,
    LossSettings,
    corrupt,
    dens_coefficient,
    loss_rows,
    training_loss,
)


def make_batch(num_structures=40, atoms=30, fixed_fraction=0.3, seed=0, md_split=None):
    g = torch.Generator().manual_seed(seed)
    items = []
    for s in range(num_structures):
        n = atoms + s % 5
        fixed = torch.rand(n, generator=g) < fixed_fraction
        extra = {} if md_split is None else {"md_split": torch.tensor(bool(md_split[s]))}
        items.append(
            make_structure(
                torch.randn(n, 3, generator=g) * 3, torch.randint(1, 50, (n,), generator=g), fixed=fixed,
                energy=float(torch.randn(1, generator=g)), forces=torch.randn(n, 3, generator=g), sid=s, fid=0,
                dtype=torch.float64, **extra,
            )
        )  # fmt: skip
    return collate(items)


def test_corruption_statistics():
    batch = make_batch(num_structures=60, atoms=50)
    settings = DeNSSettings(prob=0.5, sigma=0.1, corrupt_ratio=0.25)
    gen = torch.Generator().manual_seed(1)
    selected, ratios, noise = [], [], []
    for _ in range(60):
        c = corrupt(batch, settings, gen)
        assert torch.equal(c.pos[batch.fixed], batch.pos[batch.fixed])  # fixed atoms never move
        assert not c.noise_mask[batch.fixed].any()  # ... and are never denoised
        assert torch.equal(c.pos[~c.noise_mask], batch.pos[~c.noise_mask])
        assert not c.noise_mask[~c.dens_structures[batch.batch]].any()  # only in DeNS structures
        free_in_dens = (~batch.fixed) & c.dens_structures[batch.batch]
        ratios.append((c.noise_mask.sum() / free_in_dens.sum()).item())
        noise.append(c.noise[c.noise_mask])
        selected.append(c.dens_structures.float().mean().item())
    noise = torch.cat(noise)
    n = noise.numel()
    # sigma: sample std within 4 standard errors (std of a sample std ~ sigma / sqrt(2n))
    assert abs(noise.std().item() - 0.1) < 4 * 0.1 / math.sqrt(2 * n)
    assert abs(noise.mean().item()) < 4 * 0.1 / math.sqrt(n)
    # r_DeNS over free atoms of DeNS structures; p_DeNS over structures (binomial standard errors)
    mean_ratio = sum(ratios) / len(ratios)
    assert abs(mean_ratio - 0.25) < 0.02
    assert abs(sum(selected) / len(selected) - 0.5) < 4 * math.sqrt(0.25 / (60 * 60))


def test_batch_selection_flips_one_coin():
    batch = make_batch(num_structures=10)
    gen = torch.Generator().manual_seed(0)
    draws = [
        corrupt(batch, DeNSSettings(prob=0.3, selection="batch"), gen).dens_structures for _ in range(400)
    ]
    assert all(bool(d.all()) or not bool(d.any()) for d in draws)
    freq = sum(bool(d.all()) for d in draws) / 400
    assert abs(freq - 0.3) < 4 * math.sqrt(0.21 / 400)


def test_md_split_structures_never_corrupted_and_full_corruption():
    flags = [s % 2 == 0 for s in range(20)]
    batch = make_batch(num_structures=20, md_split=flags)
    c = corrupt(batch, DeNSSettings(prob=1.0, corrupt_ratio=None), torch.Generator().manual_seed(0))
    assert not c.dens_structures[torch.tensor(flags)].any()
    assert c.dens_structures[~torch.tensor(flags)].all()
    expected = (~batch.fixed) & c.dens_structures[batch.batch]
    assert torch.equal(c.noise_mask, expected)  # no partial corruption: every free atom of DeNS structures


def test_disabled_dens_corrupts_nothing():
    batch = make_batch(num_structures=5)
    c = corrupt(batch, DeNSSettings(enabled=False), torch.Generator().manual_seed(0))
    assert not c.noise_mask.any() and torch.equal(c.pos, batch.pos)


def hand_loss(out, batch, c, losses, dens, mean, e_std, f_std, progress):
    """Algorithm 2, lines 22-35 (normalization 'structure'), and the official alternatives, written out
    structure by structure and atom by atom."""
    lam = dens_coefficient(dens, progress) if c is not None else 0.0
    e_terms, f_terms, n_terms, per_structure = [], [], [], []
    for s in range(batch.num_graphs):
        is_dens = c is not None and bool(c.dens_structures[s])
        e = abs(out["energy"][s].item() - (batch.energy[s].item() - mean) / e_std)
        if not is_dens or dens.energy_on_corrupted:
            e_terms.append(e)
        atoms = [i for i in range(batch.num_atoms) if batch.batch[i] == s]
        counted = [i for i in atoms if not (losses.train_on_free_atoms and batch.fixed[i])]
        f_sum = n_sum = 0.0
        for i in counted:
            if c is not None and bool(c.noise_mask[i]):
                err = out["noise_head"][i] - c.noise[i] / dens.sigma
                value = err.pow(2).sum().item() if dens.noise_loss == "mse" else err.norm().item()
                n_terms.append(value)
                n_sum += value
            else:
                value = (out["force_head"][i] - batch.forces[i] / f_std).norm().item()
                f_terms.append(value)
                f_sum += value
        energy_part = losses.energy_coefficient * e if (not is_dens or dens.energy_on_corrupted) else 0.0
        per_structure.append(energy_part + (losses.force_coefficient * f_sum + lam * n_sum) / len(counted))
    mean_of = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    if dens.normalization == "structure":
        return sum(per_structure) / batch.num_graphs
    num_counted = len(f_terms) + len(n_terms)
    if dens.normalization == "atoms":
        return (losses.energy_coefficient * mean_of(e_terms) + losses.force_coefficient * sum(f_terms) / num_counted
                + lam * sum(n_terms) / num_counted)  # fmt: skip
    return (
        losses.energy_coefficient * mean_of(e_terms)
        + losses.force_coefficient * mean_of(f_terms)
        + lam * mean_of(n_terms)
    )


@pytest.mark.parametrize(
    "switches",
    [
        {},
        {"energy_on_corrupted": False},
        {"corrupt_ratio": None},
        {"force_encoding": False},
        {"noise_loss": "mse"},
        {"coefficient_schedule": "linear_decay"},
        {"selection": "batch"},
    ],
)
@pytest.mark.parametrize("normalization", ["structure", "atoms", "separate"])
def test_loss_equals_hand_computation(switches, normalization):
    batch = make_batch(num_structures=6, atoms=8)
    dens = DeNSSettings(
        **{
            "prob": 0.5,
            "sigma": 0.1,
            "corrupt_ratio": 0.5,
            "coefficient": 10.0,
            "normalization": normalization,
            **switches,
        }
    )
    losses = LossSettings(energy_coefficient=2.0, force_coefficient=100.0)
    c = corrupt(batch, dens, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    out = {
        "energy": torch.randn(batch.num_graphs, generator=g, dtype=torch.float64),
        "force_head": torch.randn(batch.num_atoms, 3, generator=g, dtype=torch.float64),
        "noise_head": torch.randn(batch.num_atoms, 3, generator=g, dtype=torch.float64),
    }
    out["forces"] = out["force_head"]
    total, parts = training_loss(out, batch, c, losses, dens, 0.3, 2.0, 1.5, progress=0.4)
    expected = hand_loss(out, batch, c, losses, dens, 0.3, 2.0, 1.5, 0.4)
    assert total.item() == pytest.approx(expected, rel=1e-12)
    assert set(parts) == {"energy", "forces", "noise"}


def test_loss_without_dens_is_eq1():
    batch = make_batch(num_structures=4, atoms=6)
    out = {
        "energy": torch.zeros(4, dtype=torch.float64),
        "forces": torch.zeros(batch.num_atoms, 3, dtype=torch.float64),
    }
    total, parts = training_loss(out, batch, None, LossSettings(), DeNSSettings(enabled=False), 0.0, 1.0, 1.0)
    e = batch.energy.abs().mean()
    # Eq. 1 per structure (mean over its free atoms), then the mean over structures
    f = torch.stack(
        [batch.forces[(batch.batch == s) & ~batch.fixed].norm(dim=-1).mean() for s in range(4)]
    ).mean()
    assert total.item() == pytest.approx((2 * e + 100 * f).item(), rel=1e-12)
    assert "noise" not in parts


def test_linear_decay_and_validation():
    s = DeNSSettings(coefficient=5.0, coefficient_schedule="linear_decay")
    assert (
        dens_coefficient(s, 0.0) == 5.0
        and dens_coefficient(s, 0.5) == 2.5
        and dens_coefficient(s, 1.2) == 0.0
    )
    with pytest.raises(ValueError, match="selection"):
        DeNSSettings(selection="atom")
    with pytest.raises(ValueError, match="unknown dens settings"):
        DeNSSettings.from_dict({"sigmaa": 0.1})


def test_official_mask_over_all_atoms():
    """mask_atoms='all' (official OC20): the mask covers fixed atoms, which do not move, are encoded and
    read from the noise head (head_mask), and count in no loss term."""
    batch = make_batch(num_structures=6, atoms=40, fixed_fraction=0.4)
    settings = DeNSSettings(prob=1.0, corrupt_ratio=0.5, mask_atoms="all")
    c = corrupt(batch, settings, torch.Generator().manual_seed(3))
    assert c.head_mask[batch.fixed].any() and c.head_mask[~batch.fixed].any()
    assert torch.equal(c.noise_mask, c.head_mask & ~batch.fixed)
    assert torch.equal(c.pos[batch.fixed], batch.pos[batch.fixed])
    assert (c.pos[c.noise_mask] != batch.pos[c.noise_mask]).all(dim=-1).all()
    _, force_rows, noise_rows, counted = loss_rows(batch, c, LossSettings(), settings)
    assert not (force_rows & c.head_mask).any() and torch.equal(noise_rows, c.noise_mask)
    assert torch.equal(force_rows | noise_rows, counted)  # every free atom in exactly one term
    free = corrupt(batch, DeNSSettings(prob=1.0, corrupt_ratio=0.5), torch.Generator().manual_seed(3))
    assert free.encode_mask is None and torch.equal(free.head_mask, free.noise_mask)
    assert not free.noise_mask[batch.fixed].any()
    with pytest.raises(ValueError, match="mask_atoms"):
        DeNSSettings(mask_atoms="fixed")


@pytest.mark.parametrize("mask_atoms", ["free", "all"])
def test_explicit_draws(mask_atoms):
    """CorruptionDraws replaces the random numbers: coin < p selects, uniform < r masks, sigma * normal moves."""
    batch = make_batch(num_structures=4, atoms=10)
    n = batch.num_atoms
    g = torch.Generator().manual_seed(5)
    draws = CorruptionDraws(
        torch.tensor([0.1, 0.9, 0.2, 0.6]), torch.rand(n, generator=g), torch.randn(n, 3, generator=g)
    )
    settings = DeNSSettings(prob=0.5, sigma=0.2, corrupt_ratio=0.4, mask_atoms=mask_atoms)
    c = corrupt(batch, settings, draws=draws)
    assert c.dens_structures.tolist() == [True, False, True, False]
    mask = c.dens_structures[batch.batch] & (draws.mask_uniform < 0.4)
    if mask_atoms == "free":
        mask &= ~batch.fixed
    assert torch.equal(c.head_mask, mask) and torch.equal(c.noise_mask, mask & ~batch.fixed)
    moved = c.noise_mask[:, None]
    assert torch.allclose(c.pos, batch.pos + 0.2 * draws.normal.double() * moved, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match=r"draws.coin must have shape \(1,\)"):
        corrupt(batch, DeNSSettings(selection="batch"), draws=draws)
    with pytest.raises(ValueError, match=r"draws\.normal"):
        corrupt(batch, settings, draws=CorruptionDraws(draws.coin, draws.mask_uniform))
