"""torch.compile: the backbones trace as one graph (no host-device synchronisation, which would break it)
and do not recompile when the graph size changes."""

import copy

import pytest
import torch
import torch._dynamo

from dens.data import collate, make_structure
from dens.data.graph import radius_graph_pbc
from dens.models import ESCN, Equiformer, EquiformerV2, compile_backbone
from dens.models.heads import split_head_edges


def tiny_eqv2():
    return EquiformerV2(
        num_layers=1, lmax=2, mmax=1, sphere_channels=8, attn_hidden_channels=8, num_heads=2,
        attn_alpha_channels=4, attn_value_channels=4, ffn_hidden_channels=8, edge_channels=8,
        grid_resolution=8, num_distance_basis=16, cutoff=5.0, dens_heads=True,
    )  # fmt: skip


def tiny_escn():
    return ESCN(
        num_layers=1, lmax=2, mmax=1, sphere_channels=8, hidden_channels=8, edge_channels=8,
        num_sphere_samples=16, distance_resolution=1.0, cutoff=5.0, dens_heads=True,
    )  # fmt: skip


def graphs(seed=0):
    """Batches of 2, 3 and 4 structures of different sizes (different atom and edge counts)."""
    generator = torch.Generator().manual_seed(seed)
    for sizes in ((5, 6), (7, 8, 9), (6, 5, 7, 8)):
        items = [
            make_structure(
                torch.rand(n, 3, generator=generator) * 4, torch.randint(1, 9, (n,), generator=generator)
            )
            for n in sizes
        ]
        batch = collate(items)
        edge_index, _ = radius_graph_pbc(
            batch.pos, batch.cell, batch.pbc, batch.batch, 5.0, 8, natoms=batch.natoms
        )
        mask = torch.rand(batch.num_atoms, generator=generator) < 0.5
        yield batch, edge_index, mask


@pytest.mark.parametrize("build", [tiny_eqv2, tiny_escn])
def test_backbone_compiles_to_one_graph_for_every_size(build):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = build().eval()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")
    splits = getattr(model, "splits_heads", False)
    for batch, edge_index, mask in graphs():
        args = (batch.atomic_numbers, batch.pos, batch.batch, edge_index, torch.zeros(edge_index.shape[1], 3))
        kwargs = dict(noise_mask=mask)
        if splits:
            kwargs["head_edges"] = split_head_edges(edge_index, mask)
        out, ref = compiled(*args, batch.num_graphs, **kwargs), model(*args, batch.num_graphs, **kwargs)
        for key in ("energy", "forces"):
            torch.testing.assert_close(out[key], ref[key])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_regional_compile_shares_one_graph_between_identical_blocks():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = EquiformerV2(
        num_layers=3, lmax=2, mmax=1, sphere_channels=8, attn_hidden_channels=8, num_heads=2,
        attn_alpha_channels=4, attn_value_channels=4, ffn_hidden_channels=8, edge_channels=8,
        grid_resolution=8, num_distance_basis=16, cutoff=5.0,
    ).eval()  # fmt: skip
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    compile_backbone(model, backend="eager", fullgraph=True)
    assert model.state_dict().keys() == reference.keys()
    for batch, edge_index, _ in graphs():
        args = (batch.atomic_numbers, batch.pos, batch.batch, edge_index, torch.zeros(edge_index.shape[1], 3))
        model(*args, batch.num_graphs)
    # one graph for the three Transformer blocks and one for the force head, whatever the size
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_equiformer_inference_compiles_block_by_block():
    """Equiformer's gradient forces (one backward through the compiled blocks) equal eager ones for every
    size; the first blocks share a graph and the last one (other output irreps) has its own. Training it
    compiled needs a double backward, which torch.compile does not support (the trainer refuses)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    reference = Equiformer(
        irreps_node_embedding="8x0e+4x1e+2x2e", num_layers=3, irreps_sh="1x0e+1x1e+1x2e", number_of_basis=8,
        fc_neurons=[8], irreps_feature="16x0e+8x1e+4x2e", irreps_head="4x0e+2x1e+1x2e", num_heads=2,
        irreps_mlp_mid="16x0e+8x1e+4x2e", dens_heads=True, irreps_force_encoding="1x0e+1x1e+1x2e",
    ).eval()  # fmt: skip
    model = compile_backbone(copy.deepcopy(reference), backend="aot_eager", fullgraph=True)
    for batch, edge_index, mask in graphs():
        args = (batch.atomic_numbers, batch.pos, batch.batch, edge_index, torch.zeros(edge_index.shape[1], 3))
        out = model(*args, batch.num_graphs, noise_mask=mask)
        ref = reference(*args, batch.num_graphs, noise_mask=mask)
        for key in ("energy", "forces", "noise_head"):
            torch.testing.assert_close(out[key], ref[key])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
