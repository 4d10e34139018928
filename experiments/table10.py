"""Table 10 of the DeNS paper: MD17 simulation metrics (stability, h(r)) of Equiformer (Lmax 2) +/- DeNS.

Protocol (§D.3, after Fu et al. 2023): for aspirin, ethanol, naphthalene and salicylic acid, the trained
Equiformer (Lmax = 2) with and without DeNS (the Table 4 models: experiments ``md17_<molecule>_l2`` and
``md17_<molecule>_l2_baseline``, one A5000 each) runs NVT Nosé-Hoover MD at 500 K with 0.5 fs steps for
300 ps, from test-set structures (5 simulations per molecule and model, batched on one device). Reported: test
energy / force MAE (meV, meV/Å), stability (ps, mean over simulations) and the h(r) MAE against the reference
(test) data, on the stable part of the simulations.

The script trains (or resumes) the eight runs it needs like the other table scripts, evaluates their
``best.pt`` on the MD17 test split, runs the simulations (cached in ``<run_dir>/eval/md.json``) and writes the
table to ``--out`` (Markdown, CSV, JSON).

Usage::

    python experiments/table10.py --dry-run                      # the runs and the estimated MD cost
    python experiments/table10.py --dry-run --measure            # ... timing a full-size model on --device
    python experiments/table10.py --smoke                        # tiny models (aspirin, ethanol), CPU
    python experiments/table10.py --data-dir data/md17 --device cuda --out tables
    python experiments/table10.py --collect-only --data-dir data/md17 --checkpoint aspirin:dens=PATH

``--checkpoint MOLECULE:VARIANT=PATH`` (variants ``baseline`` and ``dens``) simulates PATH instead of the
run's ``best.pt``, on the paper's test split of ``--data-dir`` (seed 1: 950 / 50 / rest); with
``--collect-only`` nothing is trained.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import _tables as T
import numpy as np
import torch

from dens.data import MD17_MOLECULES, read_ase_file
from dens.md import BondReference, MDSettings, hr_mae, simulate

MOLECULES = ("aspirin", "ethanol", "naphthalene", "salicylic_acid")
#: Row label -> variant name (``--checkpoint``) and experiment pattern ({} = molecule).
VARIANTS = {
    "Equiformer (Lmax=2)": ("baseline", "md17_{}_l2_baseline"),
    "Equiformer (Lmax=2) + DeNS": ("dens", "md17_{}_l2"),
}
SIMULATIONS = 5
#: Result keys of the four columns of a molecule.
KEYS = ("test.energy_mae", "test.forces_mae", "md.stability", "md.hr_mae")


# --------------------------------------------------------------------------------------------------
# One (model, molecule) cell
# --------------------------------------------------------------------------------------------------
def simulate_cell(
    model: Any,
    test_frames: list[dict[str, Any]],
    settings: MDSettings,
    simulations: int,
    device: str,
    seed: int = 0,
    max_reference_frames: int = 20000,
    progress: bool = False,
) -> dict[str, float]:
    """``simulations`` batched MD runs from random test structures: stability (ps) and h(r) MAE."""
    rng = np.random.default_rng(seed)
    ref_idx = np.sort(rng.permutation(len(test_frames))[: min(max_reference_frames, len(test_frames))])
    ref_pos = np.stack([test_frames[i]["pos"].double().numpy() for i in ref_idx])
    z = test_frames[0]["atomic_numbers"].numpy()
    reference = BondReference.from_frames(z, ref_pos)
    replace = simulations > len(test_frames)  # only in smoke runs with few test structures
    starts = [test_frames[int(i)] for i in rng.choice(len(test_frames), simulations, replace=replace)]
    trajs = simulate(model, starts, settings, [reference] * simulations, device=device, progress=progress)
    stable = np.concatenate([t.stable_positions() for t in trajs])
    return {
        "stability": float(np.mean([t.stability for t in trajs])),
        "hr_mae": hr_mae(stable, ref_pos) if len(stable) else math.nan,
        "stable_runs": float(sum(t.stable for t in trajs)),
        "seconds": float(trajs[0].info["seconds"]),
    }


def row(label: str) -> T.Row:
    """Per molecule: test energy and force MAE, stability and h(r) MAE, beside the paper's."""
    _, pattern = VARIANTS[label]
    sources = [(pattern.format(m), key) for m in MOLECULES for key in KEYS]
    return T.Row(label, T.cells(T.paper("table10", label), sources))


TABLE = T.Table(
    name="table10",
    title="Table 10: MD17 simulations (500 K, 300 ps) of Equiformer (Lmax=2) with and without DeNS",
    label_header="Model",
    columns=tuple(
        T.Column(header, T.MOLECULE_TITLES[m], decimals)
        for m in MOLECULES
        for header, decimals in (("energy", 1), ("forces", 1), ("stability", 1), ("h(r)", 2))
    ),
    rows=tuple(row(label) for label in VARIANTS),
    notes=(
        "energy meV, forces meV/Å on the test split; stability ps (of 300), mean over the simulations; "
        "h(r) MAE on their stable parts",
    ),
    smoke_molecules=("aspirin", "ethanol"),
)


# --------------------------------------------------------------------------------------------------
# What Table 10 adds to the shared pipeline
# --------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--measure", action="store_true", help="with --dry-run: time a full-size model")
    parser.add_argument("--ms-per-step", type=float, default=60.0, help="assumed cost of one batched step")
    parser.add_argument("--checkpoint", action="append", help="MOLECULE:VARIANT=PATH (variant baseline|dens)")
    parser.add_argument("--simulations", type=int, default=SIMULATIONS)
    parser.add_argument("--save-every", type=int, default=100, help="steps between stored frames")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


def _device(args: argparse.Namespace) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def dry_run(args: argparse.Namespace, plans: Sequence[T.Plan]) -> None:
    """The simulations and their estimated cost (``--measure``: timed on ``--device``)."""
    settings = MDSettings()
    steps = settings.steps
    ms = measure_step_time(_device(args), args.simulations) if args.measure else args.ms_per_step
    print(
        f"then: {len(plans)} models x {args.simulations} simulations (batched per model), NVT Nose-Hoover "
        f"{settings.temperature:g} K, {settings.timestep:g} fs x {steps:,} steps = {settings.duration:g} ps"
    )
    hours = steps * ms / 1000 / 3600
    for plan in plans:
        ckpt = checkpoints(args).get(plan.run.experiment, plan.run_dir / "checkpoints" / "best.pt")
        print(
            f"  {plan.run.experiment:32} ~{hours:5.1f} h  checkpoint {ckpt}{'' if ckpt.is_file() else ' (missing)'}"
        )
    source = "measured" if args.measure else "assumed (--measure times it)"
    print(
        f"estimated MD cost: {hours * len(plans):.1f} device-hours at {ms:.1f} ms per batched step "
        f"({source}); an upper bound, unstable simulations stop early (paper: not reported)"
    )


def measure_step_time(device: str, simulations: int) -> float:
    """Milliseconds per MD step of a full-size Equiformer (Lmax 2) + DeNS on ``simulations`` aspirins."""
    from dens.models import ForceField
    from dens.models.equiformer import Equiformer

    model = ForceField(Equiformer.from_preset("md17_l2", dens_heads=True), cutoff=5.0, max_neighbors=None).to(
        device
    )
    start = read_ase_file(T.SHARED_DATA / "md17" / "sgdml_geometries" / "aspirin.xyz", dtype=torch.float64)[0]
    settings = MDSettings(duration=0.0025 * 3, save_every=1000)
    simulate(model, [start] * simulations, settings, device=device)  # warm-up
    t0 = time.perf_counter()
    trajs = simulate(model, [start] * simulations, MDSettings(duration=0.01, save_every=1000), device=device)
    return 1000 * (time.perf_counter() - t0) / trajs[0].steps


def checkpoints(args: argparse.Namespace) -> dict[str, Path]:
    """``--checkpoint MOLECULE:VARIANT=PATH`` by experiment name."""
    names = dict(VARIANTS.values())
    out = {}
    for item in args.checkpoint or []:
        key, _, path = item.partition("=")
        molecule, _, variant = key.partition(":")
        if molecule not in MOLECULES or variant not in names or not path:
            raise SystemExit(
                f"--checkpoint {item!r}: expected MOLECULE:VARIANT=PATH, variant baseline|dens, "
                f"molecule one of {', '.join(MOLECULES)}"
            )
        out[names[variant].format(molecule)] = Path(path)
    return out


def collect(
    args: argparse.Namespace, plan: T.Plan, options: T.EvalOptions, result: Mapping[str, Any]
) -> dict[str, Any]:
    """The simulations of one model (cached), and its test MAEs when it is a ``--checkpoint``."""
    explicit = checkpoints(args).get(plan.run.experiment)
    if explicit is None and not (plan.run_dir / "checkpoints" / "best.pt").is_file():
        return {}
    if explicit is None:
        config = json.loads((plan.run_dir / "config.json").read_text())
    else:
        config = {"data": {"path": str(Path(args.data_dir) / MD17_MOLECULES[plan.run.molecule])}}
    ev = T.RunEvaluator(plan.run, plan.run_dir, config, options, checkpoint=explicit)
    out: dict[str, Any] = {}
    if "test.energy_mae" not in result:
        out.update({f"test.{k}": v for k, v in ev.md17_test()["metrics"].items()})
    if args.smoke:  # 100 steps of 0.5 fs, two simulations, few reference frames
        settings = MDSettings(duration=0.05, save_every=10, seed=args.seed)
        simulations, references = 2, 40
    else:
        settings = MDSettings(save_every=args.save_every, seed=args.seed)
        simulations, references = args.simulations, 20000

    def compute() -> dict[str, Any]:
        test = ev.md17_test_set()
        frames = [test[i] for i in range(len(test))]
        return simulate_cell(
            ev.model,
            frames,
            settings,
            simulations,
            options.device,
            args.seed,
            references,
            progress=not args.no_progress,
        )

    key = {"duration": settings.duration, "save_every": settings.save_every, "simulations": simulations,
           "seed": args.seed, "references": references, "limit": options.limit}  # fmt: skip
    md = ev.cached("md", key, compute)
    print(f"{plan.run.experiment}: {md}", file=sys.stderr)
    return out | {f"md.{k}": v for k, v in md.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Train or resume the Table 4 runs it needs, simulate, and write Table 10."""
    return T.main(TABLE, argv, __doc__, T.Extension(add_arguments, dry_run, collect))


if __name__ == "__main__":
    sys.exit(main())
