"""Normalisers, linear references, the balanced sampler, the converter and the demo data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dens.data import (
    BalancedBatchSampler,
    LinearReference,
    LmdbDataset,
    SystemReference,
    compute_statistics,
    fit_linear_reference,
    get_natoms,
    make_structure,
    open_dataset,
)
from dens.data.convert import main as convert_main
from dens.data.demo import DEMO_DIR, demo_dataset


def test_streamed_statistics_match_numpy(shared_dir):
    ds = open_dataset(shared_dir / "data" / "oc20" / "oc20_s2ef_sample_old_pyg.lmdb")
    st = compute_statistics(ds)
    e = np.array([float(s["energy"]) for s in ds])
    f = np.concatenate([s["forces"].double().numpy() for s in ds])
    assert st["energy_mean"] == pytest.approx(e.mean()) and st["energy_std"] == pytest.approx(e.std())
    assert st["forces_std"] == pytest.approx(f.std()) and st["forces_rms"] == pytest.approx(
        np.sqrt((f**2).mean())
    )
    assert st["num_structures"] == 240 and st["num_atoms"] == int(get_natoms(ds).sum())
    free = compute_statistics(ds, free_atoms_only=True)
    assert free["forces_rms"] > st["forces_rms"]  # fixed atoms have smaller forces


def test_linear_reference_fit_recovers_coefficients(shared_dir):
    ds = open_dataset(shared_dir / "data" / "oc22" / "oc22_s2ef_train16.lmdb")
    rng = np.random.default_rng(0)
    true = np.zeros(101)
    zs = sorted({int(z) for s in ds for z in s["atomic_numbers"]})
    true[zs] = rng.normal(-5, 2, len(zs))
    synth = []
    for s in ds:
        s = dict(s)
        s["energy"] = torch.tensor(true[s["atomic_numbers"].numpy()].sum(), dtype=torch.float64)
        synth.append(s)
    coeff = fit_linear_reference(synth)
    # with 16 structures the per-element counts may be collinear: the fit must reproduce the energies
    ref = LinearReference(coeff)
    for s in synth:
        assert float(ref(s)["energy"]) == pytest.approx(0.0, abs=1e-6)
    # references subtract as transforms
    ds_ref = open_dataset(shared_dir / "data" / "oc22" / "oc22_s2ef_train16.lmdb", linear_reference=coeff)
    raw = ds[0]
    assert float(ds_ref[0]["energy"]) == pytest.approx(
        float(raw["energy"]) - coeff[raw["atomic_numbers"].numpy()].sum()
    )
    b = torch.tensor([0, 0, 1])
    assert ref.reference(torch.tensor([1, 8, 1]), b, 2).shape == (2,)


def test_system_reference_accepts_official_keys():
    s = make_structure(torch.zeros(1, 3), [1], energy=-10.0, sid=1000100)
    out = SystemReference({"random1000100": -9.0})(s)
    assert float(out["energy"]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="no reference energy"):
        SystemReference({"random5": 1.0})(s)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_balanced_sampler_covers_and_balances(world):
    rng = np.random.default_rng(world)
    natoms = rng.integers(20, 200, 203)
    samplers = [BalancedBatchSampler(natoms, 4, world, r, shuffle=True, seed=3) for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    per_rank = [list(s) for s in samplers]
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == len(samplers[0])
    seen = sorted(i for p in per_rank for b in p for i in b)
    assert set(seen) == set(range(203))  # padding may repeat a few
    loads = np.array([[natoms[b].sum() for b in p] for p in per_rank])  # [world, steps]
    if world > 1:
        spread = (loads.max(0) - loads.min(0))[:-1] / loads.mean(0)[:-1]
        assert np.median(spread) < 0.1
    # deterministic and epoch-dependent
    again = BalancedBatchSampler(natoms, 4, world, 0, shuffle=True, seed=3)
    again.set_epoch(2)
    assert list(again) == per_rank[0]
    again.set_epoch(3)
    assert list(again) != per_rank[0]


def test_sampler_resume_and_metadata(tmp_path):
    natoms = np.arange(1, 41)
    s = BalancedBatchSampler(natoms, 2, 2, 0, shuffle=False)
    full = list(s)
    s.set_epoch_and_start_iteration(0, 3)
    assert len(s) == len(full) - 3 and list(s) == full[3:]


def test_convert_cli_md17_xyz_to_sharded_lmdb(tmp_path, shared_dir):
    src = shared_dir / "data" / "md17" / "rmd17_ethanol_reduced_100_kcal.xyz"
    out = tmp_path / "lmdb"
    assert convert_main([str(src), "--out", str(out), "--shards", "2", "--energy-unit", "kcal/mol"]) == 0
    ds = open_dataset(out)
    orig = open_dataset(src, energy_unit="kcal/mol")
    assert isinstance(ds, LmdbDataset) and len(ds.files) == 2 and len(ds) == 100
    assert ds.natoms.tolist() == [9] * 100
    first = ds[0]  # shard 0 entry 0 = input frame 0
    assert float(first["energy"]) == pytest.approx(float(orig[0]["energy"]), abs=1e-9)
    torch.testing.assert_close(first["forces"], orig[0]["forces"])
    assert not first["pbc"].any()


def test_convert_filters_large_forces(tmp_path, shared_dir):
    from dens.data.convert import convert

    counts = convert([shared_dir / "data" / "oc20" / "random1000156.traj"], tmp_path / "o", max_force=0.25)
    assert counts["read"] == 36 and counts["filtered"] > 0
    assert counts["written"] == len(open_dataset(tmp_path / "o")) == 36 - counts["filtered"]


def test_demo_data_is_packaged_small_and_split_by_system():
    size = sum(f.stat().st_size for f in DEMO_DIR.rglob("*") if f.is_file())
    assert size < 3.2e6
    splits = {k: demo_dataset(k) for k in ("train", "val", "test")}
    assert len(splits["train"]) >= 200 and len(splits["val"]) >= 20 and len(splits["test"]) >= 20
    sids = {k: {int(s["sid"]) for s in ds} for k, ds in splits.items()}
    frames = {k: {(int(s["sid"]), int(s["fid"])) for s in ds} for k, ds in splits.items()}
    # test: whole relaxations never seen in training; val: other frames of the training relaxations
    assert not (sids["test"] & (sids["train"] | sids["val"]))
    assert sids["val"] == sids["train"] and not (frames["train"] & frames["val"])
    for name, ds in splits.items():
        e = np.array([float(s["energy"]) for s in ds])
        if name != "val":  # the relaxed frame of each system is its zero (val holds other frames)
            assert e.min() == pytest.approx(0.0, abs=1e-9)
        assert (e >= -0.05).all() and e.max() < 50
        assert ds.natoms is not None and max(float(s["forces"].norm(dim=-1).max()) for s in ds) <= 50.0


def test_demo_rebuild_is_reproducible(tmp_path, shared_dir):
    from dens.data.demo import build_demo

    counts = build_demo(shared_dir / "data" / "oc20" / "oc20_dft_relax_20sys.npz", tmp_path)
    for split, n in counts.items():
        new, shipped = LmdbDataset(tmp_path / split), demo_dataset(split)
        assert len(new) == n == len(shipped)
        for i in (0, n - 1):
            assert torch.equal(new[i]["pos"], shipped[i]["pos"]) and float(new[i]["energy"]) == float(
                shipped[i]["energy"]
            )


@pytest.mark.parametrize("compressed", [False, True])
def test_convert_oc20_s2ef_tarball_layout_applies_reference_energies(tmp_path, compressed):
    import lzma

    import ase.io
    from ase.build import fcc111
    from ase.calculators.singlepoint import SinglePointCalculator

    from dens.data import open_dataset
    from dens.data.convert import convert

    frames = []
    for k in range(3):
        atoms = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
        atoms.info.clear()  # fcc111 stores a dict that extxyz cannot write
        atoms.positions[0, 2] += 0.01 * k
        atoms.calc = SinglePointCalculator(atoms, energy=-10.0 - k, forces=np.full((len(atoms), 3), 0.1 * k))
        frames.append(atoms)
    xyz = tmp_path / "42.extxyz"
    ase.io.write(xyz, frames, format="extxyz")
    if compressed:
        xz = tmp_path / "42.extxyz.xz"
        xz.write_bytes(lzma.compress(xyz.read_bytes()))
        xyz.unlink()
        xyz = xz
    (tmp_path / "42.txt").write_text("random777,frame3,-7.5\nrandom777,frame4,-7.0\nrandom777,frame9,-6.0\n")

    with pytest.raises(ValueError, match="--ref-energy"):
        convert([xyz], tmp_path / "none")
    convert([xyz], tmp_path / "ads", ref_energy=True)
    convert([xyz], tmp_path / "total", ref_energy=False)
    ads, total = open_dataset(tmp_path / "ads"), open_dataset(tmp_path / "total")
    assert [float(ads[i]["energy"]) for i in range(3)] == pytest.approx([-2.5, -4.0, -6.0])
    assert [float(total[i]["energy"]) for i in range(3)] == pytest.approx([-10.0, -11.0, -12.0])
    assert [(int(ads[i]["sid"]), int(ads[i]["fid"])) for i in range(3)] == [(777, 3), (777, 4), (777, 9)]

    (tmp_path / "42.txt").write_text("random777,frame3,-7.5\n")
    with pytest.raises(ValueError, match="3 frames but 1 lines"):
        convert([xyz], tmp_path / "bad", ref_energy=True)
