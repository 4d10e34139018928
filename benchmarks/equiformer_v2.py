"""Training-step time and peak memory of EquiformerV2 (figures, not tests).

``python -m benchmarks.equiformer_v2 [--quick] [--preset oc20_2m] [--device cpu|cuda] [--amp bf16]
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
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

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
    if args.malloc == "retain" and args.device == "cpu":
        retain_freed_memory()
    torch.manual_seed(0)
    device = torch.device(args.device)
    dens = args.mode == "dens"
    overrides = {} if not args.quick else dict(num_layers=2, lmax=2, mmax=1, sphere_channels=16,
                                                attn_hidden_channels=16, num_heads=2, attn_alpha_channels=8,
                                                attn_value_channels=8, ffn_hidden_channels=16, edge_channels=16)  # fmt: skip
    backbone = EquiformerV2.from_preset(args.preset, dens_heads=dens, **overrides)
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
        "edges": int(batch.edge_index.shape[1]), "median_s": statistics.median(times), "times": times,
        "peak_gb": peak, "structures_per_s": batch.num_graphs / statistics.median(times),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="oc20_2m")
    parser.add_argument("--quick", action="store_true", help="a tiny model, one repeat (seconds)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--amp", default=None, choices=[None, "bf16", "fp16"])
    parser.add_argument("--optimizer", action="store_true", help="include an AdamW step")
    parser.add_argument("--malloc", choices=["retain", "default"], default="retain",
                        help="CPU: retain freed memory as the trainer does, or glibc's default")  # fmt: skip
    parser.add_argument("--json", default=None)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_case(args)))
        return
    if args.quick:
        args.repeats = 1
    results = []
    for mode in ("s2ef", "dens"):
        cmd = [sys.executable, "-m", "benchmarks.equiformer_v2", "--mode", mode, "--preset", args.preset,
               "--device", args.device, "--threads", str(args.threads), "--repeats", str(args.repeats),
               "--malloc", args.malloc]  # fmt: skip
        cmd += (["--quick"] if args.quick else []) + (["--optimizer"] if args.optimizer else [])
        cmd += ["--amp", args.amp] if args.amp else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(out))
    what = "fwd+loss+bwd" + ("+AdamW" if args.optimizer else "")
    print(f"EquiformerV2 {args.preset}{' (quick: tiny)' if args.quick else ''}: {what}, device {args.device}, "
          f"{args.threads} threads, amp {args.amp}, malloc {args.malloc}")  # fmt: skip
    print(
        f"{'mode':<6} {'params':>12} {'atoms':>6} {'edges':>6} {'median s':>9} {'struct/s':>9} {'peak GB':>8}"
    )
    for r in results:
        print(f"{r['mode']:<6} {r['params']:>12,} {r['atoms']:>6} {r['edges']:>6} {r['median_s']:>9.3f} "
              f"{r['structures_per_s']:>9.3f} {r['peak_gb']:>8.2f}")  # fmt: skip
    s2ef, dens = results
    print(f"DeNS overhead: {dens['median_s'] / s2ef['median_s'] - 1:+.1%} (paper: +7.4% training time)")
    if args.device == "cpu" and not args.quick and args.preset == "oc20_2m":
        for r in results:
            t, m = OFFICIAL_CPU[r["mode"]]
            print(f"  {r['mode']}: official design {t} s / {m} GB (recorded: 2-core AMD EPYC VM, default malloc): "
                  f"{t / r['median_s']:.2f}x time, {m / max(r['peak_gb'], 1e-9):.2f}x memory")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
