"""Test helpers shipped with the library: random rotations, equivariance checks, and the objective
fixtures (one official DeNS training step reproduced by dens's training step).

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

__all__ = ["assert_equivariant", "compose_experiment", "random_rotation", "rotate", "run_objective_fixture"]

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
    from .models._official_equiformer import official_to_dens_name
    from .models.equiformer import Equiformer

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
    from .models._official_equiformer import (
        EQUIFORMER_CLASSES,
        equiformer_from_official_config,
        load_official_equiformer,
    )
    from .models.convert import build_official_model, import_official_state_dict
    from .models.equiformer_v2 import EquiformerV2
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
