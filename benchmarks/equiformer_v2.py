"""Training-step time and peak memory of EquiformerV2 (figures, not tests).

``python -m benchmarks.equiformer_v2 [--quick] [--preset oc20_2m] [--device cpu|cuda] [--amp none,bf16]
[--malloc retain|default]``

Each case runs in a fresh subprocess (its own peak memory). The batch is the one of the official
measurement recorded in ``../shared/fixtures/official/README.md``: OC20 relaxation frames of
``random1000103`` (55 atoms) and ``random1000138`` (66 atoms), 12 Å / 20 neighbours (2420 edges), the graph
built before timing. One step is forward, loss (``2|dE| + 100 mean ||dF||``; DeNS: Eq. 6 with the OC20-2M
settings), backward, and optionally an AdamW step. The official figures (a 2-core AMD EPYC VM, 2
threads, glibc's default malloc) were 24.6 s / 10.7 GB (S2EF) and 27.3 s / 11.3 GB (DeNS),
forward+loss+backward; the ratios printed against them compare machines. On the CPU the cases retain
freed memory as the trainer does (:func:`dens.runtime.retain_freed_memory`); ``--malloc default``
measures without, as the official figures were.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ._machine import REPO, checkout, competing_load, describe, header

OFFICIAL_CPU = {"s2ef": (24.6, 10.7), "dens": (27.3, 11.3)}  # seconds, GB (2-core machine, 2 threads)


def oc20_batch():
    """The two structures of the official timing (demo frames of similar size without ../shared)."""
    from dens.data import collate

    from .models import oc20_structures

    return collate(oc20_structures(2))


def run_case(args: argparse.Namespace) -> dict:
    from dens.data.graph import radius_graph_pbc
    from dens.losses import DeNSSettings, LossSettings, corrupt, training_loss
    from dens.models import EquiformerV2, ForceField
    from dens.runtime import retain_freed_memory

    torch.set_num_threads(args.threads)
    if args.design != "fused":
        from dens.models.s2 import set_grid_activation

        set_grid_activation(args.design)
    if args.malloc == "retain" and args.device == "cpu":
        retain_freed_memory()
    torch.manual_seed(0)
    device = torch.device(args.device)
    dens = args.mode == "dens"
    overrides = {} if not args.quick else dict(num_layers=2, lmax=2, mmax=1, sphere_channels=16,
                                                attn_hidden_channels=16, num_heads=2, attn_alpha_channels=8,
                                                attn_value_channels=8, ffn_hidden_channels=16, edge_channels=16)  # fmt: skip
    if args.layers:
        overrides["num_layers"] = args.layers
    try:
        backbone = EquiformerV2.from_preset(args.preset, dens_heads=dens, **overrides)
    except TypeError:  # a revision from before the name dens_heads (--versus)
        backbone = EquiformerV2.from_preset(args.preset, dens=dens, **overrides)
    model = ForceField(backbone, cutoff=12.0, max_neighbors=20).to(device).train()
    batch = oc20_batch().to(device)
    batch.edge_index, batch.cell_offsets = radius_graph_pbc(
        batch.pos, batch.cell, batch.pbc, batch.batch, 12.0, 20, natoms=batch.natoms
    )
    settings = DeNSSettings(prob=1.0, sigma=0.1, corrupt_ratio=0.5, coefficient=10.0, enabled=dens)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if args.optimizer else None
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def step() -> None:
        corruption = corrupt(batch, settings) if dens else None
        kwargs = {}
        if corruption is not None:
            kwargs = dict(pos=corruption.pos, encoded_forces=batch.forces, encode_mask=corruption.noise_mask,
                          noise_mask=corruption.noise_mask, split_heads=True)  # as the trainer  # fmt: skip
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(batch, **kwargs)
            loss, _ = training_loss(out, batch, corruption, LossSettings(), settings, 0.0, 1.0, 1.0)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)

    times = []
    for i in range(args.repeats + 1):  # the first is the warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - rss_before
    )
    return {
        "mode": args.mode, "params": sum(p.numel() for p in model.parameters()), "atoms": batch.num_atoms,
        "edges": int(batch.edge_index.shape[1]), "structures": batch.num_graphs, "median_s": statistics.median(times), "times": times,
        "peak_gb": peak, "structures_per_s": batch.num_graphs / statistics.median(times),
    }  # fmt: skip


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _words(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def _case_command(
    args: argparse.Namespace, mode: str, threads: int, design: str, root: Path | None, amp: str
) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.equiformer_v2", "--mode", mode, "--preset", args.preset,
           "--device", args.device, "--threads", str(threads), "--repeats", str(args.repeats),
           "--malloc", args.malloc, "--design", design]  # fmt: skip
    cmd += (["--quick"] if args.quick else []) + (["--optimizer"] if args.optimizer else [])
    cmd += ["--amp", amp] if amp != "none" else []
    cmd += ["--layers", str(args.layers)] if args.layers else []
    cmd += ["--dens-root", str(root)] if root is not None else []
    return cmd


def _omp_env(policy: str, root: Path | None) -> dict[str, str]:
    """The case's environment: ``dens`` gives the OpenMP wait policy that dens (of ``root``, or this tree)
    sets when it is imported before torch, as its command-line entry points are."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy.startswith("spin:"):  # libgomp's spin, shortened to N iterations before sleeping
        return {**env, "GOMP_SPINCOUNT": policy[5:]}
    value = _dens_wait_policy(root) if policy == "dens" else {"spin": "", "passive": "PASSIVE"}[policy]
    return {**env, "OMP_WAIT_POLICY": value} if value else env


@functools.cache
def _dens_wait_policy(root: Path | None) -> str:
    """``OMP_WAIT_POLICY`` as dens (of ``root``, or this tree) leaves it when imported before torch (one
    probe per revision, not per case)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    probe = "import os, dens; print(os.environ.get('OMP_WAIT_POLICY', ''))"
    path = os.pathsep.join(str(p) for p in (root, REPO) if p is not None)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          env={**env, "PYTHONPATH": path}, cwd=root or REPO)  # fmt: skip
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="oc20_2m")
    parser.add_argument("--quick", action="store_true", help="a tiny model, one repeat (seconds)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=_ints, default=[2], help="CPU threads, a comma list (e.g. 1,2)")
    parser.add_argument("--load", type=_ints, default=[0],
                        help="competing busy processes during the steps, a comma list (e.g. 0,1)")  # fmt: skip
    parser.add_argument("--design", type=_words, default=["fused"],
                        help="grid activation: fused (dens) and/or plain (one op per stage, grid stored)")  # fmt: skip
    parser.add_argument("--modes", type=_words, default=["s2ef", "dens"])
    parser.add_argument("--omp", type=_words, default=["dens"],
                        help="OpenMP wait policy of the cases: dens (what dens sets), spin (libgomp's default), "
                             "spin:N (GOMP_SPINCOUNT=N), passive; a comma list")  # fmt: skip
    parser.add_argument("--layers", type=int, default=None, help="blocks (default: the preset's)")
    parser.add_argument("--versus", default=None, metavar="REV",
                        help="also time dens as of git revision REV, in the same invocation")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="rounds over all cases (medians of rounds)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--amp", type=_words, default=["none"],
                        help="autocast: none, bf16, fp16; a comma list (e.g. none,bf16)")  # fmt: skip
    parser.add_argument("--optimizer", action="store_true", help="include an AdamW step")
    parser.add_argument("--malloc", choices=["retain", "default"], default="retain",
                        help="CPU: retain freed memory as the trainer does, or glibc's default")  # fmt: skip
    parser.add_argument("--json", default=None)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--dens-root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.amp or set(args.amp) - {"none", "bf16", "fp16"}:
        parser.error(f"--amp {','.join(args.amp)}: choose from none, bf16, fp16 (a comma list)")
    if args.mode:
        args.threads, args.design, args.amp = args.threads[0], args.design[0], args.amp[0]
        if args.dens_root:  # an earlier revision's dens, before anything imports the working tree's
            sys.path.insert(0, args.dens_root)
        print(json.dumps(run_case(args)))
        return
    if args.quick:
        args.repeats = 1
    machine = describe(",".join(map(str, args.threads)), args.malloc)
    results: list[dict] = []
    with contextlib.ExitStack() as stack:
        roots: dict[str, Path | None] = {"now": None}
        if args.versus:
            roots[args.versus] = stack.enter_context(checkout(args.versus))
        for rnd, load in itertools.product(range(args.rounds), args.load):
            with competing_load(load):
                for (rev, root), omp, design, mode, threads, amp in itertools.product(
                    roots.items(), args.omp, args.design, args.modes, args.threads, args.amp
                ):
                    if root is not None and design != "fused":
                        continue  # earlier revisions have only their own design
                    cmd = _case_command(args, mode, threads, design, root, amp)
                    env = _omp_env(omp, root)
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                    row = json.loads(out.strip().splitlines()[-1])
                    policy = env.get("OMP_WAIT_POLICY", "spin").lower() + env.get("GOMP_SPINCOUNT", "")
                    results.append(dict(row, revision=rev, design=f"{design}/{policy}", load=load,
                                        threads=threads, round=rnd, amp=amp))  # fmt: skip
                    print(f"  round {rnd} load {load} {rev} {design} {policy} {mode} {threads} threads amp "
                          f"{amp}: {row['median_s']:.3f} s", file=sys.stderr)  # fmt: skip
    _report(args, machine, results)


def _report(args: argparse.Namespace, machine: dict, results: list[dict]) -> None:
    what = "fwd+loss+bwd" + ("+AdamW" if args.optimizer else "")
    layers = f", {args.layers} layers" if args.layers else ""
    print(f"EquiformerV2 {args.preset}{' (quick: tiny)' if args.quick else ''}{layers}: {what}, device "
          f"{args.device}, amp {','.join(args.amp)}; median of {args.repeats} steps per case, median over "
          f"{args.rounds} round(s)")  # fmt: skip
    print(header(machine))
    cases: dict[tuple, list[dict]] = {}
    for r in results:
        key = (r["revision"], r["design"], r["mode"], r["load"], r["threads"], r["amp"])
        cases.setdefault(key, []).append(r)
    median = {key: statistics.median(r["median_s"] for r in rows) for key, rows in cases.items()}
    print(f"{'revision':<10} {'design':<14} {'mode':<5} {'load':>4} {'threads':>7} {'amp':>4} {'params':>12} "
          f"{'edges':>6} {'median s':>9} {'struct/s':>9} {'peak GB':>8}")  # fmt: skip
    for key, rows in cases.items():
        r = rows[0]
        print(f"{key[0][:10]:<10} {key[1]:<14} {key[2]:<5} {key[3]:>4} {key[4]:>7} {key[5]:>4} "
              f"{r['params']:>12,} {r['edges']:>6} {median[key]:>9.3f} {r['structures'] / median[key]:>9.3f} "
              f"{max(x['peak_gb'] for x in rows):>8.2f}")  # fmt: skip
    if len(args.threads) > 1:
        one, many = min(args.threads), max(args.threads)
        print(f"threads: time with {many} threads / time with {one} (below 1: the extra threads help)")
        for key in median:
            if key[4] == many and (low := median.get((*key[:4], one, key[5]))):
                print(
                    f"  {key[0][:10]} {key[1]} {key[2]} load {key[3]} amp {key[5]}: x{median[key] / low:.2f}"
                )
    if args.versus:
        print(f"against {args.versus} (time now / time then; below 1: faster now)")
        for key in median:
            if key[0] != "now" or not key[1].startswith("fused"):
                continue
            then = [t for k, t in median.items() if k[0] == args.versus and k[2:] == key[2:]]
            if then:  # the earlier revision ran with its own OpenMP policy
                print(f"  {key[1]} {key[2]} load {key[3]} threads {key[4]} amp {key[5]}: "
                      f"x{median[key] / then[0]:.2f}")  # fmt: skip
    if "dens" in args.modes and "s2ef" in args.modes:
        for key in median:
            if key[2] == "dens" and (s2ef := median.get((key[0], key[1], "s2ef", *key[3:]))):
                print(f"DeNS overhead ({key[0][:10]} {key[1]} load {key[3]} threads {key[4]} amp {key[5]}): "
                      f"{median[key] / s2ef - 1:+.1%} (paper: +7.4% training time)")  # fmt: skip
    if len(args.amp) > 1 and "none" in args.amp:
        print("autocast: time / time in float32, same revision and case (below 1: faster)")
        for key in median:
            if key[5] != "none" and (full := median.get((*key[:5], "none"))):
                print(f"  {key[0][:10]} {key[1]} {key[2]} load {key[3]} threads {key[4]} amp {key[5]}: "
                      f"x{median[key] / full:.2f}")  # fmt: skip
    if args.device == "cpu" and not args.quick and args.preset == "oc20_2m" and not args.layers:
        for key in median:
            if key[0] == "now" and key[1].startswith("fused") and key[3] == 0 and key[4] == 2:
                t, m = OFFICIAL_CPU[key[2]]
                print(f"  {key[2]} amp {key[5]}: official design {t} s / {m} GB, float32 (another "
                      f"machine: 2-core AMD EPYC VM, default malloc): {t / median[key]:.2f}x time")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "options": vars(args),
                                               "results": results}, indent=2, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
