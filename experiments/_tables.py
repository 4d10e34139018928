"""Shared machinery of the table scripts ``experiments/table*.py``: runs, collection, rendering, paper numbers.

A table script describes one table of the paper (its columns, and per row the paper's numbers and the runs
behind each of our cells) and hands it to :func:`main`, which

1. plans one training run per experiment of the table: ``python -m dens.train +experiment=NAME
   trainer.run_dir=<runs-dir>/NAME`` plus the Hydra overrides given on the command line (the data paths,
   ``???`` in the configs), or ``python -m torch.distributed.run`` (``torchrun``) for several GPUs;
2. trains every run that is not finished; a killed run resumes from its ``checkpoints/last.pt``
   (``trainer.resume=auto``), and a run counts as finished once ``<run_dir>/FINISHED`` exists, written when
   the training command succeeded. ``--slurm`` writes (and prints) one sbatch script per run instead, and
   ``--submit`` submits them; run the script again afterwards to collect;
3. collects what the table reports from each run directory: the metrics of ``checkpoints/best.pt`` (EMA
   weights) on the splits given with ``--eval NAME=PATH`` (OC20/OC22) or on the MD17 test split, through
   :func:`dens.evaluate.evaluate` and, for IS2RE, :func:`dens.relax.relax_dataset`, cached in
   ``<run_dir>/eval``; the parameter count; and the training time (GPU-hours) and throughput, from the
   wall time and world size the trainer logs in ``metrics.jsonl`` (see :func:`training_summary`);
4. prints the table in the paper's layout, ``paper / ours`` in every cell, and writes it to ``--out`` as
   Markdown, CSV and JSON (with every run's raw results).

``--dry-run`` prints the plan (commands, GPUs and GPU-hours of the paper, the data each run still needs) and
runs nothing; ``--smoke`` runs the same pipeline with tiny models for two steps on the embedded demo data
(OC20 / OC22 tables) or a slice of the MD17 samples in ``../shared/data``, on the CPU.

The machinery lives in one module per job, and this one holds the command line and re-exports the rest
(``import _tables as T``): ``_paper`` (the paper's numbers and runs), ``_table_model`` (columns, cells,
rows and rendering), ``_launch`` (commands, SLURM scripts, run states), ``_collect`` (evaluations and
training cost of a run) and ``_smoke`` (tiny models and data for ``--smoke``).

A cell shows ``n/a`` with a numbered reason where the library cannot produce the number (e.g. the hidden
OC20 test labels: the prediction files for the evaluation server are written instead) and ``–`` where a run
or an evaluation is missing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _collect import EvalOptions, RunEvaluator, TotalEnergy, collect_run, read_metrics, training_summary
from _launch import (
    Plan,
    _layout,
    check_data,
    experiment_config,
    missing_keys,
    run_status,
    slurm_script,
    train,
    train_all,
    write_slurm,
)
from _paper import (
    A5000,
    CHECK,
    MOLECULE_TITLES,
    MOLECULES,
    OC20_IS2RE_TEST,
    OC20_SERVER,
    OC20_TEST,
    OC20_VAL,
    OC22_IS2RE_TEST,
    OC22_SERVER,
    OC22_TEST,
    OC22_VAL,
    PAPER,
    PAPER_TRAINING,
    REPO,
    RUNS,
    SHARED_DATA,
    V100,
    Run,
    hidden_labels,
    paper,
)
from _smoke import SMOKE_MODELS, SMOKE_TRAINER, smoke_model_overrides, smoke_setup
from _table_model import (
    Cell,
    Column,
    Rendered,
    Row,
    Table,
    _mean,
    cells,
    mark_columns,
    marks,
    md17_cells,
    md17_columns,
    paper_row,
    render,
)

import dens.train  # noqa: F401  (registers the demo_path resolver of the configs)
from dens.data import (
    MD17_MOLECULES,
)


# ==================================================================================================
# The command line
# ==================================================================================================
def _parser(table: Table, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run", action="store_true", help="print the plan and the paper's cost; run nothing"
    )
    mode.add_argument("--smoke", action="store_true", help="the whole pipeline with tiny models on CPU")
    mode.add_argument("--slurm", action="store_true", help="write and print one sbatch script per run")
    mode.add_argument("--collect-only", action="store_true", help="train nothing; evaluate and tabulate")
    p.add_argument("--submit", action="store_true", help="with --slurm: submit the scripts with sbatch")
    p.add_argument("--runs-dir", default="runs", help="run directories: RUNS_DIR/<experiment>")
    p.add_argument("--out", default=None, help="output folder (default RUNS_DIR/tables; smoke: a temp dir)")
    p.add_argument(
        "--only", action="append", default=None, metavar="EXPERIMENT", help="restrict to these runs"
    )
    p.add_argument(
        "--gpus", type=int, default=None, help="local GPUs (default: all visible; at most the paper's)"
    )
    p.add_argument("--gpus-per-node", type=int, default=8, help="SLURM: GPUs per node")
    p.add_argument(
        "--time", default="72:00:00", help="SLURM: time limit per job (jobs resume when resubmitted)"
    )
    p.add_argument(
        "--sbatch", action="append", default=[], metavar="OPTION", help="SLURM: extra #SBATCH line"
    )
    p.add_argument("--device", default=None, help="evaluation device (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=8, help="evaluation batch size")
    if table.eval_splits:
        p.add_argument(
            "--eval",
            action="append",
            default=[],
            metavar="SPLIT=PATH",
            help=f"evaluation data; SPLIT in {', '.join(table.eval_splits)}",
        )
    if any(r.dataset == "md17" for r in table.runs):
        p.add_argument(
            "--data-dir", default="data/md17", help="folder of the MD17 .npz files (md17_<molecule>.npz)"
        )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides for every run (data paths)"
    )
    return p


def _eval_splits(table: Table, parser: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, str]:
    splits = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name not in table.eval_splits:
            parser.error(f"--eval {item!r}: expected SPLIT=PATH with SPLIT in {', '.join(table.eval_splits)}")
        splits[name] = path
    return splits


def _local_gpus(requested: int | None) -> int:
    if requested is not None:
        return max(1, requested)
    return max(1, torch.cuda.device_count())


def _plans(args: argparse.Namespace, runs: Sequence[Run], extra: Callable[[Run], list[str]]) -> list[Plan]:
    gpus = 1 if args.smoke else _local_gpus(args.gpus)
    plans = []
    for run in runs:
        overrides = [*extra(run), *args.overrides]
        plans.append(Plan(run, Path(args.runs_dir) / run.experiment, overrides, min(gpus, run.gpus)))
    return plans


def _md17_data(args: argparse.Namespace) -> Callable[[Run], list[str]]:
    def data(run: Run) -> list[str]:
        if run.molecule is None:
            return []
        return [f"data.path={Path(args.data_dir) / MD17_MOLECULES[run.molecule]}"]

    return data


def _hours(run: Run) -> str:
    if run.gpu_hours is None:
        return "not reported"
    note = f" ({run.hours_note})" if run.hours_note else ""
    return f"{run.gpu_hours:g} GPU-hours{note}"


def print_plan(table: Table, plans: Sequence[Plan], options: EvalOptions, gpus_per_node: int) -> None:
    """The dry run: per run the command, the paper's GPUs and GPU-hours, missing data and evaluations."""
    print(f"{table.title}: {len(plans)} runs")
    for i, plan in enumerate(plans, 1):
        run = plan.run
        print(f"[{i}/{len(plans)}] {run.experiment}  ({run_status(plan.run_dir)})")
        print(f"    paper:  {run.gpus} x {run.gpu_type}, {_hours(run)}")
        print(f"    train:  {shlex.join(plan.command())}")
        nodes, per_node = _layout(run.gpus, gpus_per_node)
        print(f"    slurm:  {nodes} node(s) x {per_node} GPU(s) (--slurm writes the sbatch script)")
        if plan.nproc != run.gpus:
            print(
                f"            ({plan.nproc} local process(es) instead of the paper's {run.gpus} GPUs: the global "
                "batch stays the config's; add trainer.grad_accumulation=K to keep the per-GPU batch)"
            )
        needs = missing_keys(run.experiment, plan.overrides)
        if needs:
            print(f"    needs:  {', '.join(needs)} (give them as KEY=VALUE overrides)")
        if run.dataset == "md17":
            print(
                "    eval:   best.pt on the MD17 test split (the structures after the 950 / 50 split, seed 1)"
            )
        elif table.eval_splits:
            given = [s for s in table.eval_splits if s in options.splits]
            absent = [s for s in table.eval_splits if s not in options.splits]
            print(
                f"    eval:   best.pt on {', '.join(given) or 'no split yet'}"
                + (f" (not given: {', '.join(absent)}; --eval SPLIT=PATH)" if absent else "")
            )
    reported = [p.run.gpu_hours for p in plans if p.run.gpu_hours is not None]
    md17 = " (MD17: the per-molecule means of Table 4)" if any(p.run.molecule for p in plans) else ""
    print(
        f"paper total: {sum(reported):,.0f} GPU-hours over the {len(reported)} of {len(plans)} runs with a "
        f"reported time{md17}"
    )


def _check_complete(table: Table, results: Mapping[str, Mapping[str, Any]], trained: set[str]) -> list[str]:
    """Cells of the trained runs that got no number (a smoke run must fill every one)."""
    empty = []
    for row in table.rows:
        for col, cell in zip(table.columns, row.cells, strict=True):
            if cell.runs and not cell.na and set(cell.runs) <= trained:
                if _mean([results[r].get(cell.key) for r in cell.runs]) is None:
                    empty.append(f"{row.label} / {col.name} ({cell.key})")
    return empty


def write_outputs(table: Table, rendered: Rendered, results: Mapping[str, Any], out: Path) -> list[Path]:
    """``<out>/<table>.md``, ``.csv`` and ``.json`` (the paper's rows and every run's results)."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{table.name}.{ext}" for ext in ("md", "csv", "json")]
    files[0].write_text(rendered.markdown)
    files[1].write_text(rendered.csv)
    files[2].write_text(
        json.dumps({"paper": PAPER.get(table.name, {}), "runs": results}, indent=2, default=str)
    )
    return files


@dataclass(frozen=True)
class Extension:
    """What a table script adds to :func:`main` (Table 10: molecular dynamics with the trained models).

    Attributes
    ----------
    add_arguments : callable
        ``(parser)``: adds the script's own options.
    dry_run : callable
        ``(args, plans)``: printed after the plan of ``--dry-run``.
    collect : callable
        ``(args, plan, options, result) -> dict``: further result keys of one run.
    """

    add_arguments: Callable[[argparse.ArgumentParser], None]
    dry_run: Callable[[argparse.Namespace, Sequence[Plan]], None]
    collect: Callable[[argparse.Namespace, Plan, EvalOptions, Mapping[str, Any]], dict[str, Any]]


def main(
    table: Table, argv: Sequence[str] | None = None, doc: str = "", extension: Extension | None = None
) -> int:
    """Run, resume or plan the table's runs, collect their results and write the table (see the module doc)."""
    parser = _parser(table, doc)
    if extension is not None:
        extension.add_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    splits = _eval_splits(table, parser, getattr(args, "eval", []))
    if args.submit and not args.slurm:
        parser.error("--submit goes with --slurm")
    runs = [r for r in table.runs if args.only is None or r.experiment in args.only]
    if args.only and len(runs) != len(set(args.only)):
        parser.error(f"--only: the runs of {table.name} are {[r.experiment for r in table.runs]}")
    t0 = time.perf_counter()
    title = table.title
    if args.smoke:
        out = Path(args.out or tempfile.mkdtemp(prefix=f"dens_{table.name}_smoke_"))
        args.runs_dir = str(out / "runs")
        runs, extra, options = smoke_setup(table, runs, out / "smoke_data")
        title += " (SMOKE: tiny models, 2 CPU steps on demo/sample data; not comparable)"
    else:
        out = Path(args.out or Path(args.runs_dir) / "tables")
        extra = _md17_data(args) if hasattr(args, "data_dir") else (lambda run: [])
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        options = EvalOptions(splits, device, args.batch_size)
    plans = _plans(args, runs, extra)
    if args.dry_run:
        print_plan(table, plans, options, args.gpus_per_node)
        if extension is not None:
            extension.dry_run(args, plans)
        return 0
    if args.slurm:
        write_slurm(plans, args, out / "slurm")
        return 0
    failed = [] if args.collect_only else train_all(plans, args.smoke)
    results = {p.run.experiment: collect_run(p.run, p.run_dir, options, table.relax_preset) for p in plans}
    for plan in plans if extension is not None else []:
        result = results[plan.run.experiment]
        result.update(extension.collect(args, plan, options, result))
    rendered = render(table, results, title)
    print(rendered.text)
    if table.eval_splits and not options.splits:
        print(f"note: no --eval SPLIT=PATH given ({', '.join(table.eval_splits)}): no evaluation columns")
    for name, res in results.items():
        for note in res["notes"]:
            print(f"note: {name}: {note}")
        for file in res["files"]:
            if Path(file).name.startswith("submission_"):
                print(f"for the evaluation server: {file}")
    files = write_outputs(table, rendered, results, out)
    print(f"wrote {', '.join(map(str, files))} ({time.perf_counter() - t0:.0f} s)")
    if failed:
        print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
        return 1
    empty = _check_complete(table, results, {p.run.experiment for p in plans}) if args.smoke else []
    if empty:
        print("smoke: no number in " + "; ".join(empty), file=sys.stderr)
        return 1
    return 0


#: The names the table scripts use (``import _tables as T``), from the modules above.
__all__ = [
    "A5000",
    "CHECK",
    "MOLECULES",
    "MOLECULE_TITLES",
    "OC20_IS2RE_TEST",
    "OC20_SERVER",
    "OC20_TEST",
    "OC20_VAL",
    "OC22_IS2RE_TEST",
    "OC22_SERVER",
    "OC22_TEST",
    "OC22_VAL",
    "PAPER",
    "PAPER_TRAINING",
    "REPO",
    "RUNS",
    "SHARED_DATA",
    "SMOKE_MODELS",
    "SMOKE_TRAINER",
    "V100",
    "Cell",
    "Column",
    "EvalOptions",
    "Plan",
    "Rendered",
    "Row",
    "Run",
    "RunEvaluator",
    "Table",
    "TotalEnergy",
    "cells",
    "check_data",
    "collect_run",
    "experiment_config",
    "hidden_labels",
    "main",
    "mark_columns",
    "marks",
    "md17_cells",
    "md17_columns",
    "missing_keys",
    "paper",
    "paper_row",
    "read_metrics",
    "render",
    "run_status",
    "slurm_script",
    "smoke_model_overrides",
    "smoke_setup",
    "train",
    "train_all",
    "training_summary",
    "write_slurm",
]
