"""Batch and collate."""

from __future__ import annotations

import pytest
import torch

from dens.data import Batch, collate, make_structure, open_dataset, radius_graph_pbc


def _mol(n, e=None, sid=None, graph=False):
    s = make_structure(
        torch.rand(n, 3, generator=torch.Generator().manual_seed(n)),
        [1] * n,
        energy=e,
        forces=torch.zeros(n, 3) if e is not None else None,
        sid=sid,
        fid=0,
    )
    if graph:
        ei, off = radius_graph_pbc(s["pos"], None, None, None, 5.0)
        s["edge_index"], s["cell_offsets"] = ei, off
    return s


def test_collate_concatenates_and_offsets_graphs():
    items = [_mol(2, -1.0, 7, graph=True), _mol(3, -2.0, 8, graph=True)]
    b = collate(items)
    assert isinstance(b, Batch) and b.num_graphs == 2 and b.num_atoms == 5
    assert b.batch.tolist() == [0, 0, 1, 1, 1] and b.natoms.tolist() == [2, 3]
    assert b.cell.shape == (2, 3, 3) and b.pbc.shape == (2, 3) and b.pbc.dtype == torch.bool
    assert b.energy.dtype == torch.float64 and b.energy.tolist() == [-1.0, -2.0]
    assert b.forces.shape == (5, 3) and b.sid.tolist() == [7, 8]
    assert b.tags.dtype == torch.long and b.fixed.dtype == torch.bool
    assert b.edge_index.shape == (2, 2 + 6)
    assert b.edge_index[:, 2:].min() >= 2  # second structure offset by 2 atoms
    ei, _ = radius_graph_pbc(b.pos, b.cell, b.pbc, b.batch, 5.0)
    assert torch.equal(ei, b.edge_index)
    assert b.structure(1)["pos"].shape == (3, 3)


def test_collate_without_labels_or_graph():
    b = collate([_mol(2, graph=True), _mol(3)])
    assert b.energy is None and b.forces is None and b.edge_index is None and b.cell_offsets is None
    # a label that only some structures carry is an error, never dropped for the whole batch (issue 18)
    with pytest.raises(ValueError, match=r"item 1 .* no energy label"):
        collate([_mol(2, -1.0, graph=True), _mol(3)])


def test_string_ids_stay_a_list_and_to_device():
    b = collate([_mol(1, sid="random1"), _mol(2, sid="random2")])
    assert b.sid == ["random1", "random2"]
    c = b.to("cpu")
    assert c is not b and torch.equal(c.pos, b.pos)


def test_collate_real_lmdb_and_extras(shared_dir):
    ds = open_dataset(shared_dir / "data" / "oc22" / "oc22_s2ef_train16.lmdb")
    b = collate([ds[i] for i in range(3)])
    assert b.natoms.sum() == b.pos.shape[0] == b.forces.shape[0]
    s = make_structure(torch.zeros(2, 3), [1, 1], pos_relaxed=torch.ones(2, 3), energy_relaxed=1.5)
    e = collate([s, s]).extra
    assert e["pos_relaxed"].shape == (4, 3) and e["energy_relaxed"].tolist() == [1.5, 1.5]


def test_empty_collate_is_an_error():
    with pytest.raises(ValueError):
        collate([])


def test_extra_entries_are_joined_by_their_declared_kind(monkeypatch):
    import dens.data.batch as batch_module

    monkeypatch.setattr(batch_module, "FIELD_KINDS", dict(batch_module.FIELD_KINDS))
    water = make_structure(torch.zeros(3, 3), [8, 1, 1], stress=torch.ones(1, 3, 3), vec=[0.0, 0.0, 1.0])
    h2 = make_structure(torch.zeros(2, 3), [1, 1], stress=torch.ones(1, 3, 3), vec=[1.0, 0.0, 0.0])
    # a per-structure 3-vector of a 3-atom molecule has a row per atom: undeclared, it is refused
    with pytest.raises(ValueError, match=r"'vec' has one row per atom.*register_field\('vec'"):
        collate([water])
    assert collate([water, h2]).extra["vec"].shape == (2, 3)  # cannot be per-atom: stacked
    batch_module.register_field("vec", "structure")
    assert collate([water]).extra["vec"].tolist() == [[0.0, 0.0, 1.0]]
    assert collate([water, water]).extra["vec"].shape == (2, 3)
    # known keys: stress per structure whatever the atom count, pos_relaxed per atom
    single = make_structure(torch.zeros(1, 3), [1], stress=torch.ones(1, 3, 3), pos_relaxed=torch.ones(1, 3))
    e = collate([single, single]).extra
    assert e["stress"].shape == (2, 1, 3, 3) and e["pos_relaxed"].shape == (2, 3)
    batch_module.register_field("charge", "atom")
    charged = make_structure(torch.zeros(3, 3), [8, 1, 1], charge=[-0.8, 0.4, 0.4])
    assert collate([charged, charged]).extra["charge"].shape == (6,)
    graph = dict(_mol(2, graph=True), bond_order=torch.ones(2))
    batch_module.register_field("bond_order", "edge")
    assert collate([graph, graph]).extra["bond_order"].shape == (4,)
    assert collate([dict(_mol(1), tag=torch.tensor(3))] * 2).extra["tag"].tolist() == [3, 3]  # scalars
    with pytest.raises(ValueError, match="already declared as 'structure'"):
        batch_module.register_field("vec", "atom")
    with pytest.raises(ValueError, match="standard structure key"):
        batch_module.register_field("forces", "structure")
    with pytest.raises(ValueError, match="kind must be one of"):
        batch_module.register_field("x", "node")
