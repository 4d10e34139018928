"""torch.compile: the backbones trace as one graph (no host-device synchronisation, which would break it)
and do not recompile when the graph size changes."""

import copy

import pytest
import torch
import torch._dynamo

from dens.data import collate, make_structure
from dens.data.graph import radius_graph_pbc
from dens.models import ESCN, Equiformer, EquiformerV2, ForceField, compile_backbone
from dens.models.heads import split_head_edges


def tiny_eqv2(**overrides):
    return EquiformerV2(**{**dict(
        num_layers=1, lmax=2, mmax=1, sphere_channels=8, attn_hidden_channels=8, num_heads=2,
        attn_alpha_channels=4, attn_value_channels=4, ffn_hidden_channels=8, edge_channels=8,
        grid_resolution=8, num_distance_basis=16, cutoff=5.0, dens_heads=True,
    ), **overrides})  # fmt: skip


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
    size; the first blocks share a graph and the last one (other output irreps) has its own. (Training
    compiled blocks would need a double backward: see ``compile_gradient`` below.)"""
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


def tiny_equiformer(dtype=torch.float64, max_atom_type=64):
    torch.manual_seed(0)
    return Equiformer(
        irreps_node_embedding="8x0e+4x1e+2x2e", num_layers=2, irreps_sh="1x0e+1x1e+1x2e", number_of_basis=8,
        fc_neurons=[8], irreps_feature="16x0e+8x1e+4x2e", irreps_head="4x0e+2x1e+1x2e", num_heads=2,
        irreps_mlp_mid="16x0e+8x1e+4x2e", dens_heads=True, irreps_force_encoding="1x0e+1x1e+1x2e",
        max_atom_type=max_atom_type,
    ).to(dtype).train()  # fmt: skip


def dens_loss_and_grads(model, batch, edge_index, mask, dtype):
    """A DeNS-style training loss on energy, gradient forces and the noise head, and its weight gradients."""
    generator = torch.Generator().manual_seed(batch.num_atoms)
    forces = torch.randn(batch.num_atoms, 3, generator=generator, dtype=dtype)
    extra = model.force_encoder(forces, mask)
    args = (batch.atomic_numbers, batch.pos.to(dtype), batch.batch, edge_index)
    out = model(*args, torch.zeros(edge_index.shape[1], 3, dtype=dtype), batch.num_graphs, extra_embedding=extra,
                noise_mask=mask, head_edges=split_head_edges(edge_index, mask))  # fmt: skip
    loss = (
        out["energy"].square().sum() + (out["forces"] - forces).square().sum() + out["noise_head"].abs().sum()
    )
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return out, loss, grads


def test_equiformer_trains_compiled_with_the_eager_loss_and_gradients():
    """``compile_gradient``: the energy and its gradient are one compiled graph, so the forces are an output
    and a training loss on them is differentiated once. Energy, forces, noise head, the loss and the
    gradient of every weight equal eager ones (float64, 1e-10) for batches of every size, and new sizes
    do not recompile (aot_eager: the traced graphs, not inductor's kernels)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    reference = tiny_equiformer()
    model = compile_backbone(copy.deepcopy(reference), training=True, backend="aot_eager", fullgraph=True)
    assert model._compiled_gradient is not None and reference._compiled_gradient is None
    graphs_seen = None
    for count, (batch, edge_index, mask) in enumerate(graphs()):
        out, loss, grads = dens_loss_and_grads(model, batch, edge_index, mask, torch.float64)
        ref_out, ref_loss, ref_grads = dens_loss_and_grads(reference, batch, edge_index, mask, torch.float64)
        for key in ("energy", "forces", "noise_head"):
            torch.testing.assert_close(out[key], ref_out[key], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
        names = [name for name, _ in model.named_parameters()]
        for name, g, r in zip(names, grads, ref_grads, strict=True):
            assert (g is None) == (r is None), name
            if g is not None:
                torch.testing.assert_close(
                    g, r, rtol=1e-9, atol=1e-11, msg=lambda m, name=name: f"{name}: {m}"
                )
        unique = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        graphs_seen = unique if count == 0 else graphs_seen
        assert unique == graphs_seen, f"recompiled for batch {count}"
    # evaluation stays eager: the same outputs, no new graph
    model.eval(), reference.eval()
    batch, edge_index, mask = next(graphs())
    args = (batch.atomic_numbers, batch.pos.double(), batch.batch, edge_index)
    shift = torch.zeros(edge_index.shape[1], 3, dtype=torch.float64)
    torch.testing.assert_close(model(*args, shift, batch.num_graphs)["forces"],
                               reference(*args, shift, batch.num_graphs)["forces"])  # fmt: skip
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_seen
    torch._dynamo.reset()


def test_compile_for_training_refuses_a_gradient_force_backbone_it_cannot_compile():
    class Plain(torch.nn.Module):
        direct_forces = False

    with pytest.raises(ValueError, match="double backward"):
        compile_backbone(Plain(), training=True)
    # direct-force backbones compile block by block for training as for inference
    model = compile_backbone(tiny_eqv2(), training=True, backend="eager")
    assert all(block._compiled_call_impl is not None for block in model.compile_regions())


def test_trainer_compiles_a_gradient_force_model(tmp_path):
    """``trainer.compile=true`` on Equiformer (MD17-style DeNS training): the steps' losses and the weights
    after them equal an eager trainer's."""
    from dens.data import Subset
    from dens.data.demo import demo_dataset
    from dens.losses import DeNSSettings
    from dens.trainer import OptimSettings, Trainer, TrainerSettings

    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        backbone = tiny_equiformer(torch.float32, max_atom_type=90)  # the demo data has gold
        model = ForceField(
            backbone, cutoff=5.0, max_neighbors=12, energy_mean=0.65, energy_std=1.55, force_std=1.55
        )
        settings = TrainerSettings(run_dir=str(tmp_path / str(compiled)), device="cpu", max_steps=3,
                                   eval_every=1000, checkpoint_every=1000, log_every=1, progress_bar=False,
                                   tensorboard=False, deterministic=True, seed=0, compile=compiled,
                                   compile_backend="aot_eager", threads=1)  # fmt: skip
        optim = OptimSettings(batch_size=4, lr=2e-3, max_epochs=10, warmup_epochs=0.0, ema_decay=0.0)
        dens = DeNSSettings(enabled=True, prob=1.0, corrupt_ratio=0.5, sigma=0.05, coefficient=5.0)
        trainer = Trainer(model, Subset(demo_dataset("train"), list(range(8))), None, optim, dens, settings)
        trainer.fit()
        losses = [r["train/loss"] for r in trainer.history if "train/loss" in r]
        results.append((losses, torch.cat([p.detach().flatten() for p in model.parameters()])))
    assert backbone._compiled_gradient is not None and len(results[1][0]) == 3
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_narrow_gemm_layout_transposes_narrow_products_only():
    """The post-grad pass of dens's inductor compiles: products with at most 8 output columns (and more rows)
    are computed transposed, in forward and backward graphs; results and gradients equal eager ones."""
    from dens.models.gemm_layout import NarrowGemmLayout

    products = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default)
    seen = []

    class Recording(NarrowGemmLayout):
        def __call__(self, graph):
            super().__call__(graph)
            size = lambda s: s if isinstance(s, int) else s.node.hint  # noqa: E731  (symbolic: its example)
            seen.append(sorted(
                (str(n.target), *map(size, n.args[-2].meta["val"].shape[-2:]), size(n.args[-1].meta["val"].shape[-1]))
                for n in graph.nodes if n.target in products
            ))  # fmt: skip

    def f(a, b, x, w, c, v):
        return torch.bmm(a, b).sin().sum(), (x @ w).cos(), torch.addmm(c, x, w), x @ v

    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 20, 16), (7, 16, 3), (30, 88), (88, 8), (30, 8), (88, 16)]
    args = [torch.randn(s, dtype=torch.float64, generator=generator, requires_grad=True) for s in shapes]
    torch._dynamo.reset()
    # the pass runs on a cache miss only
    options = {"post_grad_custom_post_pass": Recording(), "fx_graph_cache": False}
    compiled = torch.compile(f, options=options)
    for tensor in args[0], args[1], args[2], args[4]:  # the edge or atom dimension is dynamic, channels not
        torch._dynamo.mark_dynamic(tensor, 0)
    with torch._functorch.config.patch(enable_autograd_cache=False):
        out = compiled(*args)
    ref = f(*args)
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    grads = [torch.autograd.grad(o[0] + o[1].sum() + o[2].sum() + o[3].sum(), args) for o in (out, ref)]
    for g, r in zip(*grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    forward = seen[0]
    # [7, 20, 16] @ [7, 16, 3] -> [7, 3, 16] @ [7, 16, 20]; [30, 88] @ [88, 8] -> [8, 88] @ [88, 30]
    assert ("aten.bmm.default", 3, 16, 20) in forward and ("aten.mm.default", 8, 88, 30) in forward
    assert ("aten.mm.default", 30, 88, 16) in forward  # 16 columns: unchanged
    assert all(cols > 8 or rows <= cols for graph in seen for _, rows, _, cols in graph)
    # inductor's cache key: the pass's code and threshold
    assert NarrowGemmLayout().uuid() == NarrowGemmLayout().uuid() != NarrowGemmLayout(16).uuid()
    torch._dynamo.reset()


def test_trainer_passes_compile_options_to_inductor(tmp_path, monkeypatch):
    """``trainer.compile_options`` reach ``torch.compile`` as inductor settings beside dens's graph pass; with
    another backend, which would ignore them, the trainer refuses them."""
    from dens.data import Subset
    from dens.data.demo import demo_dataset
    from dens.losses import DeNSSettings
    from dens.models.gemm_layout import NarrowGemmLayout
    from dens.models.slice_cat import PaddedSlicesAsCat
    from dens.trainer import OptimSettings, Trainer, TrainerSettings

    def build(backend):
        model = ForceField(tiny_equiformer(torch.float32, max_atom_type=90), cutoff=5.0, energy_mean=0.65)
        settings = TrainerSettings(run_dir=str(tmp_path / backend), device="cpu", progress_bar=False,
                                   tensorboard=False, compile=True, compile_backend=backend,
                                   compile_options={"cpp_wrapper": True}, threads=1)  # fmt: skip
        optim = OptimSettings(batch_size=4, lr=1e-3, max_epochs=1, warmup_epochs=0.0, ema_decay=0.0)
        return Trainer(
            model, Subset(demo_dataset("train"), list(range(4))), None, optim, DeNSSettings(), settings
        )

    seen = []
    real = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda fn, **kwargs: seen.append(kwargs) or real(fn, backend="eager")
    )
    build("inductor")
    assert seen and all(kw["options"]["cpp_wrapper"] is True for kw in seen)
    assert all(isinstance(kw["options"]["post_grad_custom_post_pass"], NarrowGemmLayout) for kw in seen)
    assert all(isinstance(kw["options"]["joint_custom_post_pass"], PaddedSlicesAsCat) for kw in seen)
    monkeypatch.setattr(torch, "compile", real)
    with pytest.raises(ValueError, match="inductor settings; backend 'aot_eager'"):
        build("aot_eager")


def test_narrow_gemm_layout_keeps_the_layout_of_views_of_the_product():
    """A view of a transposed product keeps the strides it was traced with: the backward graph, compiled
    for them, gets what it expects for every size of the dynamic dimension (the pass once returned the
    transposed layout, and the second size failed inductor's stride check)."""
    from dens.models.gemm_layout import NarrowGemmLayout

    def f(x, w, g):
        y = (x @ w).view(x.shape[0] // 5, 5, 8).transpose(1, 2)  # [n, 8, 5]: a view of a narrow product
        return ((y * g.unsqueeze(-1)) ** 2).sum() + y.sin().sum()

    torch._dynamo.reset()
    options = {"post_grad_custom_post_pass": NarrowGemmLayout(), "fx_graph_cache": False}
    compiled = torch.compile(f, dynamic=True, options=options)
    for n in (64, 32, 17):
        generator = torch.Generator().manual_seed(n)
        shapes = [(5 * n, 88), (88, 8), (n, 8)]
        args = [torch.randn(s, dtype=torch.float64, generator=generator, requires_grad=True) for s in shapes]
        with torch._functorch.config.patch(enable_autograd_cache=False):
            grads = torch.autograd.grad(compiled(*args), args)
        for g, r in zip(grads, torch.autograd.grad(f(*args), args), strict=True):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()


def _traced(fn, *shapes):
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, tracing_mode="fake")(*(torch.ones(s, dtype=torch.float64) for s in shapes))


def test_padded_slices_as_cat_rewrites_sums_that_tile_a_dimension_only():
    """The joint-graph pass: zero-padded blocks that tile a dimension, summed (in any order, with other terms),
    become one ``cat`` with the same values; gaps, overlaps, non-zero padding and strides are left alone."""
    from dens.models.slice_cat import PaddedSlicesAsCat

    def tiling(a, b, c, other):  # blocks 2:5, 0:2 and 5: (to the end), and a broadcast term
        zeros = torch.full((4, 7), 0.0, dtype=torch.float64)
        return (
            (zeros.slice_scatter(b, 1, 2, 5) + other)
            + zeros.slice_scatter(a, 1, 0, 2)
            + zeros.slice_scatter(c, 1, 5)
        )

    graph = _traced(tiling, (4, 2), (4, 3), (4, 2), (1, 7))
    assert PaddedSlicesAsCat()(graph.graph) == 1
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert "aten.cat.default" in targets and "aten.slice_scatter.default" not in targets
    assert "aten.full.default" not in targets  # the zeros went with the scatters
    graph.recompile()
    generator = torch.Generator().manual_seed(0)
    args = [
        torch.randn(s, dtype=torch.float64, generator=generator) for s in ((4, 2), (4, 3), (4, 2), (1, 7))
    ]
    assert torch.equal(graph(*args), tiling(*args))

    def padded(fill, bounds, step=1):
        def fn(a, b):
            zeros = torch.full((4, 5), fill, dtype=torch.float64)
            (s0, e0), (s1, e1) = bounds
            return zeros.slice_scatter(a, 1, s0, e0, step) + zeros.slice_scatter(b, 1, s1, e1)

        return fn

    left_alone = {
        "gap": (padded(0.0, ((0, 2), (3, 5))), (4, 2), (4, 2)),
        "overlap": (padded(0.0, ((0, 3), (2, 5))), (4, 3), (4, 3)),
        "overlap of a whole block": (padded(0.0, ((0, 5), (3, 5))), (4, 5), (4, 2)),
        "non-zero padding": (padded(1.0, ((0, 2), (2, 5))), (4, 2), (4, 3)),
        "stride": (padded(0.0, ((0, 4), (4, 5)), step=2), (4, 2), (4, 1)),
    }
    for name, (fn, *shapes) in left_alone.items():
        graph = _traced(fn, *shapes)
        assert PaddedSlicesAsCat()(graph.graph) == 0, name
    assert PaddedSlicesAsCat().uuid() == PaddedSlicesAsCat().uuid()


def test_compiled_second_order_gradients_of_concatenations_equal_eager_ones():
    """Inductor with dens's passes on the case the joint pass is for: a loss on the gradient of an energy built
    from concatenated blocks (gradient-force training). The pass rewrites the padded sums of the second-order
    gradient, and the weights' gradients equal eager ones (float64, dynamic first dimension)."""
    from dens.models.gemm_layout import inductor_options
    from dens.models.slice_cat import PaddedSlicesAsCat

    rewritten = []

    class Recording(PaddedSlicesAsCat):
        def __call__(self, graph):
            rewritten.append(super().__call__(graph))
            return rewritten[-1]

    def energy(x, w, v):
        y = torch.cat([x[:, :2] * w[:2], x[:, 2:5].sin() * w[2:5], x[:, 5:].pow(2) * w[5:]], dim=1)
        return torch.tanh(y @ v).sum()

    def forces(x, w, v):
        return torch.func.grad(energy)(x, w, v)

    # the atom dimension dynamic, the channels static (as in a model, where they are the weights' sizes)
    options = {"joint_custom_post_pass": Recording(), "fx_graph_cache": False}
    options = inductor_options({"dynamic": None, "options": options})
    torch._dynamo.reset()
    compiled = torch.compile(forces, **options)
    for n in (9, 13):
        generator = torch.Generator().manual_seed(n)
        x = torch.randn(n, 8, dtype=torch.float64, generator=generator)
        torch._dynamo.mark_dynamic(x, 0)
        w, v = (
            torch.randn(s, dtype=torch.float64, generator=generator, requires_grad=True) for s in (8, (8, 3))
        )
        with torch._functorch.config.patch(enable_autograd_cache=False):
            out = compiled(x, w, v)
            grads = torch.autograd.grad(out.pow(2).sum(), (w, v))
        ref = forces(x, w, v)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for g, r in zip(grads, torch.autograd.grad(ref.pow(2).sum(), (w, v)), strict=True):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    assert max(rewritten) >= 1  # the cat's blocks, padded in the second-order gradient
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["eqv2", "escn"])
def test_inductor_training_with_dens_passes_equals_eager_for_direct_force_models(name):
    """EquiformerV2 and eSCN compiled for training with inductor and dens's graph passes (the joint pass
    rewrites padded slice sums in their backward too): energy, forces and every weight's gradient equal eager
    ones in float64. Dropouts off: inductor draws other random numbers than eager."""
    ref = tiny_eqv2(alpha_drop=0.0, drop_path_rate=0.0) if name == "eqv2" else tiny_escn()
    torch.manual_seed(0)
    ref = ref.double().train()
    torch._dynamo.reset()
    model = compile_backbone(copy.deepcopy(ref), training=True)
    batch, edge_index, mask = next(graphs())
    args = (batch.atomic_numbers, batch.pos.double(), batch.batch, edge_index)
    args += (torch.zeros(edge_index.shape[1], 3, dtype=torch.float64), batch.num_graphs)
    results = []
    for m in (ref, model):
        out = m(*args, noise_mask=mask)
        loss = out["energy"].pow(2).sum() + out["forces"].pow(2).sum()
        weights = [p for p in m.parameters() if p.requires_grad]
        results.append((out["energy"], out["forces"], torch.autograd.grad(loss, weights, allow_unused=True)))
    for a, b in zip(results[0][:2], results[1][:2], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert sum(g is not None for g in results[0][2]) > 10
    for a, b in zip(results[0][2], results[1][2], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    torch._dynamo.reset()
