"""Speed and memory of the equivariant core (figures, not tests).

``python -m benchmarks.core [--quick] [--device cpu|cuda] [--json out.json]``

Cases (each in a fresh subprocess, so peak memory is its own):
- ``wigner``: D matrices of 100k edge frames at lmax 6 (all rows, and the 29 m-major rows with
  ``|m| <= 2`` that an SO(2) convolution needs), against the Euler-angle route of the official models
  (e3nn's ``matrix_to_angles`` and one ``wigner_D`` per degree, assembled block-diagonally).
- ``so2conv``: an SO(2) convolution message step at OC20 sizes (lmax 6, mmax 2, 128 channels, 120
  atoms x 20 neighbours = 2400 edges): rotate into edge frames, convolve with radial weights, rotate
  back, sum per atom; forward + backward.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timeit(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _memory(device: str, rss_before: float) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _peak_rss_mb() - rss_before


def case_wigner(variant: str, num_edges: int, device: str, repeats: int) -> dict:
    from dens.models import CoefficientLayout, edge_frames, wigner_D

    torch.manual_seed(0)
    vec = torch.randn(num_edges, 3, device=device)
    frames = edge_frames(vec)
    lmax, rows = 6, CoefficientLayout(6, 2).m_major.to(device)
    rss = _peak_rss_mb()
    if variant == "dens_full":
        fn = lambda: wigner_D(frames, lmax)  # noqa: E731
    elif variant == "dens_reduced":
        fn = lambda: wigner_D(frames, lmax, rows=rows)  # noqa: E731
    else:
        import e3nn.o3 as o3

        def fn():
            alpha, beta, gamma = o3.matrix_to_angles(frames)
            out = frames.new_zeros(num_edges, (lmax + 1) ** 2, (lmax + 1) ** 2)
            for l in range(lmax + 1):
                out[:, l * l : (l + 1) ** 2, l * l : (l + 1) ** 2] = o3.wigner_D(l, alpha, beta, gamma)
            return out

    seconds = _timeit(fn, device, repeats)
    return {"seconds": seconds, "peak_mb": _memory(device, rss)}


def case_so2conv(variant: str, num_atoms: int, device: str, repeats: int) -> dict:
    from dens.models import CoefficientLayout, EdgeRotation, SO2Convolution, degree_rescale, edge_frames
    from dens.ops import scatter_sum

    torch.manual_seed(0)
    lmax, mmax, channels, neighbours = 6, 2, 128, 20
    layout = CoefficientLayout(lmax, mmax)
    conv = SO2Convolution(channels, channels, lmax, mmax, edge_channels_list=[128, 128, 128]).to(device)
    x = torch.randn(num_atoms, layout.num_coefficients, channels, device=device, requires_grad=True)
    dst = torch.arange(num_atoms, device=device).repeat_interleave(neighbours)
    src = torch.randint(0, num_atoms, (num_atoms * neighbours,), device=device)
    vec = torch.randn(len(src), 3, device=device)
    x_edge = torch.randn(len(src), 128, device=device)
    rescale = degree_rescale(layout).to(device)
    rss = _peak_rss_mb()

    def fn():
        rot = EdgeRotation(edge_frames(vec), layout, rescale)
        msg, _ = conv(rot.rotate(x.index_select(0, src)), x_edge)
        out = scatter_sum(rot.rotate_back(msg), dst, num_atoms)
        out.pow(2).sum().backward()

    seconds = _timeit(fn, device, repeats)
    return {"seconds": seconds, "peak_mb": _memory(device, rss), "edges": len(src)}


def run_child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.case == "wigner":
        result = case_wigner(args.variant, args.size, args.device, args.repeats)
    else:
        result = case_so2conv(args.variant, args.size, args.device, args.repeats)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (seconds)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    args = parser.parse_args()
    if args.case:
        run_child(args)
        return

    edges, atoms, repeats = (10_000, 24, 1) if args.quick else (100_000, 120, args.repeats)
    plan = [("wigner", v, edges) for v in ("e3nn_euler", "dens_full", "dens_reduced")]
    plan += [("so2conv", "dens", atoms)]
    results = []
    for case, variant, size in plan:
        cmd = [sys.executable, "-m", "benchmarks.core", "--case", case, "--variant", variant, "--size", str(size),
               "--device", args.device, "--threads", str(args.threads), "--repeats", str(repeats)]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results.append({"case": case, "variant": variant, "size": size, **json.loads(out)})

    print(f"dens core benchmark: device {args.device}, {args.threads} threads, torch {torch.__version__}")
    print(f"{'case':<9} {'variant':<13} {'size':>8} {'median s':>10} {'peak MB':>9}")
    for r in results:
        print(f"{r['case']:<9} {r['variant']:<13} {r['size']:>8} {r['seconds']:>10.4f} {r['peak_mb']:>9.0f}")
    base = next(r for r in results if r["variant"] == "e3nn_euler")
    for r in results:
        if r["case"] == "wigner" and r is not base:
            print(
                f"  {r['variant']}: {base['seconds'] / r['seconds']:.1f}x faster than the Euler-angle route"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
