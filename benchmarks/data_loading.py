"""Data-loading throughput: reading + collating + graph building (cutoff 12 Å, 20 neighbours).

Run ``python -m benchmarks.data_loading`` (add ``--quick`` for a short run, ``--data PATH`` for another
data set, ``--device cuda`` to build graphs on the GPU in the main process). Prints structures per second
for 0 (in-process), 1 and 2 ``DataLoader`` workers, plus the cost of each stage alone, so we know the
loader never starves the model. The default data are the packaged demo LMDB (OC20 slabs, 37-104 atoms).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch.utils.data import DataLoader

from dens.data import collate, open_dataset, radius_graph_pbc
from dens.data.demo import demo_path


class _WithGraph:
    """collate + graph building in the worker (what a CPU-side loader would do)."""

    def __init__(self, cutoff: float, max_neighbors: int) -> None:
        self.cutoff, self.max_neighbors = cutoff, max_neighbors

    def __call__(self, items: list[dict[str, Any]]) -> Any:
        b = collate(items)
        b.edge_index, b.cell_offsets = radius_graph_pbc(
            b.pos, b.cell, b.pbc, b.batch, self.cutoff, self.max_neighbors, natoms=b.natoms
        )
        return b


def _run(
    ds: Any, workers: int, batch_size: int, steps: int, graph_in_loader: bool, device: str
) -> tuple[float, float]:
    fn = _WithGraph(12.0, 20) if graph_in_loader else collate
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=fn,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(0),
    )
    n = edges = 0
    it = iter(loader)
    first = next(it)  # exclude worker start-up
    del first
    t0 = time.perf_counter()
    for step, b in enumerate(it):
        if step >= steps:
            break
        if not graph_in_loader:
            b = b.to(device)
            ei, _ = radius_graph_pbc(b.pos, b.cell, b.pbc, b.batch, 12.0, 20, natoms=b.natoms)
            edges += ei.shape[1]
        else:
            edges += b.edge_index.shape[1]
        n += b.num_graphs
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return n / dt, edges / max(n, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.data_loading", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--quick", action="store_true", help="few steps (smoke test)")
    ap.add_argument("--data", default=None, help="data set path (default: packaged demo train split)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads of the main process (workers use 1)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = open_dataset(args.data) if args.data else open_dataset(demo_path("train"))
    steps = 8 if args.quick else 60
    bs = args.batch_size
    natoms = float(torch.tensor([ds[i]["pos"].shape[0] for i in range(min(len(ds), 64))]).float().mean())
    print(
        f"data: {args.data or 'demo/train'} ({len(ds)} structures, ~{natoms:.0f} atoms each), batch {bs}, "
        f"cutoff 12 Å, 20 neighbours, torch threads {torch.get_num_threads()}"
    )

    # stages alone
    t0 = time.perf_counter()
    k = min(len(ds), 16 if args.quick else 128)
    items = [ds[i] for i in range(k)]
    t_read = (time.perf_counter() - t0) / k
    t0 = time.perf_counter()
    batches = [collate(items[i : i + bs]) for i in range(0, k - bs + 1, bs)]
    t_coll = (time.perf_counter() - t0) / (len(batches) * bs)
    t0 = time.perf_counter()
    for b in batches:
        b = b.to(args.device)
        radius_graph_pbc(b.pos, b.cell, b.pbc, b.batch, 12.0, 20, natoms=b.natoms)
    if args.device == "cuda":
        torch.cuda.synchronize()
    t_graph = (time.perf_counter() - t0) / (len(batches) * bs)
    print()
    print(f"| stage ({args.device} graph) | ms / structure | structures / s |")
    print("|---|---:|---:|")
    for name, t in (("read (LMDB + unpickle)", t_read), ("collate", t_coll), ("radius graph", t_graph)):
        print(f"| {name} | {1e3 * t:.2f} | {1 / t:.0f} |")

    print()
    print("| workers | graph built in | structures / s | edges / structure |")
    print("|---:|---|---:|---:|")
    for workers in (0, 1, 2):
        for in_loader in (False, True):
            if in_loader and args.device != "cpu":
                continue
            rate, epg = _run(ds, workers, bs, steps, in_loader, args.device)
            where = "loader workers" if in_loader else f"main process ({args.device})"
            print(f"| {workers} | {where} | {rate:.1f} | {epg:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
