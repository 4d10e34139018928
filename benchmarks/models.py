"""Training and inference speed and memory of every model, with DeNS on and off (figures, not tests).

``python -m benchmarks.models [--quick] [--models eqv2_oc20_2m,...] [--dens off,on] [--compile off,on]
[--compile-backend inductor|aot_eager] [--amp none,bf16,fp16] [--device cpu|cuda] [--threads N]
[--batch-size N] [--warmup N] [--repeats N] [--malloc retain|default] [--json out.json]``

Models: EquiformerV2 ``eqv2_oc20_2m`` (83M; 89M with DeNS), ``eqv2_oc20_all_md`` (153M / 160M) and
``eqv2_oc20_31m``; eSCN ``escn_oc20_2m`` (52M); Equiformer ``equiformer_md17_l2`` / ``_l3`` (3.5M / 5.5M;
4.0M / 6.4M with DeNS). DeNS on is the ``dens=True`` model trained with the DeNS objective of its paper
configuration (``dens/conf/dens``) with ``p_DeNS = 1``, so every structure is corrupted; DeNS off is the
baseline model with the plain S2EF loss. Losses and optimiser follow ``dens/conf/optim``.

Batches: OC20 models the two OC20 structures of the official timing (``random1000103``, 55 atoms, and
``random1000138``, 66 atoms; 2420 edges at 12 Å / 20 neighbours), Equiformer 8 rMD17 aspirin frames (21
atoms, all pairs within 5 Å; the paper's Lmax 2 batch). ``--batch-size N`` takes N structures instead
(OC20: the first frames of the other relaxations of ``../shared/data/oc20/oc20_dft_relax_20sys.npz``), to
fill a GPU.

Each case (model, DeNS, compile, amp) runs in its own process, forked from a server that has imported
torch and dens once (so a case costs no import time, and its peak memory is its own). It measures:

- ``graph``: building the radius graph (part of both phases below, as in training and inference).
- ``infer``: ``ForceField.predict`` in eval mode (``no_grad`` for direct forces; gradient forces need
  grad), the graph built inside, as the ASE calculator and validation run it.
- ``train``: one ``dens.trainer.Trainer.train_step``, the trainer's own step: DeNS corruption, graph,
  forward with each DeNS head run only where the loss reads it, loss, backward, gradient clipping,
  AdamW, schedule and EMA as the configuration says.

Times are medians over ``--repeats`` calls after ``--warmup`` calls; the first call is reported on its own:
with ``--compile on`` it includes compiling the backbone as the trainer does (``compile_backbone``: in
place, block by block, dynamic shapes; the wrapper stays eager; a gradient-force model's training step
compiles its energy with its gradient, ``compile_backbone(training=True)``, on a copy of the model). ``--compile-backend aot_eager`` traces
without generating code, to check quickly that a model compiles. Peak memory of a phase: CUDA
``max_memory_allocated`` (weights, optimiser state, activations); CPU the peak resident set size above the
one before the model was built, less the library code paged in meanwhile. A phase that fails (e.g.
a model that does not compile) is recorded with its error, and the run goes on. On
CUDA, training structures per GPU-second are printed beside the EquiformerV2 paper's V100 figures.

On the CPU each case first calls :func:`dens.runtime.retain_freed_memory`, as the trainer does, so freed
memory is reused instead of being unmapped and page-faulted back at every step; ``--malloc default``
measures glibc's default behaviour instead.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._machine import checkout, competing_load, cpu_name, describe, header

if TYPE_CHECKING:
    import torch

    from dens.models import ForceField
    from dens.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "dens" / "conf"
OC20_NPZ = REPO.parent / "shared" / "data" / "oc20" / "oc20_dft_relax_20sys.npz"
ASPIRIN_XYZ = REPO.parent / "shared" / "data" / "md17" / "rmd17_aspirin_1000_meV.xyz"
OFFICIAL_OC20 = ("random1000103", "random1000138")  # the structures of the official timing
ASPIRIN_Z = [6] * 9 + [8] * 4 + [1] * 8  # C9H8O4
PRELOAD = ["numpy", "torch", "dens.data", "dens.losses", "dens.models", "dens.trainer"]

_TINY_EQV2 = dict(grid_resolution=8, sphere_channels=16, attn_hidden_channels=16, num_heads=2,
                  attn_alpha_channels=8, attn_value_channels=8, ffn_hidden_channels=16,
                  edge_channels=16)  # fmt: skip
_TINY_L2 = dict(irreps_node_embedding="16x0e+8x1e+4x2e", irreps_head="8x0e+4x1e+2x2e",
                irreps_mlp_mid="16x0e+8x1e+4x2e", num_layers=2, num_heads=2, fc_neurons=[16, 16])  # fmt: skip
_TINY_L3 = dict(irreps_node_embedding="16x0e+8x1e+8x2e+4x3e", irreps_head="8x0e+4x1e+4x2e+2x3e",
                irreps_mlp_mid="16x0e+8x1e+8x2e+4x3e", num_layers=2, num_heads=2,
                fc_neurons=[16, 16])  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model: its preset, graph rule, training configuration and tiny ``--quick`` size."""

    family: str  # eqv2 | escn | equiformer
    preset: str
    cutoff: float
    max_neighbors: int | None
    optim: str  # dens/conf/optim/<optim>.yaml
    dens: str  # dens/conf/dens/<dens>.yaml (with p_DeNS = 1)
    quick: dict[str, Any]
    quick_dens: dict[str, Any] = field(default_factory=dict)  # added to ``quick`` for the DeNS model
    batch_size: int = 2
    paper_throughput: dict[bool, float] = field(default_factory=dict)  # DeNS -> structures / V100-second
    paper_dens_overhead: float | None = None  # training time with / without DeNS


MODELS: dict[str, ModelSpec] = {
    "eqv2_oc20_2m": ModelSpec(
        "eqv2", "oc20_2m", 12.0, 20, "oc20_2m", "oc20_2m", dict(_TINY_EQV2, num_layers=2, lmax=2, mmax=1),
        paper_dens_overhead=1.074,  # §4.1.1: DeNS "only increases training time by 7.4%"
    ),
    "eqv2_oc20_all_md": ModelSpec(
        "eqv2", "oc20_all_md", 12.0, 20, "oc20_all_md", "oc20_all_md",
        dict(_TINY_EQV2, num_layers=2, lmax=3, mmax=2), paper_throughput={False: 1.8, True: 1.8},  # Table 2
    ),
    "eqv2_oc20_31m": ModelSpec(
        "eqv2", "oc20_31m", 12.0, 20, "oc20_all_md", "oc20_all_md",
        dict(_TINY_EQV2, num_layers=1, lmax=2, mmax=1),
        paper_throughput={False: 7.1},  # Table 2
    ),
    "escn_oc20_2m": ModelSpec(
        "escn", "oc20_2m", 12.0, 20, "escn_oc20_2m", "oc20_2m",
        dict(num_layers=2, lmax=2, mmax=1, sphere_channels=16, hidden_channels=16, edge_channels=16,
             num_sphere_samples=16),
    ),
    "equiformer_md17_l2": ModelSpec(
        "equiformer", "md17_l2", 5.0, None, "md17", "md17", dict(_TINY_L2, irreps_feature="32x0e"),
        dict(irreps_feature="32x0e+16x1e+8x2e", irreps_pre_attn=_TINY_L2["irreps_node_embedding"]),
        batch_size=8, paper_dens_overhead=19 / 17,  # Table 4: 17 vs 19 A5000 GPU-hours
    ),
    "equiformer_md17_l3": ModelSpec(
        "equiformer", "md17_l3", 5.0, None, "md17_l3", "md17", dict(_TINY_L3, irreps_feature="32x0e"),
        dict(irreps_feature="32x0e+16x1e+16x2e+8x3e", irreps_pre_attn=_TINY_L3["irreps_node_embedding"]),
        batch_size=8, paper_dens_overhead=61 / 59,  # Table 4: 59 vs 61 A5000 GPU-hours
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One measurement: a model with DeNS on or off, eager or compiled, fp32 or bf16/fp16 autocast."""

    model: str
    dens: bool
    compile: bool
    backend: str  # torch.compile backend (inductor; aot_eager traces without code generation)
    amp: str  # none | bf16 | fp16 (training: the trainer's AMP, with its gradient scaler for fp16)
    device: str
    threads: int | None
    batch_size: int | None
    quick: bool
    warmup: int
    repeats: int
    retain_memory: bool = True  # dens.runtime.retain_freed_memory, as the trainer does on the CPU


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def oc20_structures(count: int) -> list[dict[str, Any]]:
    """``count`` OC20 structures: the two of the official timing, then the first frames of the other
    relaxations (later frames once every system is used); demo frames when ``../shared`` is absent."""
    from dens.data import make_structure

    if not OC20_NPZ.exists():
        from dens.data.demo import demo_dataset

        demo = demo_dataset("train")
        return [demo[i % len(demo)] for i in range(count)]
    d = np.load(OC20_NPZ, allow_pickle=True)
    sids = [str(s) for s in d["sid"]]
    order = [sids.index(s) for s in OFFICIAL_OC20] + [i for i, s in enumerate(sids) if s not in OFFICIAL_OC20]
    system_atoms = np.concatenate([[0], np.cumsum(d["natoms"])])  # per-system arrays
    frame_atoms = np.concatenate([[0], np.cumsum(d["natoms"][d["frame_system"]])])  # per-frame arrays
    offsets = d["system_frame_offsets"]
    items = []
    for k in range(count):
        s = order[k % len(order)]
        frame = int(offsets[s] + (k // len(order)) % (offsets[s + 1] - offsets[s]))
        atoms = slice(system_atoms[s], system_atoms[s + 1])
        rows = slice(frame_atoms[frame], frame_atoms[frame + 1])
        items.append(
            make_structure(
                d["positions"][rows], d["atomic_numbers"][atoms], cell=d["cell"][s], pbc=[True, True, True],
                fixed=d["fixed"][atoms], energy=float(d["energy"][frame]), forces=d["forces"][rows],
                sid=sids[s], fid=int(d["frame_index"][frame]),
            )
        )  # fmt: skip
    return items


def aspirin_structures(count: int) -> list[dict[str, Any]]:
    """``count`` rMD17 aspirin frames in eV and Å (jittered copies of one random frame without ../shared)."""
    import torch

    from dens.data import make_structure
    from dens.data.ase_io import read_ase_file

    if ASPIRIN_XYZ.is_file():
        return read_ase_file(ASPIRIN_XYZ, f":{count}", "meV", "Å")
    g = torch.Generator().manual_seed(0)
    base = torch.rand(len(ASPIRIN_Z), 3, generator=g) * 5.0
    return [
        make_structure(base + 0.05 * torch.randn(base.shape, generator=g), ASPIRIN_Z, energy=0.0,
                       forces=torch.randn(base.shape, generator=g))
        for _ in range(count)
    ]  # fmt: skip


def build_model(spec: ModelSpec, dens: bool, quick: bool, energy_mean: float) -> ForceField:
    """The ForceField of a spec: the preset (tiny with ``quick``), with the DeNS parts when ``dens``."""
    from dens.models import ESCN, Equiformer, EquiformerV2, ForceField

    backbone_cls = {"eqv2": EquiformerV2, "escn": ESCN, "equiformer": Equiformer}[spec.family]
    overrides = {**spec.quick, **(spec.quick_dens if dens else {})} if quick else {}
    try:
        backbone = backbone_cls.from_preset(spec.preset, dens_heads=dens, **overrides)
    except TypeError:  # a revision from before the name dens_heads (--versus)
        backbone = backbone_cls.from_preset(spec.preset, dens=dens, **overrides)
    return ForceField(backbone, spec.cutoff, spec.max_neighbors, energy_mean=energy_mean)


# --------------------------------------------------------------------------------------------------
# Measurement (in the case's own process)
# --------------------------------------------------------------------------------------------------
def _status_mb(key: str) -> float:
    """A memory figure of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``RssFile``) in MiB (Linux)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", status).group(1)) / 1024


def _resident_data_mb() -> float:
    """Resident memory less the file pages (library code) paged in so far."""
    return _status_mb("VmRSS") - _status_mb("RssFile")


def _reset_peak(device: torch.device) -> None:
    """Start a new peak-memory measurement."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _peak_mb(device: torch.device, base_mb: float) -> float:
    """Peak memory since :func:`_reset_peak` (CPU: above ``base_mb``), in MiB."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_mb("VmHWM") - _status_mb("RssFile") - base_mb  # library code paged in is not data


def _describe(exc: BaseException) -> str:
    """An exception's type and first line, and where its root cause was raised when it has one."""
    text = str(exc).strip()
    out = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".strip()
    root = exc
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    frames = traceback.extract_tb(root.__traceback__)
    if root is not exc and frames:
        where = frames[-1]
        out += (
            f" (cause: {type(root).__name__} at {Path(where.filename).name}:{where.lineno} in {where.name})"
        )
    return out


def _measure(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int, base_mb: float) -> dict:
    """First-call time, median time over ``repeats`` after ``warmup`` calls, and peak memory of ``fn``."""
    import torch

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    _reset_peak(device)
    try:
        first = timed()
        for _ in range(warmup - 1):
            timed()
        times = [timed() for _ in range(repeats)]
    except Exception as exc:  # a failed phase is a result (e.g. a model that does not compile)
        detail = "".join(traceback.format_exception(exc))[-3000:]  # the innermost frames
        return {"error": _describe(exc), "error_detail": detail}
    return {
        "first_s": first,
        "s": statistics.median(times),
        "times": times,
        "peak_mb": _peak_mb(device, base_mb),
    }


def _trainer(
    model: ForceField, items: list[dict[str, Any]], spec: ModelSpec, case: Case, run_dir: str
) -> Trainer:
    """A :class:`dens.trainer.Trainer` over exactly this batch, with the model's paper configuration."""
    import yaml

    from dens.data import InMemoryDataset
    from dens.losses import DeNSSettings
    from dens.trainer import OptimSettings, Trainer, TrainerSettings

    optim = yaml.safe_load((CONF / "optim" / f"{spec.optim}.yaml").read_text())
    optim = OptimSettings(**{**optim, "batch_size": len(items)})
    if case.dens:
        dens = yaml.safe_load((CONF / "dens" / f"{spec.dens}.yaml").read_text())
        dens = DeNSSettings.from_dict({**dens, "prob": 1.0})
    else:
        dens = DeNSSettings.from_dict(yaml.safe_load((CONF / "dens" / "off.yaml").read_text()))
    settings = TrainerSettings(
        run_dir=run_dir, device=case.device, amp=None if case.amp == "none" else case.amp, resume=None,
        tensorboard=False, progress_bar=False, retain_freed_memory=case.retain_memory,
    )  # fmt: skip
    return Trainer(model, InMemoryDataset(items), None, optim, dens, settings)


def run_case(case: Case) -> dict[str, Any]:
    """Build the model and batch of a case, then measure graph building, inference and training."""
    import torch

    from dens.data import collate
    from dens.models import compile_backbone
    from dens.runtime import retain_freed_memory

    if case.threads:
        torch.set_num_threads(case.threads)
    if case.retain_memory and case.device == "cpu":
        retain_freed_memory()
    torch.manual_seed(0)
    device = torch.device(case.device)
    spec = MODELS[case.model]
    count = case.batch_size or spec.batch_size
    items = oc20_structures(count) if spec.family != "equiformer" else aspirin_structures(count)
    batch = collate(items).to(device)
    energy_mean = float(batch.energy.double().mean())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    base_mb = _resident_data_mb() if device.type == "cpu" else 0.0
    model = build_model(spec, case.dens, case.quick, energy_mean).to(device)
    edge_index, _ = model.graph(batch)
    result: dict[str, Any] = {
        **asdict(case), "batch_size": count, "structures": batch.num_graphs, "atoms": batch.num_atoms,
        "edges": int(edge_index.shape[1]), "params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
    }  # fmt: skip
    train_model = model
    if case.compile:
        if not model.backbone.direct_forces:
            # training compiles the energy with its gradient (as the trainer); inference block by block
            train_model = copy.deepcopy(model)
            compile_backbone(train_model.backbone, training=True, backend=case.backend)
        compile_backbone(model.backbone, backend=case.backend)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(case.amp)
    autocast = torch.autocast(device.type, dtype=half or torch.bfloat16, enabled=half is not None)

    graph = _measure(lambda: model.graph(batch), device, case.warmup, case.repeats, base_mb)
    result["graph_ms"] = 1000 * graph["s"]

    def infer() -> None:
        with autocast:
            model.predict(batch)

    model.eval()
    for key, value in _measure(infer, device, case.warmup, case.repeats, base_mb).items():
        result[f"infer_{key}"] = value
    if "infer_s" in result:
        result["infer_ms_per_structure"] = 1000 * result["infer_s"] / count
        result["infer_structures_per_s"] = count / result["infer_s"]

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = _trainer(train_model, items, spec, case, run_dir)
        train = _measure(lambda: trainer.train_step([batch]), device, case.warmup, case.repeats, base_mb)
    for key, value in train.items():
        result[f"train_{key}"] = value
    if "train_s" in result:
        result["train_structures_per_s"] = count / result["train_s"]
    return result


def _case_process(case: Case, out_path: str, log_path: str) -> None:
    """Entry of a case's process: all its output (Python's and native code's) to ``log_path``, the result
    as JSON to ``out_path``."""
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        result = run_case(case)
    except Exception:
        traceback.print_exc()
        raise
    Path(out_path).write_text(json.dumps(result))


def run_in_process(context: multiprocessing.context.BaseContext, case: Case) -> dict[str, Any]:
    """Run a case in a fresh process; a crash (e.g. out of memory) becomes an ``error`` entry."""
    with tempfile.TemporaryDirectory() as tmp:
        out, log = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        process = context.Process(target=_case_process, args=(case, str(out), str(log)))
        process.start()
        try:
            process.join()
        except BaseException:  # e.g. Ctrl-C: do not leave the case running
            process.terminate()
            raise
        if out.exists():
            return json.loads(out.read_text())
        lines = log.read_text().strip().splitlines() if log.exists() else []
        last = lines[-1] if lines else "no output"
    return {**asdict(case), "error": f"process exited with code {process.exitcode}: {last}"}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    """A table cell: ``value`` formatted, or ``-`` when it was not measured."""
    return "-" if value is None else format(value, spec)


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


# table columns after model, DeNS, compile, amp: header, result key (None: a separator), format, width
COLUMNS = [
    ("params", "params", ",d", 13), ("batch", "structures", "d", 6), ("atoms", "atoms", "d", 6),
    ("edges", "edges", "d", 6), ("graph ms", "graph_ms", ".1f", 9), ("|", None, "", 2),
    ("train s", "train_s", ".3f", 9), ("struct/s", "train_structures_per_s", ".2f", 9),
    ("1st s", "train_first_s", ".2f", 8), ("peak MB", "train_peak_mb", ".0f", 9), ("|", None, "", 2),
    ("infer ms/str", "infer_ms_per_structure", ".1f", 13), ("1st s", "infer_first_s", ".2f", 8),
    ("peak MB", "infer_peak_mb", ".0f", 9),
]  # fmt: skip


def print_table(results: list[dict[str, Any]]) -> None:
    """One row per case; failed phases show their error below the table."""
    head = f"{'model':<19}{'DeNS':>5}{'comp':>5}{'amp':>5}{'thr':>4}{'load':>5}" + "".join(
        f"{h:>{w}}" for h, _, _, w in COLUMNS
    )
    print(head)
    print("-" * len(head))
    errors = []
    for r in results:
        cells = [" |" if key is None else f"{_fmt(r.get(key), fmt):>{w}}" for _, key, fmt, w in COLUMNS]
        print(
            f"{r['model']:<19}{_onoff(r['dens']):>5}{_onoff(r['compile']):>5}{r['amp']:>5}"
            f"{r.get('threads') or '-':>4}{r.get('load', 0):>5}" + "".join(cells)
        )
        name = f"{r['model']} DeNS {_onoff(r['dens'])}, compile {_onoff(r['compile'])}, amp {r['amp']}"
        errors += [
            f"  {name}, {key}: {r[key]}" for key in ("error", "infer_error", "train_error") if key in r
        ]
    if errors:
        print("failed:")
        print("\n".join(errors))


def print_comparisons(results: list[dict[str, Any]], quick: bool) -> None:
    """DeNS training-time overhead per model, and (full size, CUDA) throughput beside the paper's."""
    for r in results:
        spec = MODELS[r["model"]]
        if not r["dens"] or "train_s" not in r:
            continue
        same = ("model", "compile", "backend", "amp")
        base = next((b for b in results if not b["dens"] and "train_s" in b
                     and all(b[k] == r[k] for k in same)), None)  # fmt: skip
        if base is not None:
            paper = f" (paper: x{spec.paper_dens_overhead:.3f})" if spec.paper_dens_overhead else ""
            print(f"DeNS training time, {r['model']} compile {_onoff(r['compile'])} amp {r['amp']}: "
                  f"x{r['train_s'] / base['train_s']:.3f}{paper}")  # fmt: skip
    for r in results:
        paper = MODELS[r["model"]].paper_throughput.get(r["dens"])
        if paper and r["device"].startswith("cuda") and not quick and "train_structures_per_s" in r:
            print(f"{r['model']} DeNS {_onoff(r['dens'])}, compile {_onoff(r['compile'])}, amp {r['amp']}: "
                  f"{r['train_structures_per_s']:.2f} structures per GPU-second on {r['device_name']} "
                  f"(paper, V100: {paper})")  # fmt: skip


def print_ratios(results: list[dict[str, Any]], then: list[dict[str, Any]], revision: str | None) -> None:
    """Training time with 2+ threads over 1 thread per load, and now over ``revision`` per case."""
    same = ("model", "dens", "compile", "amp", "load")
    ones = {tuple(r[k] for k in same): r for r in results if r.get("threads") == 1 and "train_s" in r}
    for r in results:
        one = ones.get(tuple(r[k] for k in same))
        if one is not None and r is not one and "train_s" in r:
            print(f"threads {r['model']} DeNS {_onoff(r['dens'])} load {r['load']}: {r['threads']} threads / 1 "
                  f"thread x{r['train_s'] / one['train_s']:.2f} (training step)")  # fmt: skip
    for r in results:
        key = (*(r[k] for k in same), r.get("threads"))
        old = next(
            (t for t in then if (*(t[k] for k in same), t.get("threads")) == key and "train_s" in t), None
        )
        if old is not None and "train_s" in r:
            print(f"against {revision}: {r['model']} DeNS {_onoff(r['dens'])} threads {r['threads']} load {r['load']}"
                  f": training x{r['train_s'] / old['train_s']:.2f}, inference "
                  f"x{r.get('infer_s', float('nan')) / old.get('infer_s', float('nan')):.2f} (now / then)")  # fmt: skip


def _run_revision(revision: str) -> list[dict[str, Any]]:
    """This benchmark again, with the same options, on dens as of ``revision`` (its results)."""
    argv, skip = [], False
    for arg in sys.argv[1:]:  # the same options less --versus and --json
        if not skip and arg.split("=")[0] not in ("--versus", "--json"):
            argv.append(arg)
        skip = arg in ("--versus", "--json")
    with checkout(revision) as root, tempfile.TemporaryDirectory() as tmp:
        (root / "benchmarks").symlink_to(REPO / "benchmarks")  # this benchmark code, that dens
        out = Path(tmp) / "then.json"
        subprocess.run([sys.executable, "-m", "benchmarks.models", *argv, "--json", str(out)], cwd=root,
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        return [{**r, "revision": revision} for r in json.loads(out.read_text())["results"]]


def _summary(r: dict[str, Any]) -> str:
    """A case's result in a few words (progress output)."""
    if "error" in r:
        return f"failed ({r['error']})"
    train = f"train {r['train_s']:.3f} s" if "train_s" in r else "train failed"
    infer = (
        f"inference {r['infer_ms_per_structure']:.1f} ms/structure" if "infer_s" in r else "inference failed"
    )
    return f"{train}, {infer}"


def _machine(device: str, results: list[dict[str, Any]], malloc: str) -> dict[str, Any]:
    """What a run's figures depend on besides the options: :func:`benchmarks._machine.describe` plus torch
    and the device as the cases saw them."""
    first = next((r for r in results if "torch" in r), {})
    return {
        **describe(first.get("threads"), malloc), "platform": platform.platform(), "torch": first.get("torch"),
        "device": device, "device_name": first.get("device_name"),
    }  # fmt: skip


def _choices(text: str, allowed: list[str]) -> list[str]:
    values = [v for v in text.split(",") if v]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {allowed}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny models, one repeat, no compile (seconds)")
    parser.add_argument("--models", type=lambda s: _choices(s, list(MODELS)), default=list(MODELS))
    parser.add_argument("--dens", type=lambda s: _choices(s, ["off", "on"]), default=["off", "on"])
    parser.add_argument("--compile", type=lambda s: _choices(s, ["off", "on"]), default=None,
                        help="default: off with --quick, else off,on")  # fmt: skip
    parser.add_argument("--amp", type=lambda s: _choices(s, ["none", "bf16", "fp16"]), default=None,
                        help="default: none on CPU, none,bf16,fp16 on CUDA")  # fmt: skip
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (aot_eager: traces without generating code)")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=lambda t: [int(v) for v in t.split(",")], default=[None],
                        help="torch CPU threads, a comma list (e.g. 1,2; default: torch's)")  # fmt: skip
    parser.add_argument("--load", type=lambda t: [int(v) for v in t.split(",")], default=[0],
                        help="busy processes competing for the cores during the cases, a comma list (e.g. 0,1)")  # fmt: skip
    parser.add_argument("--versus", default=None, metavar="REV",
                        help="also run every case with dens as of git revision REV (same invocation) and print "
                             "the time ratios")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=None,
                        help="structures per batch (default: 2 for OC20 models, 8 for MD17)")  # fmt: skip
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="calls before timing, the first reported on its own (default 2; 1 with --quick)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 5; 1 with --quick)")
    parser.add_argument("--malloc", choices=["retain", "default"], default="retain",
                        help="CPU: retain freed memory as the trainer does (dens.runtime), or glibc's default")  # fmt: skip
    parser.add_argument("--json", default=None, help="write the machine, options and results here")
    args = parser.parse_args()
    compile_modes = args.compile or (["off"] if args.quick else ["off", "on"])
    amps = args.amp or (["none", "bf16", "fp16"] if args.device.startswith("cuda") else ["none"])
    warmup = max(1, args.warmup or (1 if args.quick else 2))
    repeats = max(1, args.repeats or (1 if args.quick else 5))

    options = {k: v for k, v in vars(args).items() if k != "json"}
    options.update(compile=compile_modes, amp=amps, warmup=warmup, repeats=repeats)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    for load in args.load:
        with competing_load(load):
            for model, dens, compiled, amp, threads in itertools.product(
                args.models, args.dens, compile_modes, amps, args.threads
            ):
                case = Case(model, dens == "on", compiled == "on", args.compile_backend, amp, args.device,
                            threads, args.batch_size, args.quick, warmup, repeats, args.malloc == "retain")  # fmt: skip
                results.append({**run_in_process(context, case), "load": load, "revision": "now"})
                print(f"  {model} DeNS {dens} compile {compiled} amp {amp} threads {threads} load {load}: "
                      f"{_summary(results[-1])}", file=sys.stderr)  # fmt: skip
                if args.json:  # after every case, so that an interrupted run keeps what it measured
                    payload = {"machine": _machine(args.device, results, args.malloc), "options": options,
                               "wall_s": time.perf_counter() - start, "results": results}  # fmt: skip
                    Path(args.json).write_text(json.dumps(payload, indent=2))
    then = _run_revision(args.versus) if args.versus else []
    wall = time.perf_counter() - start

    machine = _machine(args.device, results, args.malloc)
    size = "tiny models (--quick)" if args.quick else "paper sizes"
    backend = f"; compile backend {args.compile_backend}" if "on" in compile_modes else ""
    print(f"dens model benchmark: {size}, device {args.device} ({machine['device_name']}), "
          f"{machine['threads']} threads, torch {machine['torch']}; medians of {repeats} after {warmup} "
          f"warm-up{backend}; malloc {args.malloc}; wall {wall:.1f} s")  # fmt: skip
    print(header(machine))
    print_table(results)
    print_comparisons(results, args.quick)
    print_ratios(results, then, args.versus)


if __name__ == "__main__":
    main()
