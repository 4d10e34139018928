"""Equiformer (MD17) training-step time and peak memory, with and without DeNS.

Run ``python -m benchmarks.equiformer`` (``--quick`` for fewer steps, ``--device cuda`` on a GPU,
``--threads N`` for the CPU thread count). The workload is the paper's MD17 setting: aspirin (21 atoms),
batch 8, all pairs within 5 Å, the ``md17_l2`` / ``md17_l3`` presets, float32. One step is forward,
gradient forces with ``create_graph``, loss ``|dE| + 80 |dF|`` (plus ``5 |noise - target|`` with DeNS),
backward and an AdamW step. DeNS steps corrupt 25 % of the atoms of 2 of the 8 structures (p_DeNS 0.25,
ratio 0.25, sigma 0.05, Table 9), rebuild the graph, encode those atoms' forces and train the noise head.

Every configuration runs in its own process, so its peak memory is its own: CUDA
``max_memory_allocated``, CPU peak resident set size; "step mem" is the peak minus the memory held before
the first step (model and data), i.e. activations, gradients and optimiser state. On a shared CPU, pass
``--threads 1``: small-tensor workloads like this one slow down badly when threads are oversubscribed. The paper reports 17 vs 19
GPU-hours (Lmax 2) and 59 vs 61 (Lmax 3) for training without / with DeNS, i.e. an overhead of 1.12x and
1.03x, on an A5000.
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

from ._machine import describe, header

ASPIRIN_Z = [6] * 9 + [8] * 4 + [1] * 8  # C9H8O4
SHARED_ASPIRIN = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "md17" / "rmd17_aspirin_1000_meV.xyz"
)


def _aspirin_batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch_size`` aspirin frames: rMD17 when ``../shared`` has it, else jittered copies of one frame."""
    if SHARED_ASPIRIN.is_file():
        from ase.io import read

        frames = read(SHARED_ASPIRIN, index=f":{batch_size}")
        z = torch.tensor(frames[0].numbers)
        pos = torch.stack([torch.tensor(a.positions, dtype=torch.float32) for a in frames])
        forces = torch.stack([torch.tensor(a.get_forces(), dtype=torch.float32) for a in frames])
        return z, pos, forces
    g = torch.Generator().manual_seed(0)
    base = torch.rand(21, 3, generator=g) * 5.0
    pos = base + 0.05 * torch.randn(batch_size, 21, 3, generator=g)
    return torch.tensor(ASPIRIN_Z), pos, torch.randn(batch_size, 21, 3, generator=g)


def _molecular_graph(pos: torch.Tensor, batch: torch.Tensor, cutoff: float) -> torch.Tensor:
    """All pairs of distinct atoms of one structure closer than ``cutoff``: ``[2, E]`` (source, target)."""
    close = (torch.cdist(pos, pos) < cutoff) & (batch[:, None] == batch[None, :])
    close.fill_diagonal_(False)
    target, source = torch.nonzero(close, as_tuple=True)
    return torch.stack([source, target])


def _one(lmax: int, dens: bool, steps: int, device: str) -> dict:
    from dens.models import equiformer

    torch.manual_seed(0)
    model = equiformer.Equiformer.from_preset(f"md17_l{lmax}", dens_heads=dens).to(device).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-6)
    batch_size = 8
    z, pos, forces = _aspirin_batch(batch_size)
    n = z.numel()
    z, batch = z.repeat(batch_size).to(device), torch.arange(batch_size).repeat_interleave(n).to(device)
    pos, forces, energy = (
        pos.reshape(-1, 3).to(device),
        forces.reshape(-1, 3).to(device),
        torch.zeros(batch_size, device=device),
    )
    g = torch.Generator(device="cpu").manual_seed(1)

    def step() -> None:
        x, extra, mask, target = pos, None, None, None
        if dens:  # structures 0 and 1 are denoised: 25 % of their atoms corrupted
            chosen = batch < 2
            mask = chosen & (torch.rand(len(z), generator=g) < 0.25).to(device)
            noise = 0.05 * torch.randn(len(z), 3, generator=g).to(device) * mask[:, None]
            x = pos + noise
            target = noise / 0.05
            extra = model.force_encoder(forces * chosen[:, None], mask)
        edge_index = _molecular_graph(x, batch, model.max_radius)
        shift = torch.zeros(edge_index.shape[1], 3, device=device)
        out = model(z, x, batch, edge_index, shift, batch_size, extra_embedding=extra, noise_mask=mask)
        loss = (out["energy"] - energy).abs().mean()
        if dens:
            keep = ~mask
            loss = loss + 80 * (out["forces"][keep] - forces[keep]).norm(dim=-1).mean()
            loss = loss + 5 * (out["forces"][mask] - target[mask]).norm(dim=-1).mean()
        else:
            loss = loss + 80 * (out["forces"] - forces).norm(dim=-1).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()  # model, optimiser and data; the peak below includes the optimiser state
    step()  # warm-up: allocator, lazy initialisation (its memory counts: it is a training step too)
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
        extra_mb = peak - base / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        extra_mb = peak - base
    return dict(
        lmax=lmax,
        dens=dens,
        params=sum(p.numel() for p in model.parameters()),
        edges=int(_molecular_graph(pos, batch, model.max_radius).shape[1]),
        step_s=statistics.median(times),
        min_s=min(times),
        peak_mb=peak,
        step_mb=extra_mb,
    )


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 timed steps instead of 5")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--one", nargs=2, metavar=("LMAX", "DENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = 2 if args.quick else 5
    if args.one:
        print(json.dumps(_one(int(args.one[0]), args.one[1] == "1", steps, args.device)))
        return

    machine = describe(args.threads or torch.get_num_threads())
    rows = []
    for lmax in (2, 3):
        for dens in (False, True):
            cmd = [sys.executable, "-m", "benchmarks.equiformer", "--one", str(lmax), str(int(dens))]
            cmd += ["--device", args.device] + (["--quick"] if args.quick else [])
            cmd += ["--threads", str(args.threads)] if args.threads else []
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  measured Lmax {lmax} {'+ DeNS' if dens else '      '}", file=sys.stderr)

    threads = args.threads or torch.get_num_threads()
    print(
        f"Equiformer MD17 training step: aspirin (21 atoms) x 8, float32, {args.device}"
        + (f", {threads} threads" if args.device == "cpu" else "")
        + f", median of {steps} steps"
    )
    print(header(machine))
    print(
        f"{'model':<18}{'params':>12}{'edges':>8}{'step (s)':>11}{'min (s)':>10}{'peak (MB)':>12}{'step mem (MB)':>15}"
    )
    for r in rows:
        name = f"Lmax {r['lmax']}" + (" + DeNS" if r["dens"] else "")
        print(
            f"{name:<18}{r['params']:>12,}{r['edges']:>8}{r['step_s']:>11.3f}{r['min_s']:>10.3f}"
            f"{r['peak_mb']:>12.0f}{r['step_mb']:>15.0f}"
        )
    for lmax, paper in ((2, 19 / 17), (3, 61 / 59)):
        base, dens = (r for r in rows if r["lmax"] == lmax)
        print(
            f"DeNS overhead, Lmax {lmax}: time x{dens['step_s'] / base['step_s']:.2f}, "
            f"step memory x{dens['step_mb'] / max(base['step_mb'], 1e-9):.2f} (paper, GPU-hours: x{paper:.2f})"
        )


if __name__ == "__main__":
    main()
