"""Test helpers shipped with the library: random rotations, equivariance checks, the backbone test
suite :class:`BackboneTests` (for dens's models and your own), and the objective fixtures (one official
DeNS training step reproduced by dens's training step).

Use them to test your own layers and models the way dens tests its own.

Examples
--------
>>> from dens.models import SO3Linear
>>> lin = SO3Linear(4, 3, lmax=2).double()
>>> x = torch.randn(5, 9, 4, dtype=torch.float64)
>>> err = assert_equivariant(lin, [x], in_kinds=[2], out_kinds=[2])
>>> err < 1e-12
True
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .models.so3 import wigner_D

__all__ = [
    "BackboneTests",
    "assert_equivariant",
    "batch_structures",
    "compose_experiment",
    "random_rotation",
    "random_structures",
    "relative_error",
    "rotate",
    "run_backbone",
    "run_objective_fixture",
]

Kind = int | str | None


def random_rotation(
    *shape: int, dtype: torch.dtype = torch.float64, generator: torch.Generator | None = None
) -> Tensor:
    """Uniformly distributed rotation matrices ``[*shape, 3, 3]`` (from random unit quaternions)."""
    q = torch.randn(*shape, 4, dtype=torch.float64, generator=generator)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2).to(dtype)


def rotate(x: Tensor, rotation: Tensor, kind: Kind) -> Tensor:
    """Apply a rotation (or improper rotation) to ``x`` according to its kind.

    Parameters
    ----------
    kind : int, 'cartesian', 'pseudo' or None
        An int ``lmax``: irreps features ``[..., (lmax+1)**2, C]`` rotated by ``D(R)`` (for an improper
        ``R`` degree ``l`` also gets the parity ``det(R)**l``, i.e. true spherical tensors);
        'cartesian': vectors ``[..., 3]`` rotated by ``R``; 'pseudo': axial vectors, ``det(R) R``;
        None: invariant.
    """
    if kind is None:
        return x
    rotation = rotation.to(x.dtype)
    det = torch.linalg.det(rotation)
    if kind == "cartesian":
        return x @ rotation.T
    if kind == "pseudo":
        return det * (x @ rotation.T)
    if isinstance(kind, int):
        proper = rotation * det  # D of the proper part; parity per degree below
        d = wigner_D(proper, kind)
        parity = torch.cat([det.pow(l).expand(2 * l + 1) for l in range(kind + 1)])
        return torch.einsum("ij,...jc->...ic", d * parity[:, None], x)
    raise ValueError(f"unknown kind {kind!r}: use an int lmax, 'cartesian', 'pseudo' or None")


def assert_equivariant(
    fn: Callable[..., Tensor | Sequence[Tensor]],
    inputs: Sequence[Tensor],
    in_kinds: Sequence[Kind],
    out_kinds: Sequence[Kind],
    rotation: Tensor | None = None,
    atol: float = 1e-9,
    rtol: float = 0.0,
) -> float:
    """Check ``fn(R x) == R fn(x)`` and return the largest error relative to the outputs' scale.

    Parameters
    ----------
    fn : callable
        Takes ``len(inputs)`` tensors, returns one tensor or a sequence of tensors.
    inputs, in_kinds : sequences
        The inputs and their kinds (see :func:`rotate`).
    out_kinds : sequence
        The kinds of the outputs.
    rotation : Tensor, optional
        A ``3 x 3`` (possibly improper) rotation; a random proper one by default.
    atol, rtol : float
        Passes when ``max |fn(Rx) - R fn(x)| <= atol + rtol * max |R fn(x)|`` for every output.

    Returns
    -------
    float
        The largest ``max |difference| / max |expected|`` over the outputs.

    Raises
    ------
    AssertionError
        Naming the output and the measured error when the check fails.
    """
    if rotation is None:
        rotation = random_rotation(dtype=inputs[0].dtype if inputs[0].is_floating_point() else torch.float64)
    as_list = lambda out: [out] if isinstance(out, Tensor) else list(out)  # noqa: E731
    expected = [rotate(o, rotation, k) for o, k in zip(as_list(fn(*inputs)), out_kinds, strict=True)]
    rotated_inputs = [rotate(x, rotation, k) for x, k in zip(inputs, in_kinds, strict=True)]
    actual = as_list(fn(*rotated_inputs))
    worst = 0.0
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        err = (a - e).abs().max().item() if a.numel() else 0.0
        scale = e.abs().max().item() if e.numel() else 0.0
        if err > atol + rtol * scale:
            raise AssertionError(f"output {i} is not equivariant: max error {err:.3e} (scale {scale:.3e})")
        worst = max(worst, err / scale if scale > 0 else err)
    return worst


# --------------------------------------------------------------------------------------------------
# Objective fixtures: one official DeNS training step, reproduced by dens's own training step
# --------------------------------------------------------------------------------------------------
def _load(obj: Any) -> Mapping[str, Any]:
    if isinstance(obj, Mapping):
        return obj
    return torch.load(obj, map_location="cpu", weights_only=False)


def compose_experiment(experiment: str, overrides: Sequence[str] = ()) -> Any:
    """The composed Hydra configuration of a shipped experiment (as ``python -m dens.train
    +experiment=NAME`` composes it, with ``overrides``)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="dens.conf", version_base=None):
        return compose("train", overrides=[f"experiment={experiment}", *overrides])


def _objective_settings(cfg: Any, fixture: Mapping[str, Any]) -> tuple[Any, Any, dict[str, float], float]:
    """The DeNS and optimiser settings of ``cfg``, checked against the fixture's official constants;
    returns them, the normaliser constants and the official sigma (float32-rounded for OC20)."""
    from omegaconf import OmegaConf

    from .losses import DeNSSettings
    from .trainer import OptimSettings

    dens = DeNSSettings.from_dict(OmegaConf.to_container(cfg.dens, resolve=True))
    optim = OptimSettings(**OmegaConf.to_container(cfg.optim, resolve=True))
    c = fixture["constants"]
    md17 = fixture["dataset"] == "md17"
    expected = {
        "optim.energy_coefficient": (optim.energy_coefficient, c["lambda_E"]),
        "optim.force_coefficient": (optim.force_coefficient, c["lambda_F"]),
        "dens.prob": (dens.prob, c["p_DeNS"]),
        "dens.corrupt_ratio": (dens.corrupt_ratio, c["r_DeNS"]),
        "dens.sigma": (dens.sigma, c["sigma"]),
        "dens.coefficient": (dens.coefficient, c["lambda_DeNS_initial"] if md17 else c["lambda_DeNS"]),
    }
    if md17:
        expected["optim.max_epochs"] = (optim.max_epochs, c["epochs"])
        expected["dens.force_encoding_scale"] = (
            dens.force_encoding_scale,
            c["force_encoding_scale_kcal_per_eV"],
        )
        normalizer = {k: c[f"{k}_eV"] for k in ("energy_mean", "energy_std", "force_std")}
        # the fixture's constants follow the official rule (unbiased std of the training energies)
        if cfg.data.normalizer != "auto_unbiased":
            raise ValueError(
                f"data.normalizer is {cfg.data.normalizer!r}; the official MD17 rule is auto_unbiased"
            )
    else:
        expected["optim.train_on_free_atoms"] = (optim.train_on_free_atoms, c["train_on_free_atoms"])
        normalizer = {k: c[k] for k in ("energy_mean", "energy_std", "force_std")}
        for key, value in normalizer.items():
            expected[f"data.normalizer.{key}"] = (float(cfg.data.normalizer[key]), value)
    wrong = [f"{k}: config {a!r}, official {b!r}" for k, (a, b) in expected.items() if not _close(a, b)]
    if wrong:
        raise ValueError("the experiment's objective is not the fixture's: " + "; ".join(wrong))
    # the official OC20 Normalizer holds sigma in float32 (normalizer.py l.37-39)
    sigma = float(c.get("sigma_as_used", c["sigma"]))
    return dens, optim, normalizer, sigma


def _close(a: Any, b: Any) -> bool:
    if isinstance(b, bool) or a is None or b is None:
        return a == b
    return abs(float(a) - float(b)) <= 1e-7 * max(abs(float(b)), 1e-30)


def _fixture_structures(fixture: Mapping[str, Any], dtype: torch.dtype) -> list[dict[str, Any]]:
    """The fixture's batch as dens structure dicts (eV, Å) with its stored graph, clean positions."""
    from .data import make_structure

    inp = fixture["inputs"]
    md17 = fixture["dataset"] == "md17"
    energy = inp["energy_eV"] if md17 else inp["energy"]
    forces = inp["forces_eV"] if md17 else inp["forces"]
    edge_index = inp["edge_index"].long()
    target_structure = inp["batch"][edge_index[1]]
    if (target_structure[1:] < target_structure[:-1]).any():
        raise ValueError("fixture edges are not grouped by structure")
    offsets = torch.cumsum(inp["natoms"], 0) - inp["natoms"]
    structures = []
    for b, (start, n) in enumerate(zip(offsets.tolist(), inp["natoms"].tolist(), strict=True)):
        atoms, edges = slice(start, start + n), target_structure == b
        cell_offsets = inp["cell_offsets"][edges] if "cell_offsets" in inp else None
        structures.append(
            make_structure(
                inp["pos_clean"][atoms],
                inp["atomic_numbers"][atoms],
                cell=None if md17 else inp["cell"][b],
                pbc=[False] * 3 if md17 else [True] * 3,
                tags=None if md17 else inp["tags"][atoms],
                fixed=None if md17 else inp["fixed"][atoms],
                energy=float(energy[b]),
                forces=forces[atoms],
                dtype=dtype,
                edge_index=edge_index[:, edges] - start,
                cell_offsets=cell_offsets,
            )
        )
    return structures


def _fixture_draws(fixture: Mapping[str, Any], sigma: float) -> Any:
    from .losses import CorruptionDraws

    d = fixture["draws"]
    if fixture["dataset"] == "md17":
        return CorruptionDraws(d["coin_uniform"], d["corrupt_uniform"], d["noise_vec"].double() / sigma)
    coin = torch.tensor([float(d["coin_uniform"])], dtype=torch.float64)
    if "mask_uniform" not in d:  # the batch coin said no: the official code drew nothing more
        return CorruptionDraws(coin)
    # the official normal draw is N(0, sigma) for all atoms (l.53-54), mask_uniform per atom (l.56-64)
    return CorruptionDraws(coin, d["mask_uniform"], d["normal_draw"].double() / sigma)


def _official_names(model: Any, official_keys: Sequence[str]) -> dict[str, str]:
    """official parameter name -> dens parameter name (the mapping the importers use)."""
    from .models.equiformer import Equiformer
    from .models.official import official_to_dens_name

    if isinstance(model, Equiformer):
        return {k: official_to_dens_name(k) for k in official_keys}
    return {k: k.replace("force_embedding.", "force_encoder.linear.", 1) for k in official_keys}


def run_objective_fixture(
    fixture: Mapping[str, Any] | str | Path,
    model_fixture: Mapping[str, Any] | str | Path,
    experiment: str,
    dtype: torch.dtype = torch.float64,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Reproduce one official DeNS training step (an objective fixture) with dens's own training step.

    The objective settings (``dens``, the loss coefficients, the normaliser rule) come from the shipped
    experiment ``experiment`` composed with ``overrides``; they are checked against the fixture's
    official constants (a mismatch raises). The model is built from ``model_fixture``'s official
    weights (dropout off, as the fixtures were recorded). A :class:`~dens.trainer.Trainer` then runs
    :meth:`~dens.trainer.Trainer.train_step` on the fixture's batch and stored graph, with:

    * the corruption made by :func:`dens.losses.corrupt` from the fixture's explicit draws (coin, mask
      uniforms, normal numbers), its corrupted positions replaced by the official ones (which the
      official pipelines round to float32), and the official sigma (float32-rounded for OC20);
    * the fixture's normaliser constants (MD17 in eV: the loss is unit-free after normalisation) and
      its position in the lambda schedule;
    * EquiformerV2's edge frames built from the fixture's ``edge_rand``;
    * no gradient clipping (the fixtures hold the gradient before any clipping).

    Returns
    -------
    dict
        ``total`` (float), ``parts`` (``energy``, ``forces``, ``noise``: the unweighted terms as the
        training step reports them) and ``grads`` (official parameter name -> gradient of the total).
    """
    import dataclasses

    fixture, model_fixture = _load(fixture), _load(model_fixture)
    if fixture.get("format") != "dens objective fixture v1":
        raise ValueError(f"not a dens objective fixture: format {fixture.get('format')!r}")
    name = model_fixture["model"]
    if name != fixture["model_fixture"]["model"]:
        raise ValueError(f"the objective fixture needs model {fixture['model_fixture']['model']}, got {name}")
    cfg = compose_experiment(experiment, overrides)
    dens, optim, normalizer, sigma = _objective_settings(cfg, fixture)
    dens = dataclasses.replace(dens, sigma=sigma)
    optim = dataclasses.replace(
        optim, clip_grad_norm=None, batch_size=int(fixture["inputs"]["natoms"].numel())
    )

    # the Trainer seeds the global RNGs: leave the caller's streams as they were
    numpy_state, python_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        with torch.random.fork_rng(devices=[]):
            return _objective_step(fixture, model_fixture, cfg, dens, optim, normalizer, sigma, dtype)
    finally:
        np.random.set_state(numpy_state)  # noqa: NPY002
        random.setstate(python_state)


def _objective_step(
    fixture: Mapping[str, Any],
    model_fixture: Mapping[str, Any],
    cfg: Any,
    dens: Any,
    optim: Any,
    normalizer: dict[str, float],
    sigma: float,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """The body of :func:`run_objective_fixture`: model, trainer, injected draws, one training step."""
    import dataclasses
    import tempfile

    from .data import collate
    from .losses import corrupt
    from .models import ForceField
    from .models.equiformer_v2 import EquiformerV2
    from .models.official import (
        EQUIFORMER_CLASSES,
        build_official_model,
        equiformer_from_official_config,
        import_official_state_dict,
        load_official_equiformer,
    )
    from .models.so3 import edge_frames_official
    from .trainer import Trainer, TrainerSettings

    name = model_fixture["model"]
    config = dict(model_fixture["config"])
    if name in EQUIFORMER_CLASSES:
        backbone = equiformer_from_official_config(config, EQUIFORMER_CLASSES[name])
        if load_official_equiformer(backbone, model_fixture["state_dict"]):
            raise ValueError("negated tensor-product paths: gradients would need their signs mapped")
    else:
        config.update(alpha_drop=0.0, drop_path_rate=0.0)  # the fixtures' runs: dropout off
        backbone = build_official_model(name, config)
        import_official_state_dict(backbone, model_fixture["state_dict"])
    backbone = backbone.to(dtype)
    model = ForceField(backbone, cutoff=float(cfg.model.cutoff), **normalizer)  # float64 constants
    structures = _fixture_structures(fixture, dtype)
    with tempfile.TemporaryDirectory() as run_dir:
        settings = TrainerSettings(
            run_dir=run_dir, device="cpu", tensorboard=False, progress_bar=False,
            retain_freed_memory=False, seed=int(cfg.trainer.seed),
        )  # fmt: skip
        trainer = Trainer(model, structures, None, optim, dens, settings)
    c = fixture["constants"]
    if dens.schedule_unit == "epoch":
        trainer.epoch = int(c.get("epoch", 0))
    trainer.step = round(float(c.get("progress", 0.0)) * trainer.schedule_steps)
    batch = collate(structures)
    corruption = corrupt(batch, dens, draws=_fixture_draws(fixture, sigma))
    official_pos = fixture["inputs"]["pos"].to(dtype)
    if not torch.allclose(corruption.pos, official_pos, rtol=0.0, atol=1e-5):
        raise AssertionError(
            "dens's corrupted positions differ from the official ones beyond float32 rounding"
        )
    mask = fixture["draws"].get("noise_mask", torch.zeros(batch.num_atoms, dtype=torch.bool))
    if not torch.equal(corruption.head_mask, mask.bool()):
        raise AssertionError("dens's corruption mask is not the official one for this draw")
    corruption = dataclasses.replace(corruption, pos=official_pos)
    hook = None
    if isinstance(backbone, EquiformerV2):
        helper = fixture["edge_frames"]["edge_rand"].to(dtype) - 0.5

        def frames(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            # the official edge frames use torch.rand_like helpers (edge_rot_mat.py l.20): use the
            # recorded ones; args: atomic_numbers, pos, batch, edge_index, edge_shift, ...
            pos, edge_index, shift = args[1], args[3], args[4]
            edge_vec = pos[edge_index[0]] + shift - pos[edge_index[1]]
            return args, {**kwargs, "edge_frames": edge_frames_official(edge_vec, helper)}

        hook = backbone.register_forward_pre_hook(frames, with_kwargs=True)
    try:
        stats = trainer.train_step([batch], corruptions=[corruption])
    finally:
        if hook is not None:
            hook.remove()
    params = dict(model.backbone.named_parameters())
    names = _official_names(backbone, list(fixture["grads"]["float64"]))
    grads = {}
    for official, own in names.items():
        grad = params[own].grad
        grads[official] = torch.zeros_like(params[own]) if grad is None else grad.detach().clone()
    parts = {k: stats[k] for k in ("energy", "forces", "noise") if k in stats}
    return {"total": stats["loss"], "parts": parts, "grads": grads}


# --------------------------------------------------------------------------------------------------
# The backbone test suite: the properties every dens backbone has, for any model
# --------------------------------------------------------------------------------------------------
Structure = dict[str, Tensor]


def random_structures(
    sizes: Sequence[int] = (8, 12, 10),
    seed: int = 0,
    cutoff: float = 5.0,
    box: float = 4.5,
    min_distance: float = 0.8,
    dtype: torch.dtype = torch.float64,
) -> list[Structure]:
    """Random non-periodic clusters for the :class:`BackboneTests`: one dict per structure.

    Every structure has ``z [n]`` (atomic numbers 1-29), ``pos [n, 3]`` (uniform in a ``box`` Å cube, no
    two atoms closer than ``min_distance``), ``edge_index [2, E]`` (every ordered pair closer than
    ``cutoff``, source row first) and ``shift [E, 3]`` (zeros).
    """
    generator = torch.Generator().manual_seed(seed)
    structures = []
    for n in sizes:
        while True:
            pos = torch.rand(n, 3, generator=generator, dtype=torch.float64) * box
            dist = torch.cdist(pos, pos) + 2 * box * torch.eye(n, dtype=torch.float64)
            if n < 2 or dist.min() > min_distance:
                break
        z = torch.randint(1, 30, (n,), generator=generator)
        target, source = torch.nonzero(dist < cutoff, as_tuple=True)
        edge_index = torch.stack([source, target])
        shift = torch.zeros(edge_index.shape[1], 3, dtype=dtype)
        structures.append({"z": z, "pos": pos.to(dtype), "edge_index": edge_index, "shift": shift})
    return structures


def batch_structures(structures: Sequence[Structure]) -> Structure:
    """Concatenate structures (as :func:`random_structures` makes them) into one batch: the same keys
    (edge indices offset) plus ``batch [N]``; ``num_graphs`` is ``len(structures)``."""
    sizes = torch.tensor([len(s["z"]) for s in structures])
    offsets = torch.cumsum(sizes, 0) - sizes
    return {
        "z": torch.cat([s["z"] for s in structures]),
        "pos": torch.cat([s["pos"] for s in structures]),
        "edge_index": torch.cat([s["edge_index"] + o for s, o in zip(structures, offsets, strict=True)], 1),
        "shift": torch.cat([s["shift"] for s in structures]),
        "batch": torch.repeat_interleave(torch.arange(len(structures)), sizes),
    }


def run_backbone(model: torch.nn.Module, s: Structure, **kwargs: Any) -> dict[str, Tensor]:
    """``model(z, pos, batch, edge_index, shift, num_graphs, **kwargs)`` on a structure or a batch of
    them; ``kwargs`` replace the structure's own entries (e.g. ``pos=``) or go to the model."""
    s = {**s, **{k: kwargs.pop(k) for k in ("z", "pos", "edge_index", "shift", "batch") if k in kwargs}}
    batch = s.get("batch", torch.zeros(len(s["z"]), dtype=torch.long))
    num_graphs = int(batch.max()) + 1 if len(batch) else 1
    return model(s["z"], s["pos"], batch, s["edge_index"], s["shift"], num_graphs, **kwargs)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max |expected|`` (the plain maximum when ``expected`` is zero)."""
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    return err / scale if scale > 0 else err


class BackboneTests:
    """The tests every dens backbone passes, written once: subclass it in a test module.

    A backbone is a ``torch.nn.Module`` that conforms to :class:`dens.models.Backbone`: called as
    ``model(atomic_numbers, pos, batch, edge_index, edge_shift, num_graphs, extra_embedding=None,
    noise_mask=None, **kw)`` it returns a dict with ``energy [B]`` and ``forces [N, 3]`` (and, for DeNS
    models, ``noise_head [N, 3]`` and a ``force_encoder(forces, mask)`` whose output is passed as
    ``extra_embedding``). The suite checks:

    * the contract: every member declared (:func:`dens.models.check_backbone`), ``has_dens_heads``
      as ``make_model`` was asked;
    * rotations: energies (``energy``, ``node_energy``) invariant, forces and the heads
      (``forces``, ``force_head``, ``noise_head``) rotate with the structure (DeNS inputs rotated too);
    * translations and permutations of atoms and edges: exact up to rounding;
    * a batch gives what its structures give one at a time;
    * the energy is differentiable: central finite differences equal autograd's ``dE/dpos``, or, for a
      gradient-force model (``direct_forces = False``), ``-forces``;
    * graphs without edges and single atoms give finite outputs of the right shapes;
    * DeNS mode: output shapes, ``forces`` is the noise head on ``noise_mask`` atoms and unchanged
      elsewhere, a DeNS model given no encoding adds its encoder's bias only;
    * split heads (``model.splits_heads``; the trainer's ``split_heads``): the same loss and gradients;
    * ``torch.compile`` (:func:`dens.models.compile_backbone`) gives the eager outputs and does not
      recompile when the graph size changes;
    * CPU bf16 autocast (``trainer.amp=bf16``): finite outputs near float32's, in training (DeNS mode,
      split heads, backward) and in inference (the noise head on no edge).

    Subclass and implement :meth:`make_model`; override :meth:`structures`,
    :meth:`make_differentiable_model` and the tolerances (class attributes) where the model needs it.
    Tolerances are relative to the largest magnitude of the expected output.

    Examples
    --------
    In ``tests/test_my_model.py``:

    >>> from dens.testing import BackboneTests
    >>> class TestMyModel(BackboneTests):
    ...     def make_model(self, dens):
    ...         torch.manual_seed(0)
    ...         return MyModel(hidden=16, dens_heads=dens).double().eval()  # doctest: +SKIP

    ``pytest tests/test_my_model.py`` then runs every test of the suite on ``MyModel``; an
    approximately equivariant model (e.g. one that samples the sphere on a grid) sets
    ``rotation_energy_tol`` and ``rotation_forces_tol`` to its measured grid error.
    """

    #: exact symmetries (translation, permutation, batching): energies and per-atom vectors
    energy_tol: float = 1e-12
    forces_tol: float = 1e-10
    #: rotations (raise for grid-based, approximately equivariant models)
    rotation_energy_tol: float = 1e-10
    rotation_forces_tol: float = 1e-9
    rotation_node_energy_tol: float | None = None  # None: rotation_energy_tol
    num_rotations: int = 3
    #: finite differences: step and tolerance, and how many coordinates are checked (all when None)
    fd_step: float = 1e-5
    fd_tol: float = 1e-6
    fd_num_coordinates: int | None = 12
    #: torch.compile backend of the compile test ("aot_eager" for models that differentiate inside)
    compile_backend: str = "eager"
    #: split heads: at least this many parameters get a gradient (catches a head cut off the graph)
    split_heads_min_gradients: int = 1
    #: bf16 autocast against float32 (bf16 keeps 8 bits: ~0.4 % per rounding)
    amp_tol: float = 0.05

    # --------------------------------------------------------------------------- hooks to override
    def make_model(self, dens: bool) -> torch.nn.Module:
        """A small float64 model in eval mode (no dropout), with DeNS parts when ``dens``."""
        raise NotImplementedError("a BackboneTests subclass implements make_model(dens)")

    def make_differentiable_model(self) -> torch.nn.Module:
        """The model whose energy is differentiated (by default ``make_model(dens=False)``)."""
        return self.make_model(dens=False)

    def structures(self) -> list[Structure]:
        """The structures the tests run on (see :func:`random_structures`); at least two."""
        return random_structures()

    def fd_structure(self) -> Structure:
        """The structure of the finite-difference test (by default the first of :meth:`structures`)."""
        return self.structures()[0]

    # --------------------------------------------------------------------------- helpers
    def _dens_inputs(self, model: torch.nn.Module, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(seed)
        forces = torch.randn(n, 3, generator=generator, dtype=torch.float64)
        return forces, torch.rand(n, generator=generator) < 0.5

    def _encode(self, model: torch.nn.Module, forces: Tensor, mask: Tensor, dtype: torch.dtype) -> dict:
        encoder = model.force_encoder
        if encoder is None:
            return {}
        return {"extra_embedding": encoder(forces.to(dtype), mask), "noise_mask": mask}

    # --------------------------------------------------------------------------- the tests
    def test_declares_the_contract(self) -> None:
        from .models import check_backbone

        for dens in (False, True):
            model = self.make_model(dens=dens)
            check_backbone(model)
            assert model.has_dens_heads is dens, (
                f"make_model(dens={dens}) has_dens_heads={model.has_dens_heads}"
            )

    def test_rotation_equivariance(self) -> None:
        model = self.make_model(dens=True)
        s = batch_structures(self.structures())
        dtype = s["pos"].dtype
        forces, mask = self._dens_inputs(model, len(s["z"]))
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            ref = run_backbone(model, s, **self._encode(model, forces, mask, dtype))
            for _ in range(self.num_rotations):
                rot = random_rotation(generator=generator).to(dtype)
                out = run_backbone(
                    model, s, pos=s["pos"] @ rot.T, shift=s["shift"] @ rot.T,
                    **self._encode(model, forces.to(dtype) @ rot.T, mask, dtype),
                )  # fmt: skip
                node_tol = self.rotation_node_energy_tol or self.rotation_energy_tol
                for key, tol in (("energy", self.rotation_energy_tol), ("node_energy", node_tol)):
                    if key in ref:
                        err = relative_error(out[key], ref[key])
                        assert err < tol, f"{key} not invariant: {err:.2e}"
                for key in ("forces", "force_head", "noise_head"):
                    if key in ref:
                        err = relative_error(out[key], ref[key] @ rot.T)
                        assert err < self.rotation_forces_tol, f"{key} not equivariant: {err:.2e}"

    def test_translation_invariance(self) -> None:
        model = self.make_model(dens=False)
        s = batch_structures(self.structures())
        with torch.no_grad():
            ref = run_backbone(model, s)
            shift = torch.tensor([3.7, -12.0, 0.25], dtype=s["pos"].dtype)
            out = run_backbone(model, s, pos=s["pos"] + shift)
        self._assert_same(out, ref)

    def test_permutation_equivariance(self) -> None:
        model = self.make_model(dens=True)
        s = batch_structures(self.structures())
        n = len(s["z"])
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        inverse = torch.argsort(perm)  # new index of old atom i
        edge_order = torch.randperm(s["edge_index"].shape[1], generator=torch.Generator().manual_seed(1))
        permuted = {
            "z": s["z"][perm], "pos": s["pos"][perm], "batch": s["batch"][perm],
            "edge_index": inverse[s["edge_index"]][:, edge_order], "shift": s["shift"][edge_order],
        }  # fmt: skip
        forces, mask = self._dens_inputs(model, n)
        dtype = s["pos"].dtype
        with torch.no_grad():
            ref = run_backbone(model, s, **self._encode(model, forces, mask, dtype))
            out = run_backbone(model, permuted, **self._encode(model, forces[perm], mask[perm], dtype))
        self._assert_same(out, {k: v if k == "energy" else v[perm] for k, v in ref.items()})

    def test_batch_equals_single_structures(self) -> None:
        model = self.make_model(dens=True)
        structures = self.structures()
        s = batch_structures(structures)
        forces, mask = self._dens_inputs(model, len(s["z"]))
        dtype = s["pos"].dtype
        with torch.no_grad():
            both = run_backbone(model, s, **self._encode(model, forces, mask, dtype))
            singles, start = [], 0
            for one in structures:
                atoms = slice(start, start + len(one["z"]))
                singles.append(
                    run_backbone(model, one, **self._encode(model, forces[atoms], mask[atoms], dtype))
                )
                start += len(one["z"])
        self._assert_same(both, {k: torch.cat([o[k] for o in singles]) for k in both})

    def _assert_same(self, out: dict[str, Tensor], ref: dict[str, Tensor]) -> None:
        assert set(out) == set(ref), f"output keys differ: {sorted(out)} vs {sorted(ref)}"
        for key, value in ref.items():
            tol = self.energy_tol if key in ("energy", "node_energy") else self.forces_tol
            assert out[key].shape == value.shape, (
                f"{key}: shape {tuple(out[key].shape)} != {tuple(value.shape)}"
            )
            err = relative_error(out[key], value)
            assert err < tol, f"{key}: relative error {err:.2e} >= {tol:.0e}"

    def test_energy_gradient_matches_finite_differences(self) -> None:
        model = self.make_differentiable_model()
        s = self.fd_structure()
        pos = s["pos"].clone().requires_grad_(True)
        out = run_backbone(model, s, pos=pos)
        if model.direct_forces:
            (grad,) = torch.autograd.grad(out["energy"].sum(), pos)
        else:  # gradient forces: the model's forces must be -dE/dpos
            grad = -out["forces"].detach()
        coordinates = torch.randperm(pos.numel(), generator=torch.Generator().manual_seed(2))
        if self.fd_num_coordinates is not None:
            coordinates = coordinates[: self.fd_num_coordinates]
        h, numeric, expected = self.fd_step, [], []
        for c in coordinates.tolist():
            step = torch.zeros(pos.numel(), dtype=pos.dtype)
            step[c] = h
            step = step.view_as(pos)
            # a gradient-force model differentiates inside its forward: positions keep requires_grad
            plus = run_backbone(model, s, pos=(s["pos"] + step).requires_grad_(True))["energy"].sum()
            minus = run_backbone(model, s, pos=(s["pos"] - step).requires_grad_(True))["energy"].sum()
            numeric.append((plus - minus).detach() / (2 * h))
            expected.append(grad.view(-1)[c])
        err = relative_error(torch.stack(numeric), torch.stack(expected))
        assert err < self.fd_tol, f"dE/dpos differs from finite differences: {err:.2e}"

    def test_structures_without_edges(self) -> None:
        dtype = torch.float64
        isolated = {  # two atoms far apart (nothing within the cutoff), and a single atom
            "z": torch.tensor([1, 8]), "pos": torch.tensor([[0.0, 0, 0], [20.0, 0, 0]], dtype=dtype),
            "edge_index": torch.zeros(2, 0, dtype=torch.long), "shift": torch.zeros(0, 3, dtype=dtype),
        }  # fmt: skip
        single = {k: v[..., :1] if k == "z" else v for k, v in isolated.items()}
        single["pos"] = isolated["pos"][:1]
        for dens in (False, True):
            model = self.make_model(dens=dens)
            for s, n in ((isolated, 2), (single, 1)):
                with torch.no_grad():
                    out = run_backbone(model, s)
                assert out["energy"].shape == (1,) and torch.isfinite(out["energy"]).all(), (dens, n)
                assert out["forces"].shape == (n, 3) and torch.isfinite(out["forces"]).all(), (dens, n)

    def test_dens_mode_outputs(self) -> None:
        plain_model = self.make_model(dens=False)
        s = batch_structures(self.structures())
        n, dtype = len(s["z"]), s["pos"].dtype
        with torch.no_grad():
            assert "noise_head" not in run_backbone(plain_model, s), "a model without DeNS has a noise head"
            model = self.make_model(dens=True)
            assert model.force_encoder is not None, "a DeNS model has a force_encoder"
            forces, mask = self._dens_inputs(model, n)
            extra = model.force_encoder(forces.to(dtype), mask)
            assert extra.shape[0] == n
            s2ef = run_backbone(model, s)  # no encoding given: the encoder's bias only
            bias_only = run_backbone(
                model, s, extra_embedding=model.force_encoder(forces, torch.zeros_like(mask))
            )
            assert relative_error(s2ef["energy"], bias_only["energy"]) < self.energy_tol
            dens = run_backbone(model, s, extra_embedding=extra, noise_mask=mask)
            unmasked = run_backbone(model, s, extra_embedding=extra)
        assert dens["energy"].shape == (int(s["batch"].max()) + 1,)
        assert dens["forces"].shape == dens["noise_head"].shape == (n, 3)
        assert torch.equal(dens["forces"][mask], dens["noise_head"][mask])
        assert torch.equal(dens["forces"][~mask], unmasked["forces"][~mask])
        assert relative_error(dens["energy"], s2ef["energy"]) > 1e-6, "the force encoding changes nothing"

    def test_split_heads_are_exact(self) -> None:
        """Each head run only on the edges into the atoms where the DeNS loss reads it: same outputs
        there, same loss, same gradients (``ForceField(split_heads=True)``)."""
        from .models.heads import split_head_edges

        model = self.make_model(dens=True)
        if not model.splits_heads:
            import pytest

            pytest.skip("the model does not split its heads")
        s = batch_structures(self.structures())
        n = len(s["z"])
        generator = torch.Generator().manual_seed(3)
        mask = torch.rand(n, generator=generator) < 0.5
        target = torch.randn(n, 3, generator=generator, dtype=s["pos"].dtype)

        # direct forces: a force head, split too; gradient forces: -dE/dpos on every atom, only the noise
        # head is split
        force_key = "force_head" if model.direct_forces else "forces"
        if not model.direct_forces:
            model.train()  # forces with create_graph: the loss on them reaches the parameters

        def loss_and_grads(**kw: Any) -> tuple[dict, Tensor, list[Tensor]]:
            model.zero_grad()
            out = run_backbone(model, s, noise_mask=mask, **kw)
            loss = ((out[force_key] - target)[~mask] ** 2).sum() + (
                (out["noise_head"] - target)[mask] ** 2
            ).sum()
            loss.backward()
            return out, loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

        full, full_loss, full_grads = loss_and_grads()
        split, split_loss, split_grads = loss_and_grads(head_edges=split_head_edges(s["edge_index"], mask))
        close = dict(rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(split[force_key][~mask], full[force_key][~mask], **close)
        torch.testing.assert_close(split["noise_head"][mask], full["noise_head"][mask], **close)
        torch.testing.assert_close(split["forces"], full["forces"], **close)
        assert split["noise_head"][~mask].abs().max() == 0
        if model.direct_forces:
            assert split["force_head"][mask].abs().max() == 0
        torch.testing.assert_close(split_loss, full_loss, rtol=1e-12, atol=0)
        assert len(split_grads) == len(full_grads) >= self.split_heads_min_gradients
        for a, b in zip(split_grads, full_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        # no corrupted atom (inference): the force head on every edge, the noise head on none
        with torch.no_grad():
            clean = run_backbone(model, s, head_edges=split_head_edges(s["edge_index"], None))
            reference = run_backbone(model, s)
        torch.testing.assert_close(clean["forces"], reference["forces"], rtol=1e-12, atol=0)
        assert clean["noise_head"].abs().max() == 0

    def test_bf16_autocast_is_close_to_float32(self) -> None:
        """CPU bf16 autocast, as ``trainer.amp=bf16`` trains and the calculator may predict: DeNS mode with
        the heads split as in training (and a backward that reaches the weights), and inference with no
        corrupted atom (the noise head then runs on no edge); energies, forces and the weights' gradients
        finite and within :attr:`amp_tol` of float32's (eval mode otherwise: no dropout)."""
        from .models.heads import split_head_edges

        model = self.make_model(dens=True).float()
        batch = batch_structures(self.structures())
        s = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
        n = len(s["z"])
        forces, mask = self._dens_inputs(model, n, seed=5)
        train_kw: dict[str, Any] = {}
        infer_kw: dict[str, Any] = {}
        if model.splits_heads:
            train_kw["head_edges"] = split_head_edges(s["edge_index"], mask)
            infer_kw["head_edges"] = split_head_edges(s["edge_index"], None)
        if not model.direct_forces:
            model.train()  # forces with create_graph, as in training

        def run(amp: bool, training: bool) -> dict[str, Tensor]:
            kw = dict(train_kw if training else infer_kw)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                if training:  # DeNS mode: encoded forces on the corrupted atoms
                    kw.update(self._encode(model, forces, mask, torch.float32))
                return run_backbone(model, s, **kw)

        def grads() -> Tensor:
            return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

        for training in (True, False):
            outputs = []
            for amp in (True, False):
                model.zero_grad()
                out = run(amp, training)
                if training:  # a loss on both outputs reaches every weight that training reaches
                    (out["energy"].float().square().sum() + out["forces"].float().square().sum()).backward()
                    out["grads"] = grads()
                outputs.append(out)
            half, full = outputs
            for key in ("energy", "forces", "grads") if training else ("energy", "forces"):
                assert half[key].shape == full[key].shape, key
                assert torch.isfinite(half[key]).all(), f"bf16 {key} not finite"
                err = relative_error(half[key].detach(), full[key].detach())
                assert err < self.amp_tol, f"bf16 {key}: relative error {err:.3g} > {self.amp_tol}"

    def test_compiles_without_recompiles(self) -> None:
        """:func:`~dens.models.compile_backbone` gives the eager outputs, and graphs of other sizes reuse
        the compiled code (the backend is cheap: this checks tracing, not the generated kernels)."""
        import copy

        import pytest

        try:
            import torch._dynamo
        except ImportError:  # pragma: no cover - torch builds without dynamo
            pytest.skip("torch.compile is unavailable")
        if not torch._dynamo.is_dynamo_supported():
            pytest.skip("torch.compile is not supported on this platform")
        from .models import compile_backbone

        reference = self.make_model(dens=True)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model = compile_backbone(copy.deepcopy(reference), backend=self.compile_backend, fullgraph=True)
        structures = self.structures()
        if len(structures) < 3:
            pytest.skip("the compile test needs three structures")
        graphs = None
        # batches of two or more structures (dynamo specialises a size of 1) and other atom/edge counts
        for count, selection in enumerate((structures[:2], structures, structures[1:])):
            s = batch_structures(selection)
            forces, mask = self._dens_inputs(reference, len(s["z"]), seed=count)
            inputs = self._encode(reference, forces, mask, s["pos"].dtype)
            out = run_backbone(model, s, **inputs)
            ref = run_backbone(reference, s, **inputs)
            for key in ref:
                torch.testing.assert_close(out[key], ref[key], msg=lambda m, key=key: f"{key}: {m}")
            unique = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            graphs = unique if graphs is None else graphs
            assert unique == graphs, f"recompiled for batch {count}: {unique} graphs, first {graphs}"
        torch._dynamo.reset()
