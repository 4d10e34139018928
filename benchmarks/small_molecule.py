"""The small-molecule training step (#19): the DeNS study's Equiformer on ethanol, eager and compiled.

Run ``python -m benchmarks.small_molecule`` (``--quick``: fewer steps). The workload is what the DeNS study
of ``experiments/results/dens_study`` trains, step for step: ``Trainer.train_step`` of the reduced
Equiformer (Lmax 2, node irreps ``32x0e+16x1e+8x2e``, ``--layers`` blocks; 2 is the issue's case) on
rMD17 ethanol x 8 (72 atoms, 576 edges) with the shipped MD17 DeNS objective (``dens/conf/dens/md17.yaml``:
p 0.25, sigma 0.05, r 0.25, lambda 5), forward, gradient forces with a double backward, AdamW; one thread
by default (``--threads 1,2``: every case at each count; the worker imports dens before torch, as the
trainer does, so OpenMP's threads sleep rather than spin unless ``OMP_WAIT_POLICY`` says otherwise).
Without ``../shared`` the frames are jittered copies of one ethanol geometry (same sizes).

* ``--compile``: also ``trainer.compile=true`` (:meth:`dens.models.Equiformer.compile_gradient`: the energy
  and its gradient as one compiled graph), for ``--versus`` too where that commit can (otherwise its row
  says "failed"); the first step, which compiles, is reported on its own.
* ``--cpp-wrapper``: also compiled with ``trainer.compile_options={cpp_wrapper: true}`` (this tree only):
  inductor's wrapper in C++ instead of Python, a longer first compile for a shorter step.
* ``--versus REV``: the eager step of an earlier commit, in the same invocation; every case runs in its
  own process and the cases alternate over ``--rounds``, so a change of machine load hits all of them.
* ``--pair JSON``: instead, two compiled trainers in one process, dens's inductor settings (A) against
  these settings over them (B; ``null`` removes one of dens's graph passes), their steps alternating, 150
  pairs (``--steps``); prints the median per-pair ratio. For changes of a few per cent on a noisy machine.

Figures are medians of the timed steps of each round, per case; the ratio column divides by the first
case of the row's layer count at the *same* round's medians (``--versus`` first when given).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ._machine import REPO, checkout, describe, header

SHARED_ETHANOL = REPO.parent / "shared" / "data" / "md17" / "rmd17_ethanol_train0_1000_eV.xyz"
# one ethanol geometry (Å), for a checkout without ../shared: C, C, O, H x 6
ETHANOL = (
    [6, 6, 8, 1, 1, 1, 1, 1, 1],
    [
        [0.0, 0.0, 0.0], [1.52, 0.0, 0.0], [2.0, 1.35, 0.0], [-0.39, 1.02, 0.0], [-0.39, -0.51, 0.89],
        [-0.39, -0.51, -0.89], [1.9, -0.51, 0.89], [1.9, -0.51, -0.89], [2.96, 1.33, 0.0],
    ],
)  # fmt: skip
# The DeNS study's model (experiments/small_scale.py, _MD17_MODEL) as constructor arguments: change both together.
REDUCED = dict(
    irreps_node_embedding="32x0e+16x1e+8x2e",
    irreps_pre_attn="32x0e+16x1e+8x2e",
    irreps_head="16x0e+8x1e+4x2e",
    num_heads=2,
    irreps_mlp_mid="96x0e+48x1e+24x2e",
    irreps_feature="128x0e+64x1e+32x2e",
    irreps_force_encoding="1x0e+1x1e+1x2e",
    number_of_basis=32,
    fc_neurons=[32, 32],
)


def _frames(count: int) -> list:
    """``count`` ethanol frames as dens structures (rMD17 when ``../shared`` has it)."""
    import torch

    from dens.data import make_structure

    if SHARED_ETHANOL.is_file():
        from dens.data.ase_io import read_ase_file

        return read_ase_file(str(SHARED_ETHANOL), f":{count}", "eV", "Å")
    generator = torch.Generator().manual_seed(0)
    z, pos = torch.tensor(ETHANOL[0]), torch.tensor(ETHANOL[1])
    return [
        make_structure(
            pos + 0.05 * torch.randn(pos.shape, generator=generator),
            z,
            energy=float(torch.randn((), generator=generator)),
            forces=torch.randn(pos.shape, generator=generator),
        )
        for _ in range(count)
    ]


def _trainer(layers: int, dens: bool, compiled: bool, options: dict, run_dir: str) -> tuple:
    """The study's trainer, its batch and the imported ``dens`` (whatever ``dens`` is importable)."""
    import importlib

    # dens before torch, as `python -m dens.train` imports them: dens sets OpenMP's wait policy, read once
    package = importlib.import_module("dens")
    import torch
    import yaml

    from dens.data import InMemoryDataset, collate
    from dens.losses import DeNSSettings
    from dens.models import Equiformer, ForceField
    from dens.trainer import OptimSettings, Trainer, TrainerSettings

    conf = Path(package.__file__).parent / "conf"
    items = _frames(8)
    batch = collate(items)
    torch.manual_seed(0)
    heads = "dens_heads" if "dens_heads" in Equiformer.__init__.__code__.co_varnames else "use_force_encoding"
    backbone = Equiformer(num_layers=layers, **REDUCED, **{heads: dens})
    model = ForceField(backbone, 5.0, None, energy_mean=float(batch.energy.double().mean()))
    optim = OptimSettings(**{**yaml.safe_load((conf / "optim" / "md17.yaml").read_text()), "batch_size": 8})
    objective = yaml.safe_load((conf / "dens" / ("md17.yaml" if dens else "off.yaml")).read_text())
    extra = {"compile": True} if compiled else {}
    if options:  # a field earlier commits may lack: only when asked for
        extra["compile_options"] = options
    settings = TrainerSettings(
        run_dir=run_dir, device="cpu", resume=None, tensorboard=False, progress_bar=False, **extra
    )
    trainer = Trainer(model, InMemoryDataset(items), None, optim, DeNSSettings.from_dict(objective), settings)
    return trainer, batch, package


def _worker(layers: int, dens: bool, compiled: bool, steps: int, threads: int, options: dict) -> dict:
    """Time ``steps`` training steps in this process (whatever ``dens`` is importable) and return figures."""
    import tempfile

    with tempfile.TemporaryDirectory() as run_dir:
        trainer, batch, package = _trainer(layers, dens, compiled, options, run_dir)
        import torch

        torch.set_num_threads(threads)  # after the trainer, which sets its own default
        start = time.perf_counter()
        trainer.train_step([batch])
        first = time.perf_counter() - start
        for _ in range(2):
            trainer.train_step([batch])
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            trainer.train_step([batch])
            times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "first_s": first,
            "params": sum(p.numel() for p in trainer.model.parameters()), "dens_file": package.__file__}  # fmt: skip


def _pair(layers: int, dens: bool, options: dict, pairs: int, threads: int) -> None:
    """Two compiled trainers of this tree in one process, dens's inductor settings (A) and ``options`` over
    them (B), their steps alternating (ABBA...): both see the same machine load, which on a shared VM moves
    separate processes' medians by more than a few per cent."""
    import tempfile

    with tempfile.TemporaryDirectory() as run_a, tempfile.TemporaryDirectory() as run_b:
        trainers = [
            _trainer(layers, dens, True, opts, run)[:2] for opts, run in (({}, run_a), (options, run_b))
        ]
        import torch

        torch.set_num_threads(threads)
        for trainer, batch in trainers:
            for _ in range(3):  # the first compiles
                trainer.train_step([batch])
        times: list[list[float]] = [[], []]
        for i in range(pairs):
            for k in (0, 1) if i % 2 == 0 else (1, 0):
                trainer, batch = trainers[k]
                start = time.perf_counter()
                trainer.train_step([batch])
                times[k].append(time.perf_counter() - start)
    print(f"in one process, {pairs} alternating pairs of steps, {threads} thread(s); B = A with {options}")
    print(header(describe(str(threads))))
    for name, t in zip("AB", times, strict=True):
        t = sorted(t)
        print(
            f"{name}: median {statistics.median(t) * 1e3:.1f} ms, 10th percentile {t[len(t) // 10] * 1e3:.1f} ms"
        )
    ratio = statistics.median(b / a for a, b in zip(*times, strict=True))
    print(f"B / A, median over pairs: x{ratio:.3f}")


def _run(case: dict, steps: int, threads: int, root: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.small_molecule", "--one", json.dumps(case)]
    cmd += ["--steps", str(steps), "--threads", str(threads)]
    # `python -m` puts the working directory first on sys.path: run in `root`, so that its dens is imported
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(REPO)])}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"case {case} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(result["dens_file"]).resolve().is_relative_to(root.resolve()):
        raise RuntimeError(f"case {case} imported {result['dens_file']}, not the dens of {root}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 timed steps and one round")
    parser.add_argument("--layers", default="2", help="comma-separated block counts (default 2)")
    parser.add_argument("--threads", default="1", help="comma-separated thread counts, e.g. 1,2 (default 1)")
    parser.add_argument("--no-dens", action="store_true", help="the baseline objective (no DeNS)")
    parser.add_argument("--compile", action="store_true", help="also trainer.compile=true")
    parser.add_argument(
        "--cpp-wrapper",
        action="store_true",
        help="also compiled with trainer.compile_options.cpp_wrapper=true",
    )
    parser.add_argument("--versus", metavar="REV", help="also the eager step of git revision REV")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 2, quick 1)")
    parser.add_argument(
        "--pair",
        metavar="JSON",
        help="instead: in one process, compiled steps with dens's inductor settings against these over them, "
        "alternating (e.g. '{\"joint_custom_post_pass\": null}')",
    )
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (5 if args.quick else 15)
    if args.one:
        case = json.loads(args.one)
        options = case.get("options", {})
        threads = int(args.threads)
        print(json.dumps(_worker(case["layers"], case["dens"], case["compiled"], steps, threads, options)))
        return

    dens = not args.no_dens
    if args.pair:
        layers, threads = int(args.layers.split(",")[0]), int(args.threads.split(",")[0])
        _pair(layers, dens, json.loads(args.pair), args.steps or (20 if args.quick else 150), threads)
        return
    rounds = args.rounds or (1 if args.quick else 2)
    thread_counts = [int(x) for x in args.threads.split(",")]
    machine = describe(args.threads)
    cases = []
    for layers in (int(x) for x in args.layers.split(",")):
        for threads in thread_counts:
            for compiled in (False, True) if args.compile else (False,):
                for rev in (args.versus, None) if args.versus else (None,):
                    cases.append(dict(layers=layers, dens=dens, compiled=compiled, rev=rev, options={},
                                      threads=threads))  # fmt: skip
            if args.cpp_wrapper:
                cases.append(dict(layers=layers, dens=dens, compiled=True, rev=None,
                                  options={"cpp_wrapper": True}, threads=threads))  # fmt: skip
    results: dict[int, list[dict]] = {i: [] for i in range(len(cases))}
    failed: dict[int, str] = {}
    with checkout(args.versus) if args.versus else contextlib.nullcontext(REPO) as old_root:
        for round_ in range(rounds):
            for i, case in enumerate(cases):
                root = old_root if case["rev"] else REPO
                payload = {k: case[k] for k in ("layers", "dens", "compiled", "options")}
                try:
                    results[i].append(_run(payload, steps, case["threads"], root))
                except RuntimeError as error:  # e.g. an earlier commit that cannot compile this model
                    failed.setdefault(i, str(error).splitlines()[-1])
                    continue
                print(f"  round {round_ + 1}: {_label(case)} {results[i][-1]['median_s'] * 1e3:.1f} ms",
                      file=sys.stderr)  # fmt: skip

    print(
        f"Equiformer (reduced, Lmax 2) training step, rMD17 ethanol x 8"
        f"{'' if SHARED_ETHANOL.is_file() else ' (jittered copies: no ../shared)'}, "
        f"{'DeNS' if dens else 'no DeNS'}, {args.threads} thread(s), medians of {steps} steps per round, "
        f"{rounds} round(s), cases alternating"
    )
    print(header(machine))
    print(f"{'case':<56}{'params':>10} {'step (ms), per round':>30}{'first step (s)':>16}{'ratio':>8}")
    for i, case in enumerate(cases):
        if i in failed:
            print(f"{_label(case):<56}failed: {failed[i][:100]}")
            continue
        first_case = next(j for j, c in enumerate(cases) if c["layers"] == case["layers"] and j not in failed)
        ratios = [a["median_s"] / b["median_s"] for a, b in zip(results[first_case], results[i], strict=True)]
        per_round = " / ".join(f"{r['median_s'] * 1e3:.1f}" for r in results[i])
        print(
            f"{_label(case):<56}{results[i][0]['params']:>10,} {per_round:>30}"
            f"{max(r['first_s'] for r in results[i]):>16.1f}{'x' + format(statistics.median(ratios), '.2f'):>8}"
        )
    print("ratio: the first case's step time over this case's (>1: faster), median over rounds")


def _label(case: dict) -> str:
    where = f"@{case['rev'][:10]}" if case["rev"] else "this tree"
    kind = "compiled" if case["compiled"] else "eager"
    kind += ", cpp wrapper" if case["options"].get("cpp_wrapper") else ""
    return f"{case['layers']} block(s), {case['threads']} thread(s), {kind}, {where}"


if __name__ == "__main__":
    main()
