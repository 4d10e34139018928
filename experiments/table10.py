"""Table 10 of the DeNS paper: MD17 simulation metrics (stability, h(r)) of Equiformer (Lmax 2) +/- DeNS.

Protocol (§D.3, after Fu et al. 2023): for aspirin, ethanol, naphthalene and salicylic acid, the trained
Equiformer (Lmax = 2) with and without DeNS (the Table 4 models) runs NVT Nosé-Hoover MD at 500 K with
0.5 fs steps for 300 ps, from test-set structures (5 simulations per molecule and model, batched on one
device). Reported: test energy / force MAE (meV, meV/Å), stability (ps, mean over simulations) and the h(r)
MAE against the reference (test) data, on the stable part of the simulations.

Usage::

    python experiments/table10.py --dry-run                      # the runs and their estimated cost
    python experiments/table10.py --dry-run --measure            # ... timing a full-size model on --device
    python experiments/table10.py --smoke                        # tiny random models, CPU, about a minute
    python experiments/table10.py --runs-dir runs --data-dir data/md17 --device cuda --out table10.json

Checkpoints default to ``<runs-dir>/md17_<molecule>_l2{,_baseline}/checkpoints/best.pt`` (the Hydra
experiments of ``dens/conf/experiment``); override one with ``--checkpoint aspirin:dens=PATH`` (variants
``baseline`` and ``dens``). Data are the original MD17 ``.npz`` files (``md17_<molecule>.npz``), split
as for training (seed 1: 950 / 50 / rest).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dens.data import MD17_MOLECULES, MD17Dataset, md17_splits, read_ase_file
from dens.evaluate import evaluate, load_model
from dens.md import BondReference, MDSettings, hr_mae, simulate

MOLECULES = ("aspirin", "ethanol", "naphthalene", "salicylic_acid")
VARIANTS = {"baseline": "Equiformer (Lmax=2)", "dens": "Equiformer (Lmax=2) + DeNS"}
#: The paper's Table 10: (energy MAE meV, force MAE meV/Å, stability ps, h(r) MAE).
PAPER: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "baseline": {
        "aspirin": (5.3, 7.2, 300.0, 0.02),
        "ethanol": (2.2, 3.1, 289.9, 0.09),
        "naphthalene": (3.7, 2.1, 133.8, 0.12),
        "salicylic_acid": (4.5, 4.1, 300.0, 0.03),
    },
    "dens": {
        "aspirin": (5.1, 5.7, 300.0, 0.02),
        "ethanol": (2.2, 2.6, 300.0, 0.09),
        "naphthalene": (3.7, 1.7, 157.2, 0.12),
        "salicylic_acid": (4.4, 3.7, 300.0, 0.03),
    },
}
SIMULATIONS = 5
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "md17"


# --------------------------------------------------------------------------------------------------
# One (model, molecule) cell
# --------------------------------------------------------------------------------------------------
def run_cell(
    model: Any,
    test_frames: list[dict[str, Any]],
    settings: MDSettings,
    simulations: int,
    device: str,
    seed: int = 0,
    max_reference_frames: int = 20000,
    progress: bool = False,
) -> dict[str, float]:
    """Test MAEs, then ``simulations`` batched MD runs from random test structures; the Table 10 numbers."""
    rng = np.random.default_rng(seed)
    metrics = evaluate(model, test_frames, batch_size=16, device=device)
    ref_idx = np.sort(rng.permutation(len(test_frames))[: min(max_reference_frames, len(test_frames))])
    ref_pos = np.stack([test_frames[i]["pos"].double().numpy() for i in ref_idx])
    z = test_frames[0]["atomic_numbers"].numpy()
    reference = BondReference.from_frames(z, ref_pos)
    replace = simulations > len(test_frames)  # only in smoke runs with a single reference geometry
    starts = [test_frames[int(i)] for i in rng.choice(len(test_frames), simulations, replace=replace)]
    trajs = simulate(model, starts, settings, [reference] * simulations, device=device, progress=progress)
    stable = np.concatenate([t.stable_positions() for t in trajs])
    return {
        "energy_mae": metrics.get("energy_mae", math.nan),
        "forces_mae": metrics.get("forces_mae", math.nan),
        "stability": float(np.mean([t.stability for t in trajs])),
        "hr_mae": hr_mae(stable, ref_pos) if len(stable) else math.nan,
        "stable_runs": float(sum(t.stable for t in trajs)),
        "seconds": float(trajs[0].info["seconds"]),
    }


def print_table(results: dict[str, dict[str, dict[str, float]]], title: str) -> None:
    """Table 10's layout, the paper's number and ours (``paper / ours``) in every cell."""
    cols = ("energy", "forces", "stability", "h(r)")
    keys = ("energy_mae", "forces_mae", "stability", "hr_mae")
    print(title)
    print(f"{'':30}" + "".join(f"{m:^64}" for m in MOLECULES))
    print(f"{'Model':30}" + "".join(f"{c:>16}" for _ in MOLECULES for c in cols))
    for variant, label in VARIANTS.items():
        cells = []
        for mol in MOLECULES:
            ours = results.get(variant, {}).get(mol, {})
            for k, paper in zip(keys, PAPER[variant][mol], strict=True):
                v = ours.get(k)
                mine = "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"
                text = f"{paper:g} / {mine}"
                cells.append(f"{text:>16}")
        print(f"{label:30}" + "".join(cells))
    print("cells: paper / ours; energy meV, forces meV/Å, stability ps (of 300), h(r) MAE")


# --------------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------------
def dry_run(args: argparse.Namespace) -> None:
    settings = MDSettings()
    steps = settings.steps
    ms = args.ms_per_step
    if args.measure:
        ms = measure_step_time(args.device, args.simulations)
    print(f"Table 10: {len(VARIANTS)} models x {len(MOLECULES)} molecules x {args.simulations} simulations "
          f"(batched per model and molecule), NVT Nose-Hoover {settings.temperature:g} K, "
          f"{settings.timestep:g} fs x {steps:,} steps = {settings.duration:g} ps")  # fmt: skip
    total = 0.0
    for variant in VARIANTS:
        for mol in MOLECULES:
            ckpt = checkpoint_path(args, mol, variant)
            hours = steps * ms / 1000 / 3600
            total += hours
            print(f"  {variant:9} {mol:15} {args.simulations} x {steps:,} steps  ~{hours:5.1f} h  "
                  f"checkpoint {ckpt}{'' if ckpt.is_file() else ' (missing)'}")  # fmt: skip
    source = "measured" if args.measure else "assumed (--measure times it)"
    print(
        f"estimated cost: {total:.1f} device-hours at {ms:.1f} ms per batched step ({source}); upper bound, "
        "unstable simulations stop early"
    )


def measure_step_time(device: str, simulations: int) -> float:
    """Milliseconds per MD step of a full-size Equiformer (Lmax 2) + DeNS on ``simulations`` aspirins."""
    from dens.models import ForceField
    from dens.models.equiformer import Equiformer

    model = ForceField(Equiformer.from_preset("md17_l2", dens=True), cutoff=5.0, max_neighbors=None).to(
        device
    )
    start = _sgdml_structures("aspirin")[0]
    settings = MDSettings(duration=0.0025 * 3, save_every=1000)
    simulate(model, [start] * simulations, settings, device=device)  # warm-up
    t0 = time.perf_counter()
    trajs = simulate(model, [start] * simulations, MDSettings(duration=0.01, save_every=1000), device=device)
    return 1000 * (time.perf_counter() - t0) / trajs[0].steps


def checkpoint_path(args: argparse.Namespace, molecule: str, variant: str) -> Path:
    for item in args.checkpoint or []:
        key, _, path = item.partition("=")
        if key == f"{molecule}:{variant}":
            return Path(path)
    suffix = "_baseline" if variant == "baseline" else ""
    return Path(args.runs_dir) / f"md17_{molecule}_l2{suffix}" / "checkpoints" / "best.pt"


def full_run(args: argparse.Namespace) -> dict[str, Any]:
    settings = MDSettings(save_every=args.save_every, seed=args.seed)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for mol in MOLECULES:
        data = Path(args.data_dir) / MD17_MOLECULES[mol]
        test = md17_splits(MD17Dataset(data))["test"]
        frames = [test[i] for i in range(len(test))]
        for variant in VARIANTS:
            model = load_model(checkpoint_path(args, mol, variant), device=args.device)
            results.setdefault(variant, {})[mol] = run_cell(
                model,
                frames,
                settings,
                args.simulations,
                args.device,
                args.seed,
                progress=not args.no_progress,
            )
            print(f"{variant} {mol}: {results[variant][mol]}", file=sys.stderr)
    return results


def _sgdml_structures(molecule: str) -> list[dict[str, Any]]:
    name = {"salicylic_acid": "salicylic"}.get(molecule, molecule)
    return read_ase_file(SHARED / "sgdml_geometries" / f"{name}.xyz", dtype=torch.float64)


def smoke_run(args: argparse.Namespace) -> dict[str, Any]:
    """Tiny random Equiformers on the shared samples: the whole pipeline in about a minute on a CPU."""
    from dens.models import ForceField
    from dens.models.equiformer import Equiformer

    torch.set_num_threads(1)
    samples = {
        "aspirin": (SHARED / "rmd17_aspirin_1000_meV.xyz", "meV"),
        "ethanol": (SHARED / "rmd17_ethanol_train0_1000_eV.xyz", "eV"),
    }
    settings = MDSettings(duration=0.05, save_every=10, seed=args.seed)  # 100 steps of 0.5 fs
    results: dict[str, dict[str, dict[str, float]]] = {}
    for k, variant in enumerate(VARIANTS):
        torch.manual_seed(k)
        backbone = Equiformer(
            irreps_node_embedding="8x0e+4x1e+2x2e", num_layers=1, fc_neurons=[8], irreps_feature="16x0e",
            irreps_head="4x0e+2x1e+1x2e", num_heads=2, irreps_mlp_mid="8x0e+4x1e+2x2e", number_of_basis=8,
            use_force_encoding=variant == "dens",
        )  # fmt: skip
        model = ForceField(backbone, cutoff=5.0, max_neighbors=None).double().eval()
        for mol in MOLECULES:
            if mol in samples:
                path, unit = samples[mol]
                frames = read_ase_file(path, slice(0, 40), energy_unit=unit, dtype=torch.float64)
            else:  # no reference trajectory in the samples: the sGDML geometry stands in for it
                frames = _sgdml_structures(mol)
            results.setdefault(variant, {})[mol] = run_cell(model, frames, settings, 2, "cpu", args.seed,
                                                            max_reference_frames=40)  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the runs and their estimated cost")
    mode.add_argument("--smoke", action="store_true", help="tiny random models on CPU (about a minute)")
    parser.add_argument("--measure", action="store_true", help="with --dry-run: time a full-size model")
    parser.add_argument("--ms-per-step", type=float, default=60.0, help="assumed cost of one batched step")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--data-dir", default="data/md17")
    parser.add_argument("--checkpoint", action="append", help="MOLECULE:VARIANT=PATH (variant baseline|dens)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--simulations", type=int, default=SIMULATIONS)
    parser.add_argument("--save-every", type=int, default=100, help="steps between stored frames")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.dry_run:
        dry_run(args)
        return
    t0 = time.perf_counter()
    results = smoke_run(args) if args.smoke else full_run(args)
    title = "Table 10 (smoke: tiny untrained models, 50 fs; not comparable)" if args.smoke else "Table 10"
    print_table(results, title)
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
