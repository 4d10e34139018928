"""Readers on the real samples in ../shared/data: every format, both PyG layouts, units, errors."""

from __future__ import annotations

import pickle

import ase.units
import lmdb
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dens.data import (
    AseLmdbDataset,
    CorruptEntryError,
    LmdbDataset,
    MD17Dataset,
    collate,
    md17_splits,
    open_dataset,
    read_md17_npz,
    structure_to_atoms,
    write_aselmdb,
    write_lmdb,
)
from dens.data.lmdb import open_lmdb_env

KCAL = ase.units.kcal / ase.units.mol  # eV per kcal/mol (0.0433641)


@pytest.fixture(scope="module")
def data_dir(shared_dir):
    return shared_dir / "data"


@pytest.fixture(scope="module")
def relax_npz(data_dir):
    with np.load(data_dir / "oc20" / "oc20_dft_relax_20sys.npz") as f:
        return {k: f[k] for k in f.files}


def _same(a, b, atol=1e-6):
    for key in ("pos", "cell", "forces"):
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=atol, rtol=0)
    for key in ("atomic_numbers", "tags", "fixed", "pbc"):
        assert torch.equal(a[key], b[key]), key
    assert float(a["energy"]) == pytest.approx(float(b["energy"]), abs=1e-6)


def test_oc20_old_pyg_lmdb_matches_the_source_trajectories(data_dir, relax_npz):
    ds = open_dataset(data_dir / "oc20" / "oc20_s2ef_sample_old_pyg.lmdb")
    assert len(ds) == 240
    d = relax_npz
    sids = [int(s.removeprefix("random")) for s in d["sid"]]
    atom_off = np.concatenate([[0], np.cumsum(d["natoms"])])
    rows = np.concatenate([[0], np.cumsum(d["natoms"][d["frame_system"]])])
    for idx in (0, 17, 123, 239):
        s = ds[idx]
        sys = sids.index(s["sid"])
        frame = np.nonzero((d["frame_system"] == sys) & (d["frame_index"] == s["fid"]))[0][0]
        n = d["natoms"][sys]
        assert s["pos"].shape == (n, 3) and s["pos"].dtype == torch.float32
        np.testing.assert_allclose(s["pos"].numpy(), d["positions"][rows[frame] : rows[frame + 1]], atol=1e-6)
        np.testing.assert_allclose(s["forces"].numpy(), d["forces"][rows[frame] : rows[frame + 1]], atol=1e-6)
        assert s["atomic_numbers"].tolist() == d["atomic_numbers"][atom_off[sys] : atom_off[sys + 1]].tolist()
        assert s["fixed"].tolist() == d["fixed"][atom_off[sys] : atom_off[sys + 1]].tolist()
        assert float(s["energy"]) == pytest.approx(d["energy"][frame], abs=1e-8)  # y = total energy here
        assert s["cell"].shape == (1, 3, 3) and s["pbc"].all()


def test_oc22_new_pyg_lmdb_pickle_and_extxyz_agree(data_dir):
    lm = open_dataset(data_dir / "oc22" / "oc22_s2ef_train16.lmdb")
    pk = open_dataset(data_dir / "oc22" / "oc22_pickle16_train.pkl")
    xyz = open_dataset(data_dir / "oc22" / "oc22_s2ef_32frames.extxyz")
    assert len(lm) == len(pk) == 16 and len(xyz) == 32
    by_id = {(int(s["sid"]), int(s["fid"])): s for s in xyz}
    for i in range(16):
        a, b = lm[i], pk[i]
        _same(a, b, atol=0)
        assert (a["sid"], a["fid"]) == (b["sid"], b["fid"])
        _same(a, by_id[(a["sid"], a["fid"])], atol=1e-5)


def test_ase_traj_and_json(data_dir, relax_npz):
    traj = open_dataset(data_dir / "oc20" / "random1000156.traj")
    d = relax_npz
    sys = list(d["sid"]).index("random1000156")
    frames = np.nonzero(d["frame_system"] == sys)[0]
    assert len(traj) == len(frames)
    np.testing.assert_allclose([float(s["energy"]) for s in traj], d["energy"][frames], atol=1e-6)
    assert traj[0]["fixed"].sum() > 0  # FixAtoms constraint
    js = open_dataset(data_dir / "oc20" / "fairchem_test_atoms.json")
    s = js[0]
    assert s["pos"].shape == (34, 3) and float(s["energy"]) == pytest.approx(-135.66393572)
    assert int(s["fixed"].sum()) == 24


def test_extxyz_move_mask_and_tags(data_dir):
    ds = open_dataset(data_dir / "oc20" / "fairchem_toy_c3h8_relax_EMT.extxyz")
    s = ds[0]
    assert len(ds) == 101 and s["pos"].shape == (38, 3)
    assert int(s["fixed"].sum()) == 18 and set(s["tags"].tolist()) <= {0, 1, 2}


@pytest.mark.parametrize(
    ("name", "unit", "expected_ev"),
    [
        ("md17_ethanol_2000_kcal.xyz", "kcal/mol", -97195.01189948035 * KCAL),
        ("rmd17_ethanol_reduced_100_kcal.xyz", "kcal/mol", -97079.92222178938 * KCAL),
        ("rmd17_ethanol_train0_1000_eV.xyz", "eV", -4209.784941392146),
        ("rmd17_aspirin_1000_meV.xyz", "meV", -17617.710229506634),
    ],
)
def test_md17_extxyz_units(data_dir, name, unit, expected_ev):
    ds = MD17Dataset(data_dir / "md17" / name, energy_unit=unit)
    s = ds[0]
    assert float(s["energy"]) == pytest.approx(expected_ev, rel=1e-7)
    assert s["energy"].dtype == torch.float64
    assert not s["pbc"].any() and not s["cell"].any()


def test_md17_kcal_and_ev_files_agree_on_scale(data_dir):
    """The same molecule stored in kcal/mol and eV lands on the same energy scale after conversion."""
    kcal = MD17Dataset(data_dir / "md17" / "rmd17_ethanol_reduced_100_kcal.xyz")
    ev = MD17Dataset(data_dir / "md17" / "rmd17_ethanol_train0_1000_eV.xyz", energy_unit="eV")
    ek = np.array([float(s["energy"]) for s in kcal])
    ee = np.array([float(s["energy"]) for s in ev])
    assert abs(ek.mean() - ee.mean()) < 0.5  # eV; both around -4209.8
    fk = torch.cat([s["forces"] for s in kcal]).abs().mean()
    fe = torch.cat([s["forces"] for s in ev]).abs().mean()
    assert 0.5 < float(fk / fe) < 2.0


@pytest.mark.parametrize("layout", ["md17", "rmd17"])
def test_md17_npz_both_layouts(tmp_path, data_dir, layout):
    frames = MD17Dataset(data_dir / "md17" / "rmd17_ethanol_reduced_100_kcal.xyz")  # eV after reading
    R = np.stack([s["pos"].double().numpy() for s in frames])
    E = np.array([float(s["energy"]) for s in frames]) / KCAL
    F = np.stack([s["forces"].double().numpy() for s in frames]) / KCAL
    z = frames[0]["atomic_numbers"].numpy()
    path = tmp_path / f"{layout}.npz"
    if layout == "md17":
        np.savez(path, R=R, z=z, E=E[:, None], F=F)
    else:
        np.savez(path, coords=R, nuclear_charges=z, energies=E, forces=F)
    ds = open_dataset(path)
    assert len(ds) == 100
    assert float(ds[5]["energy"]) == pytest.approx(float(frames[5]["energy"]), rel=1e-9)
    torch.testing.assert_close(ds[5]["forces"], frames[5]["forces"], atol=1e-5, rtol=1e-5)


def test_md17_split_is_seeded_and_recorded(tmp_path, data_dir):
    ds = MD17Dataset(data_dir / "md17" / "md17_ethanol_2000_kcal.xyz")
    split = md17_splits(ds, record=tmp_path / "splits.npz")
    assert [len(split[k]) for k in ("train", "val", "test")] == [950, 50, 1000]
    perm = np.random.default_rng(1).permutation(2000)
    assert split["train"].indices.tolist() == perm[:950].tolist()
    assert split["val"].indices.tolist() == perm[950:1000].tolist()
    saved = np.load(tmp_path / "splits.npz")
    assert saved["test"].tolist() == perm[1000:].tolist() and int(saved["seed"]) == 1
    all_idx = np.concatenate([split[k].indices for k in ("train", "val", "test")])
    assert sorted(all_idx.tolist()) == list(range(2000))


def test_aselmdb_round_trip(tmp_path, data_dir):
    src = open_dataset(data_dir / "oc22" / "oc22_s2ef_32frames.extxyz")
    path = tmp_path / "oc22.aselmdb"
    assert write_aselmdb((structure_to_atoms(src[i]) for i in range(6)), path) == 6
    ds = open_dataset(path)
    assert isinstance(ds, AseLmdbDataset) and len(ds) == 6
    for i in range(6):
        _same(ds[i], src[i], atol=1e-6)
        assert (ds[i]["sid"], ds[i]["fid"]) == (src[i]["sid"], src[i]["fid"])
    # a folder of .aselmdb files is one data set
    assert len(open_dataset(tmp_path)) == 6


def test_lmdb_write_read_round_trip_sharded(tmp_path, data_dir):
    src = open_dataset(data_dir / "oc20" / "oc20_s2ef_sample_old_pyg.lmdb")
    items = [src[i] for i in range(10)]
    natoms = write_lmdb(items, tmp_path / "out", num_shards=3)
    ds = LmdbDataset(tmp_path / "out")
    assert len(ds.files) == 3 and len(ds) == 10
    assert ds.natoms.tolist() == natoms.tolist() == [int(ds[i]["pos"].shape[0]) for i in range(10)]
    # round-robin: shard k holds items k, k+3, ...
    order = [k for shard in range(3) for k in range(shard, 10, 3)]
    for i, k in enumerate(order):
        _same(ds[i], items[k], atol=0)
        assert ds[i]["sid"] == items[k]["sid"]
    # the written records are PyG 1.x Data pickles with OC20 field names
    with open_lmdb_env(ds.files[0]).begin() as txn:  # the shared handle (lmdb >= 2: one per process)
        blob = txn.get(b"0")
        assert pickle.loads(txn.get(b"length")) == 4
    assert b"torch_geometric.data.data" in blob and b"Data" in blob


def test_lmdb_dataloader_with_two_workers(tmp_path, data_dir):
    """lmdb >= 2 refuses a second open in one process: environments are shared and reopened per worker."""
    path = data_dir / "oc22" / "oc22_s2ef_train16.lmdb"
    ds = LmdbDataset(path)
    _ = ds[0]  # open in the parent before the workers fork
    ds_again = open_dataset(path)  # a second dataset on the same file in this process
    assert ds_again[1]["sid"] == ds[1]["sid"]
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert sum(b.num_graphs for b in batches) == 16
    sids = torch.cat([b.sid for b in batches]).tolist()
    assert sids == [int(ds[i]["sid"]) for i in range(16)]


def test_missing_paths_say_what_and_how(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no dataset at .*download"):
        open_dataset(tmp_path / "nope.lmdb")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no '\*\.lmdb'"):
        open_dataset(tmp_path / "empty")


def _corrupt_copy(tmp_path, data_dir):
    src = open_dataset(data_dir / "oc22" / "oc22_s2ef_train16.lmdb")
    write_lmdb([src[i] for i in range(4)], tmp_path / "c")
    path = tmp_path / "c" / "data.0000.lmdb"
    env = lmdb.open(str(path), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        blob = txn.get(b"2")
        txn.put(b"2", blob[: len(blob) // 2])  # truncated record
    env.close()
    return path


def test_corrupt_entry_names_file_and_index(tmp_path, data_dir):
    path = _corrupt_copy(tmp_path, data_dir)
    ds = open_dataset(path)
    with pytest.raises(CorruptEntryError, match=r"data\.0000\.lmdb, entry 2"):
        ds[2]
    skipping = open_dataset(path, on_error="skip")
    items = [skipping[i] for i in range(4)]
    assert items[2] is None and skipping.num_skipped == 1
    assert collate(items).num_graphs == 3


def test_invalid_structures_are_errors(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(
        path,
        R=np.zeros((2, 3, 3)),
        z=np.array([1, 1, 8]),
        E=np.array([[1.0], [np.nan]]),
        F=np.zeros((2, 3, 3)),
    )
    with pytest.raises(ValueError, match="frame 1: energy is not finite"):
        read_md17_npz(path)
    np.savez(path, R=np.zeros((2, 3, 3)), z=np.array([1, 1]), E=np.ones((2, 1)), F=np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="'z' has 2 entries"):
        read_md17_npz(path)
    np.savez(path, R=np.zeros((2, 3, 3)), z=np.array([1, 1, 8]), E=np.ones((3, 1)), F=np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="mismatched array lengths"):
        read_md17_npz(path)
    np.savez(path, foo=np.zeros(3))
    with pytest.raises(ValueError, match="not an MD17 file"):
        read_md17_npz(path)
    with pytest.raises(ValueError, match="unknown energy unit 'kcal'"):
        open_dataset(tmp_path / "bad.npz", energy_unit="kcal")
    # NaN forces and zero-atom structures inside an LMDB
    from dens.data import make_structure

    nan_forces = make_structure(
        torch.zeros(2, 3), [1, 1], energy=0.0, forces=torch.full((2, 3), float("nan"))
    )
    write_lmdb([nan_forces], tmp_path / "nan")
    with pytest.raises(ValueError, match=r"entry 0: forces contain NaN"):
        open_dataset(tmp_path / "nan")[0]
    empty = make_structure(torch.zeros(0, 3), [], energy=0.0)
    write_lmdb([empty], tmp_path / "empty")
    with pytest.raises(ValueError, match="zero atoms"):
        open_dataset(tmp_path / "empty")[0]


def test_max_force_filter_counts(data_dir):
    ds = open_dataset(data_dir / "oc20" / "fairchem_toy_c3h8_relax_EMT.extxyz", max_force=0.5)
    fmax = [
        float(s["forces"].norm(dim=-1).max())
        for s in open_dataset(data_dir / "oc20" / "fairchem_toy_c3h8_relax_EMT.extxyz")
    ]
    assert ds.num_filtered == sum(f > 0.5 for f in fmax) > 0
    assert len(ds) == 101 - ds.num_filtered
    assert all(float(s["forces"].norm(dim=-1).max()) <= 0.5 for s in ds)


def test_energy_key_and_unknown_options(data_dir):
    path = data_dir / "oc20" / "oc20_s2ef_sample_old_pyg.lmdb"
    with pytest.raises(ValueError, match="energy field 'y_relaxed' absent"):
        open_dataset(path, energy_key="y_relaxed")[0]
    with pytest.raises(TypeError, match="energy_unit"):
        open_dataset(path, energy_unit="eV")
