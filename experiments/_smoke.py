"""Smoke runs: tiny models, two steps, on the embedded demo data or a slice of the MD17 samples, on
the CPU (``--smoke``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
from _collect import EvalOptions
from _launch import experiment_config, missing_keys
from _paper import SHARED_DATA, Run
from _table_model import Table
from ase.build import molecule as build_molecule
from ase.calculators.emt import EMT

from dens.data import (
    fit_linear_reference,
    open_dataset,
)
from dens.data.demo import demo_path

# ==================================================================================================
# Smoke runs: tiny models, two steps, embedded or sample data, CPU
# ==================================================================================================
SMOKE_TRAINER = (
    "trainer.device=cpu", "trainer.max_steps=2", "trainer.eval_every=2", "trainer.checkpoint_every=2",
    "trainer.log_every=1", "trainer.progress_bar=false", "trainer.tensorboard=false", "trainer.val_max_batches=2",
    "optim.batch_size=4",
)  # fmt: skip
SMOKE_MODELS: dict[str, tuple[str, ...]] = {
    "dens.models.EquiformerV2": (
        "model.cutoff=5.0",
        "model.max_neighbors=8",
        "model.backbone.num_layers=1",
        "model.backbone.lmax=2",
        "model.backbone.mmax=1",
        "model.backbone.sphere_channels=16",
        "model.backbone.attn_hidden_channels=8",
        "model.backbone.num_heads=2",
        "model.backbone.attn_alpha_channels=8",
        "model.backbone.attn_value_channels=4",
        "model.backbone.ffn_hidden_channels=16",
        "model.backbone.edge_channels=16",
        "model.backbone.grid_resolution=8",
        "model.backbone.num_distance_basis=32",
    ),
    "dens.models.ESCN": (
        "model.cutoff=5.0",
        "model.max_neighbors=8",
        "model.backbone.num_layers=1",
        "model.backbone.lmax=2",
        "model.backbone.mmax=1",
        "model.backbone.sphere_channels=16",
        "model.backbone.hidden_channels=16",
        "model.backbone.edge_channels=16",
        "model.backbone.num_sphere_samples=16",
    ),
    "dens.models.Equiformer": (
        "model.backbone.num_layers=1",
        "model.backbone.number_of_basis=8",
        "model.backbone.fc_neurons=[8,8]",
    ),
}
_IRREPS = re.compile(r"^\d+x\d[eo](\+\d+x\d[eo])*$")


def _shrink_irreps(irreps: str, factor: int = 16) -> str:
    """``128x0e+64x1e`` -> ``8x0e+4x1e``: every multiplicity divided (at least 1)."""
    parts = [p.split("x", 1) for p in irreps.split("+")]
    return "+".join(f"{max(1, int(m) // factor)}x{ir}" for m, ir in parts)


def smoke_model_overrides(cfg: Any) -> list[str]:
    """Tiny-model overrides for a composed config (Equiformer: every irreps multiplicity / 16)."""
    backbone = cfg.model.backbone
    out = list(SMOKE_MODELS[backbone._target_])
    if backbone._target_ == "dens.models.Equiformer":
        out += [
            f"model.backbone.{k}={_shrink_irreps(v)}"
            for k, v in backbone.items()
            if isinstance(v, str) and _IRREPS.match(v)
        ]
    return out


def _demo_paths() -> dict[str, str]:
    return {split: str(demo_path(split)) for split in ("train", "val", "test")}


def _md17_sample(work: Path, molecule: str, frames: int = 120) -> tuple[str, str]:
    """A slice of the MD17 samples in ``../shared/data`` (path, energy unit), or a synthetic stand-in."""
    samples = {
        "ethanol": ("md17/md17_ethanol_2000_kcal.xyz", "kcal/mol"),
        "aspirin": ("md17/rmd17_aspirin_1000_meV.xyz", "meV"),
    }
    source, unit = samples[molecule]
    src = SHARED_DATA / source
    out = work / f"md17_{molecule}_{frames}.xyz"
    if src.is_file():
        lines, kept, i = src.read_text().splitlines(), [], 0
        for _ in range(frames):  # extended XYZ: a count line, a comment line, one line per atom
            n = int(lines[i])
            kept += lines[i : i + n + 2]
            i += n + 2
        out.write_text("\n".join(kept) + "\n")
        return str(out), unit
    print(
        f"note: {src} is absent (no ../shared/data): the MD17 smoke runs use a synthetic {molecule} "
        "trajectory (rattled geometries, ASE EMT energies and forces) instead"
    )
    rng = np.random.default_rng(0)
    frames_out = []
    for _ in range(frames):
        atoms = build_molecule("CH3CH2OH")  # ethanol stands in for every molecule
        atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
        atoms.calc = EMT()
        atoms.get_potential_energy()
        frames_out.append(atoms)
    ase.io.write(out, frames_out, format="extxyz")
    return str(out), "eV"


def _linear_reference(work: Path, train_path: str) -> str:
    """Per-element energies fitted on the demo training set: a stand-in for OC22's coefficient file."""
    path = work / "linref.npz"
    np.savez(path, coeff=fit_linear_reference(open_dataset(train_path)))
    return str(path)


def smoke_setup(
    table: Table, runs: Sequence[Run], work: Path
) -> tuple[list[Run], Callable[[Run], list[str]], EvalOptions]:
    """The runs ``--smoke`` trains (``runs`` of the table's smoke molecules), their overrides (tiny model,
    data, two steps) and the evaluation options; the data it makes go to ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    runs = [r for r in runs if r.molecule is None or r.molecule in table.smoke_molecules]
    demo = _demo_paths()
    md17 = {m: _md17_sample(work, m) for m in {r.molecule for r in runs if r.molecule}}
    linref = _linear_reference(work, demo["train"]) if any(r.dataset == "oc22" for r in runs) else None
    fill = {
        "data.val.path": demo["val"],
        "data.train.path": demo["train"],
        "data.train.0.path": demo["train"],
        "data.train.1.path": demo["test"],
        "data.options.linear_reference": linref,
    }

    def overrides(run: Run) -> list[str]:
        data: list[str] = []
        if run.molecule:
            path, unit = md17[run.molecule]
            data = [
                f"data.path={path}",
                f"data.options.energy_unit={unit}",
                "data.split.train=32",
                "data.split.val=8",
                "data.split.test=16",
            ]
        data += [f"{k}={fill[k]}" for k in missing_keys(run.experiment, data)]
        return [*SMOKE_TRAINER, *smoke_model_overrides(experiment_config(run.experiment)), *data]

    stand_in = {
        "val_id": demo["val"],
        "val_ood_ads": demo["test"],
        "val_ood_cat": demo["val"],
        "val_ood_both": demo["test"],
        "val_ood": demo["test"],
    }
    splits = {s: stand_in.get(s, demo["test"]) for s in table.eval_splits}
    return runs, overrides, EvalOptions(splits, "cpu", 8, limit=16, relax_steps=3)
