"""Radius graphs: parity with the official fixtures, a brute-force reference, the neighbour rules."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dens.data import edge_vectors, num_images, radius_graph_pbc
from dens.data.graph import near_duplicates


def _load(shared_dir, name):
    path = shared_dir / "fixtures" / "official" / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return torch.load(path, weights_only=False)


# --------------------------------------------------------------------------------------------------
# official fixtures: exact edge lists
# --------------------------------------------------------------------------------------------------


def test_oc20_fixture_graph_is_reproduced_exactly(shared_dir):
    s = _load(shared_dir, "eqv2_small.pt")["inputs"]["s2ef"]
    pbc = torch.ones(s["natoms"].numel(), 3, dtype=torch.bool)
    ei, off = radius_graph_pbc(
        s["pos"], s["cell"], pbc, s["batch"], cutoff=12.0, max_neighbors=20, strict=True
    )
    assert torch.equal(ei, s["edge_index"])
    assert torch.equal(off, s["cell_offsets"])
    vec = edge_vectors(s["pos"], ei, off, s["cell"], s["batch"])
    torch.testing.assert_close(vec, s["edge_distance_vec"], rtol=0, atol=1e-12)
    # every target has exactly 20 neighbours, counted per structure as the fixture's `neighbors`
    assert torch.equal(torch.bincount(ei[1], minlength=s["pos"].shape[0]), torch.full((110,), 20))
    assert torch.equal(torch.bincount(s["batch"][ei[1]]), s["neighbors"])


def test_oc20_fixture_graph_float32_positions(shared_dir):
    """Training runs in float32: the same graph comes out (distances are evaluated in float64)."""
    s = _load(shared_dir, "eqv2_small.pt")["inputs"]["s2ef"]
    pbc = torch.ones(3, 3, dtype=torch.bool)
    ei, off = radius_graph_pbc(s["pos"].float(), s["cell"], pbc, s["batch"], 12.0, 20, True)
    assert torch.equal(ei, s["edge_index"]) and torch.equal(off, s["cell_offsets"])


def test_dens_fixture_graph_on_noisy_positions(shared_dir):
    f = _load(shared_dir, "eqv2_dens_small.pt")
    for mode, s in f["inputs"].items():
        if "cell_offsets" not in s:
            continue
        pbc = torch.ones(s["natoms"].numel(), 3, dtype=torch.bool)
        ei, off = radius_graph_pbc(s["pos"], s["cell"], pbc, s["batch"], 12.0, 20, True)
        assert torch.equal(ei, s["edge_index"]), mode
        assert torch.equal(off, s["cell_offsets"]), mode


def test_md17_fixture_graph_is_reproduced_exactly(shared_dir):
    s = _load(shared_dir, "eqv1_md17_small.pt")["inputs"]["s2ef"]
    ei, off = radius_graph_pbc(s["pos"], None, None, s["batch"], cutoff=5.0, max_neighbors=None)
    assert torch.equal(ei, s["edge_index"])
    assert not off.any()
    vec = edge_vectors(s["pos"], ei, None, None, s["batch"])
    torch.testing.assert_close(vec, s["edge_distance_vec"], rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# a brute-force reference
# --------------------------------------------------------------------------------------------------


def _reference(pos, cell, pbc, cutoff, k=None):
    """All (i, j, n, d) with 1e-4 < d <= cutoff, images searched far beyond what is needed."""
    pos = np.asarray(pos, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    ranges = []
    for ax in range(3):
        if pbc[ax]:
            spacing = abs(np.linalg.det(cell)) / np.linalg.norm(
                np.cross(cell[(ax + 1) % 3], cell[(ax + 2) % 3])
            )
            span = np.ptp(pos @ np.linalg.inv(cell), axis=0)[ax]
            m = int(np.ceil(cutoff / spacing + span)) + 1
            ranges.append(range(-m, m + 1))
        else:
            ranges.append(range(0, 1))
    out = []
    n = len(pos)
    for img in itertools.product(*ranges):
        shift = np.asarray(img, dtype=np.float64) @ cell
        for i in range(n):
            for j in range(n):
                d = np.linalg.norm(pos[j] + shift - pos[i])
                if 1e-4 < d <= cutoff:
                    out.append((i, j, img, d))
    return out


def _as_set(ei, off):
    return {(int(i), int(j), tuple(int(x) for x in o)) for j, i, o in zip(ei[0], ei[1], off, strict=True)}


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_small_and_skewed_cells(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5))
    # small, skewed cells with unwrapped coordinates: many images per axis
    cell = np.diag(rng.uniform(2.0, 4.0, 3)) + np.triu(rng.uniform(-1.5, 1.5, (3, 3)), 1)
    pbc = [True, True, bool(seed % 2)]
    pos = rng.uniform(-1.0, 2.0, (n, 3)) @ cell
    cutoff = float(rng.uniform(3.0, 6.0))
    ref = _reference(pos, cell, pbc, cutoff)
    ei, off = radius_graph_pbc(torch.tensor(pos), torch.tensor(cell)[None], torch.tensor([pbc]), None, cutoff)
    assert _as_set(ei, off) == {(i, j, img) for i, j, img, _ in ref}
    # sorted by target, source, image
    keys = [(int(i), int(j), *map(int, o)) for j, i, o in zip(ei[0], ei[1], off, strict=True)]
    assert keys == sorted(keys)
    # no duplicates
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("seed", range(4))
def test_strict_top_k_keeps_the_nearest(seed):
    rng = np.random.default_rng(100 + seed)
    n = 6
    cell = np.diag(rng.uniform(3.0, 5.0, 3)) + np.triu(rng.uniform(-1.0, 1.0, (3, 3)), 1)
    pos = rng.uniform(0, 1, (n, 3)) @ cell
    cutoff, k = 6.0, 7
    ref = _reference(pos, cell, [True] * 3, cutoff)
    ei, off = radius_graph_pbc(
        torch.tensor(pos),
        torch.tensor(cell)[None],
        torch.ones(1, 3, dtype=torch.bool),
        None,
        cutoff,
        max_neighbors=k,
        strict=True,
    )
    got = _as_set(ei, off)
    for i in range(n):
        cands = sorted([(d, j, img) for ii, j, img, d in ref if ii == i])
        expected = {(i, j, img) for _, j, img in cands[:k]}
        assert {e for e in got if e[0] == i} == expected


def test_strict_ties_are_broken_by_source_then_image():
    """A simple cubic crystal: the 6 nearest images tie exactly; keep (source, n1, n2, n3) order."""
    cell = torch.eye(3, dtype=torch.float64)[None] * 3.0
    pos = torch.zeros(1, 3, dtype=torch.float64)
    _ei, off = radius_graph_pbc(
        pos, cell, torch.ones(1, 3, dtype=torch.bool), None, 3.5, max_neighbors=4, strict=True
    )
    assert off.tolist() == [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, 0, 1]]
    # the tie-keeping variant keeps all 6 degenerate neighbours
    _, off = radius_graph_pbc(
        pos, cell, torch.ones(1, 3, dtype=torch.bool), None, 3.5, max_neighbors=4, strict=False
    )
    assert len(off) == 6


def test_non_strict_rule_is_ocps():
    """OCP: keep d² <= d²(k+1-th) + 0.01 Å², per target."""
    rng = np.random.default_rng(7)
    pos = rng.uniform(0, 6, (12, 3))
    ei, _ = radius_graph_pbc(torch.tensor(pos), None, None, None, 10.0, max_neighbors=4, strict=False)
    for i in range(len(pos)):
        d2 = np.sort(((pos - pos[i]) ** 2).sum(-1))[1:]  # drop self
        expected = int((d2 <= d2[4] + 0.01).sum()) if len(d2) > 4 else len(d2)
        assert int((ei[1] == i).sum()) == expected


def test_mixed_batch_of_crystal_slab_and_molecule():
    cell_a = torch.tensor([[3.0, 0.0, 0.0], [1.5, 2.6, 0.0], [0.0, 0.0, 3.2]], dtype=torch.float64)
    pos_a = torch.tensor([[0.0, 0.0, 0.0], [1.5, 0.87, 1.6]], dtype=torch.float64)
    pos_b = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.1], [0.0, 1.0, -0.3]], dtype=torch.float64)
    cell_b = torch.zeros(3, 3, dtype=torch.float64)
    pos = torch.cat([pos_a, pos_b])
    batch = torch.tensor([0, 0, 1, 1, 1])
    cell = torch.stack([cell_a, cell_b])
    pbc = torch.tensor([[True, True, False], [False, False, False]])
    ei, off = radius_graph_pbc(pos, cell, pbc, batch, 4.0)
    # each structure alone gives the same edges
    ea, oa = radius_graph_pbc(pos_a, cell_a[None], pbc[:1], None, 4.0)
    eb, ob = radius_graph_pbc(pos_b, None, None, None, 4.0)
    mask_a = batch[ei[1]] == 0
    assert torch.equal(ei[:, mask_a], ea) and torch.equal(off[mask_a], oa)
    assert torch.equal(ei[:, ~mask_a] - 2, eb) and torch.equal(off[~mask_a], ob)
    assert not off[:, 2].any()  # z not periodic
    assert not (batch[ei[0]] != batch[ei[1]]).any()  # no edges across structures
    # slab periodic in x, y only: references
    ref = _reference(pos_a.numpy(), cell_a.numpy(), [True, True, False], 4.0)
    assert _as_set(ea, oa) == {(i, j, img) for i, j, img, _ in ref}


@pytest.mark.parametrize("max_neighbors", [None, 3])
def test_molecule_fast_path_gives_the_general_paths_graph(max_neighbors):
    """Batches without a periodic axis skip the image search: the same edges as the periodic code path."""
    rng = np.random.default_rng(7)
    sizes = [5, 1, 9, 4]
    pos = torch.tensor(rng.uniform(0.0, 4.0, (sum(sizes), 3)))
    pos[3] = pos[2]  # a coincident pair (d < 1e-4): no edge on either path
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    ei, off = radius_graph_pbc(pos, None, None, batch, 2.5, max_neighbors=max_neighbors)
    # with a periodic crystal appended, the whole batch takes the general path
    crystal = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64) + 100.0
    cell = torch.cat([torch.zeros(len(sizes), 3, 3, dtype=torch.float64), 3.0 * torch.eye(3)[None].double()])
    pbc = torch.tensor([[False] * 3] * len(sizes) + [[True] * 3])
    ei_all, off_all = radius_graph_pbc(
        torch.cat([pos, crystal]), cell, pbc, torch.cat([batch, torch.tensor([4, 4])]), 2.5, max_neighbors
    )
    molecules = ei_all[1] < pos.shape[0]
    assert torch.equal(ei, ei_all[:, molecules]) and torch.equal(off, off_all[molecules])
    assert not off.any() and ei.shape[1] > 0
    assert not ((ei[0] == 3) & (ei[1] == 2)).any()
    for g, start in enumerate(np.cumsum([0, *sizes[:-1]])):  # every molecule against brute force
        if max_neighbors is None:
            ref = _reference(pos[batch == g].numpy(), np.zeros((3, 3)), [False] * 3, 2.5)
            mine = ei[:, batch[ei[1]] == g] - int(start)
            assert {(int(i), int(j)) for j, i in mine.T} == {(i, j) for i, j, _, _ in ref}


def test_isolated_atoms_and_empty_graph_are_allowed():
    pos = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [10.5, 0.0, 0.0]])
    ei, off = radius_graph_pbc(pos, None, None, None, 1.0, max_neighbors=20)
    assert ei.tolist() == [[2, 1], [1, 2]]
    ei, off = radius_graph_pbc(pos[:1], None, None, None, 1.0)
    assert ei.shape == (2, 0) and off.shape == (0, 3) and ei.dtype == torch.long


def test_edge_vectors_are_differentiable_and_match_distances():
    rng = np.random.default_rng(3)
    cell = torch.tensor(np.diag([4.0, 4.5, 5.0]) + np.triu(rng.uniform(-1, 1, (3, 3)), 1))
    pos = torch.tensor(rng.uniform(0, 4, (5, 3)), requires_grad=True)
    ei, off = radius_graph_pbc(pos, cell[None], torch.ones(1, 3, dtype=torch.bool), None, 5.0, 8)
    vec = edge_vectors(pos, ei, off, cell[None], torch.zeros(5, dtype=torch.long))
    assert bool((vec.norm(dim=-1) <= 5.0 + 1e-9).all())
    energy = (vec.norm(dim=-1) ** 2).sum()
    (grad,) = torch.autograd.grad(energy, pos)
    # pair energy sum |r_ij|^2 : dE/dpos_a = sum over edges 2 (r) (±1)
    expected = torch.zeros_like(pos)
    expected.index_add_(0, ei[0], 2 * vec.detach())
    expected.index_add_(0, ei[1], -2 * vec.detach())
    torch.testing.assert_close(grad, expected)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shift=st.lists(st.integers(-2, 2), min_size=3, max_size=3),
)
def test_lattice_translation_of_an_atom_keeps_the_graph(seed, shift):
    """Moving atom 0 by a lattice vector changes only its offsets; edge vectors stay the same."""
    rng = np.random.default_rng(seed)
    cell = torch.tensor(np.diag(rng.uniform(3, 5, 3)) + np.triu(rng.uniform(-1, 1, (3, 3)), 1))
    pos = torch.tensor(rng.uniform(0, 1, (4, 3))) @ cell
    pbc = torch.ones(1, 3, dtype=torch.bool)
    ei, off = radius_graph_pbc(pos, cell[None], pbc, None, 4.0)
    moved = pos.clone()
    moved[0] += torch.tensor(shift, dtype=torch.float64) @ cell
    ei2, off2 = radius_graph_pbc(moved, cell[None], pbc, None, 4.0)
    v1 = edge_vectors(pos, ei, off, cell[None], None)
    v2 = edge_vectors(moved, ei2, off2, cell[None], None)
    key1 = sorted(zip(ei[1].tolist(), ei[0].tolist(), np.round(v1.numpy(), 6).tolist(), strict=True))
    key2 = sorted(zip(ei2[1].tolist(), ei2[0].tolist(), np.round(v2.numpy(), 6).tolist(), strict=True))
    assert key1 == key2


def test_num_images():
    cell = torch.eye(3)[None] * torch.tensor([5.0, 12.0, 30.0])[None, :, None]
    assert num_images(cell, torch.tensor([[True, True, False]]), 12.0).tolist() == [[3, 1, 0]]


def test_large_cell_is_fast_and_bounded():
    """200 atoms, 12 Å, 20 neighbours: the configuration of OC20 training (time is generous for CI)."""
    rng = np.random.default_rng(0)
    cell = torch.tensor([[11.0, 0.0, 0.0], [-5.5, 9.5, 0.0], [0.0, 0.0, 30.0]])
    pos = (
        torch.tensor(rng.uniform(0, 1, (200, 3)), dtype=torch.float32) * torch.tensor([1.0, 1.0, 0.5])
    ) @ cell
    t0 = time.perf_counter()
    ei, _off = radius_graph_pbc(pos, cell[None], torch.ones(1, 3, dtype=torch.bool), None, 12.0, 20)
    assert time.perf_counter() - t0 < 20.0
    assert torch.equal(torch.bincount(ei[1], minlength=200), torch.full((200,), 20))


def test_bad_input_is_rejected():
    pos = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="sorted"):
        radius_graph_pbc(pos, None, None, torch.tensor([1, 0]), 1.0)
    with pytest.raises(ValueError, match="cutoff"):
        radius_graph_pbc(pos, None, None, None, 0.0)
    with pytest.raises(ValueError, match="backend"):
        radius_graph_pbc(pos, None, None, None, 1.0, backend="nope")


def test_torch_cluster_backend_is_identical(shared_dir):
    pytest.importorskip("torch_cluster", reason="torch-cluster is an optional backend")
    s = _load(shared_dir, "eqv1_md17_small.pt")["inputs"]["s2ef"]
    for k in (None, 8):
        a = radius_graph_pbc(s["pos"], None, None, s["batch"], 5.0, k)
        b = radius_graph_pbc(s["pos"], None, None, s["batch"], 5.0, k, backend="torch_cluster")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_graph(shared_dir):
    s = _load(shared_dir, "eqv2_small.pt")["inputs"]["s2ef"]
    pbc = torch.ones(3, 3, dtype=torch.bool)
    ei, off = radius_graph_pbc(
        s["pos"].cuda().float(), s["cell"].cuda(), pbc.cuda(), s["batch"].cuda(), 12.0, 20
    )
    assert ei.is_cuda
    assert torch.equal(ei.cpu(), s["edge_index"]) and torch.equal(off.cpu(), s["cell_offsets"])


@pytest.mark.parametrize("tolerance", [1e-4, 0.1])
def test_near_duplicates_finds_every_close_pair_in_skewed_cells(tolerance):
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(2, 30, (1,), generator=g))
        cell = (
            torch.eye(3, dtype=torch.float64) * 4 + torch.randn(3, 3, generator=g, dtype=torch.float64) * 1.5
        )
        pbc = torch.rand(3, generator=g) < 0.6
        pos = torch.rand(n, 3, generator=g, dtype=torch.float64) @ cell
        image = torch.randint(-2, 3, (3,), generator=g).double() * pbc  # atom 1 near an image of atom 0
        step = torch.randn(3, generator=g, dtype=torch.float64)
        pos[1] = pos[0] + image @ cell + step / step.norm() * tolerance * 0.999 * torch.rand(1, generator=g)
        found = near_duplicates(pos, cell, pbc, tolerance).tolist()
        assert 0 in found and 1 in found
