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

A cell shows ``n/a`` with a numbered reason where the library cannot produce the number (e.g. the hidden
OC20 test labels: the prediction files for the evaluation server are written instead) and ``–`` where a run
or an evaluation is missing.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
import torch
from ase.build import molecule as build_molecule
from ase.calculators.emt import EMT
from omegaconf import OmegaConf
from torch import nn

import dens.train  # noqa: F401  (registers the demo_path resolver of the configs)
from dens.checkpoint import load_checkpoint
from dens.data import (
    MD17_MOLECULES,
    LinearReference,
    Subset,
    fit_linear_reference,
    load_split,
    md17_splits,
    open_dataset,
)
from dens.data.demo import demo_path
from dens.evaluate import SUBMISSION_SPLITS, average_metrics, evaluate, load_model, merge_submission
from dens.relax import RelaxSettings, relax_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CHECK = "✓"

# ==================================================================================================
# The paper's numbers, transcribed from the text of the paper (../shared/paper/dens-tmlr2024.txt)
# ==================================================================================================
#: Column order of the MD17 tables: energy (meV) and forces (meV/Å) per molecule.
MOLECULES = tuple(MD17_MOLECULES)  # the paper's order
MOLECULE_TITLES = {m: m.replace("_", " ").capitalize() for m in MOLECULES}

_EQ_L2 = "5.3 7.2 2.2 6.6 2.2 3.1 3.3 5.8 3.7 2.1 4.5 4.1 3.8 2.1 4.3 3.3"
_EQ_L2_DENS = "5.1 5.7 2.3 6.1 2.2 2.6 3.2 4.4 3.7 1.7 4.4 3.7 3.5 1.9 4.2 3.3"

#: Every table as printed: row label -> the row's entries in column order, separated by spaces ("-": no
#: entry in the paper). :func:`paper` splits a row.
PAPER: dict[str, dict[str, str]] = {
    # Table 1(a): per row, EquiformerV2 (forces meV/Å, energy meV, parameters, training GPU-hours), then the
    # same with DeNS; the last row is eSCN without and with DeNS. Validation MAEs, mean of the 4 OC20 splits.
    "table1a": {
        "12": "20.46 285 83M 1398 19.09 269 89M 1501",
        "20": "19.78 280 83M 2330 18.58 260 89M 2501",
        "30": "19.42 278 83M 3495 18.02 251 89M 3752",
        "eSCN 20": "20.61 290 52M 1802 19.14 268 52M 1829",
    },
    # Table 1(b): Index -> forces, energy.
    "table1b": {"1": "20.46 285", "2": "19.09 269", "3": "21.32 278", "4": "18.87 285", "5": "19.54 279"},
    # Table 2: throughput (samples / GPU s), S2EF val energy, forces, S2EF test energy, forces, IS2RE test energy.
    "table2": {
        "GemNet-OC-L-E": "7.5 239 22.1 230 21.0 -",
        "GemNet-OC-L-F": "3.2 252 20.0 241 19.0 -",
        "GemNet-OC-L-F+E": "- - - - - 348",
        "SCN L=6 K=16 (4-tap 2-band)": "- - - 228 17.8 328",
        "SCN L=8 K=20": "- - - 237 17.2 321",
        "eSCN L=6 K=20": "2.9 243 17.1 228 15.6 323",
        "EquiformerV2 (λE=4, 31M)": "7.1 232 16.3 228 15.5 315",
        "EquiformerV2 (λE=4, 153M)": "1.8 227 15.0 219 14.2 309",
        "EquiformerV2 + DeNS (λE=4, 160M)": "1.8 222 14.0 214 13.3 293",
    },
    # Table 3: parameters; S2EF-Total val energy ID, OOD, forces ID, OOD; the same on test; IS2RE-Total test
    # energy ID, OOD.
    "table3": {
        "GemNet-OC": "39M 545 1011 30 40 374 829 29.4 39.6 1329 1584",
        "GemNet-OC (trained on OC20 + OC22)": "39M 464 859 27 34 311 689 26.9 34.2 1200 1534",
        "eSCN": "200M - - - - 350 789 23.8 35.7 - -",
        "EquiformerV2 (λE=4, λF=100)": "122M 433 629 22.88 30.70 263.7 659.8 21.58 32.65 1119 1440",
        "EquiformerV2 + DeNS (λE=4, λF=100)": "127M 391.6 533.0 20.66 27.11 236.4 590.7 20.04 29.31 951 1282",
    },
    # Table 4: per molecule energy, forces; training time (GPU-hours, mean over molecules); parameters.
    "table4": {
        "SchNet": "16.0 58.5 3.5 13.4 3.5 16.9 5.6 28.6 6.9 25.2 8.7 36.9 5.2 24.7 6.1 24.3 - -",
        "DimeNet": "8.8 21.6 3.4 8.1 2.8 10.0 4.5 16.6 5.3 9.3 5.8 16.2 4.4 9.4 5.0 13.1 - -",
        "PaiNN": "6.9 14.7 - - 2.7 9.7 3.9 13.8 5.0 3.3 4.9 8.5 4.1 4.1 4.5 6.0 - -",
        "TorchMD-NET": "5.3 11.0 2.5 8.5 2.3 4.7 3.3 7.3 3.7 2.6 4.0 5.6 3.2 2.9 4.1 4.1 - -",
        "NequIP (Lmax=3)": "5.7 8.0 - - 2.2 3.1 3.3 5.6 4.9 1.7 4.6 3.9 4.0 2.0 4.5 3.3 - -",
        "Equiformer (Lmax=2)": f"{_EQ_L2} 17 3.50M",
        "Equiformer (Lmax=3)": "5.3 6.6 2.5 8.1 2.2 2.9 3.2 5.4 4.4 2.0 4.3 3.9 3.7 2.1 4.3 3.4 59 5.50M",
        "Equiformer (Lmax=2) + DeNS": f"{_EQ_L2_DENS} 19 4.00M",
        "Equiformer (Lmax=3) + DeNS": "5.0 5.2 2.3 6.1 2.2 2.4 3.2 4.1 3.7 1.6 4.2 3.2 3.4 1.8 4.1 2.9 61 6.35M",
    },
    # Table 5: Index -> per molecule energy, forces (Index 1 / 2 are the Lmax = 2 rows of Table 4).
    "table5": {
        "1": _EQ_L2,
        "2": _EQ_L2_DENS,
        "3": "5.2 7.7 2.4 6.2 2.3 3.9 3.3 6.2 3.8 2.2 4.1 4.7 3.3 2.4 4.2 4.4",
        "4": "5.2 6.1 2.4 6.1 2.2 2.9 3.2 5.1 3.7 1.7 4.2 3.9 3.4 2.0 4.2 3.4",
        "5": "5.3 9.3 2.4 9.2 2.3 4.5 3.4 8.2 3.7 2.4 4.2 5.5 3.3 2.9 4.2 4.8",
        "6": "5.2 7.3 2.4 8.1 2.2 3.4 3.4 6.7 3.7 1.9 4.2 4.4 3.4 2.2 4.2 3.8",
    },
    # Table 6: Index -> per molecule energy, forces (Index 1 / 2 as in Table 5).
    "table6": {
        "1": _EQ_L2,
        "2": _EQ_L2_DENS,
        "3": "8.6 9.1 2.3 6.3 2.3 3.3 3.2 5.8 7.7 6.1 5.2 10.6 3.7 2.0 5.5 6.5",
        "4": "5.1 5.8 2.3 6.1 2.3 2.6 3.2 4.5 3.7 1.7 4.8 3.6 3.7 1.9 4.2 3.3",
        "5": "5.3 6.9 2.4 6.3 2.3 3.2 3.3 5.4 3.7 2.0 4.8 4.2 4.0 2.0 4.2 3.8",
    },
    # Table 10: per molecule (aspirin, ethanol, naphthalene, salicylic acid) energy, forces, stability (ps),
    # h(r) MAE.
    "table10": {
        "Equiformer (Lmax=2)": "5.3 7.2 300 0.02 2.2 3.1 289.9 0.09 3.7 2.1 133.8 0.12 4.5 4.1 300 0.03",
        "Equiformer (Lmax=2) + DeNS": "5.1 5.7 300 0.02 2.2 2.6 300 0.09 3.7 1.7 157.2 0.12 4.4 3.7 300 0.03",
    },
}


def paper(table: str, row: str) -> tuple[str, ...]:
    """The entries of one row of :data:`PAPER`."""
    return tuple(PAPER[table][row].split())


#: ``--eval`` split names: OC20 validation (the paper averages the four), test (S2EF, IS2RE); OC22.
OC20_VAL = ("val_id", "val_ood_ads", "val_ood_cat", "val_ood_both")
OC20_TEST = ("test_id", "test_ood_ads", "test_ood_cat", "test_ood_both")
OC20_IS2RE_TEST = tuple(f"is2re_{s}" for s in OC20_TEST)
OC22_VAL = ("val_id", "val_ood")
OC22_TEST = ("test_id", "test_ood")
OC22_IS2RE_TEST = tuple(f"is2re_{s}" for s in OC22_TEST)
#: The OC20 evaluation server (the paper's footnote 1).
OC20_SERVER = "the EvalAI server (eval.ai/web/challenges/challenge-page/712)"
OC22_SERVER = "the OC22 challenge on EvalAI"


def hidden_labels(task: str, splits: Sequence[str], server: str) -> str:
    """The n/a reason of a test column: its labels are not public; what is written for the server instead."""
    kind = "is2re" if splits[0].startswith("is2re_") else "s2ef"
    return (
        f"{task} test labels are not public: with --eval for {', '.join(splits)} every run writes "
        f"<run_dir>/eval/submission_{kind}.npz, which {server} scores"
    )


#: Training cost stated outside the tables: §B.1 (OC20 S2EF-All+MD) and §C.1 (OC22), GPU-hours and parameters.
PAPER_TRAINING = {"oc20_all_md": ("88982", "160M"), "oc22": ("5082", "127M")}


# ==================================================================================================
# The runs: what each experiment cost in the paper
# ==================================================================================================
V100 = "V100 32GB"
A5000 = "A5000 24GB"


@dataclass(frozen=True)
class Run:
    """One training run of the paper: a Hydra experiment of ``dens/conf/experiment`` and its cost.

    Attributes
    ----------
    experiment : str
        The experiment name (``+experiment=NAME``).
    dataset : str
        ``oc20``, ``oc22`` or ``md17``: which evaluation applies.
    gpus : int
        GPUs of the paper's run (§B.1, §C.1, §D.2; ``OFFICIAL_SETTINGS.md``).
    gpu_type : str
        The paper's GPU.
    gpu_hours : float, optional
        Training time the paper reports (``None``: not reported).
    hours_note : str
        What the reported time is (e.g. a mean over molecules).
    molecule : str, optional
        The MD17 molecule.
    """

    experiment: str
    dataset: str
    gpus: int
    gpu_type: str
    gpu_hours: float | None = None
    hours_note: str = ""
    molecule: str | None = None


def _registry() -> dict[str, Run]:
    oc20 = [
        ("oc20_2m_baseline", 16, 1398.0),
        ("oc20_2m", 16, 1501.0),
        ("oc20_2m_baseline_20ep", 32, 2330.0),
        ("oc20_2m_20ep", 32, 2501.0),
        ("oc20_2m_baseline_30ep", 32, 3495.0),
        ("oc20_2m_30ep", 32, 3752.0),
        ("oc20_2m_escn_baseline", 16, 1802.0),
        ("oc20_2m_escn", 16, 1829.0),
        ("oc20_2m_ablation_no_force_encoding", 16, None),
        ("oc20_2m_ablation_no_energy_on_corrupted", 16, None),
        ("oc20_2m_ablation_full_corruption", 16, None),
        ("oc20_all_md_baseline", 128, None),
        ("oc20_all_md", 128, float(PAPER_TRAINING["oc20_all_md"][0])),
    ]
    runs = [Run(name, "oc20", gpus, V100, hours) for name, gpus, hours in oc20]
    runs += [
        Run("oc22_baseline", "oc22", 32, V100),
        Run("oc22", "oc22", 32, V100, float(PAPER_TRAINING["oc22"][0])),
    ]
    table4 = {"l2_baseline": 17.0, "l3_baseline": 59.0, "l2": 19.0, "l3": 61.0}  # Table 4, mean per molecule
    ablations = (  # Tables 5 and 6: not timed in the paper
        "table5_{}_no_attention_baseline",
        "table5_{}_no_attention",
        "table5_{}_no_attention_no_layer_norm_baseline",
        "table5_{}_no_attention_no_layer_norm",
        "table6_{}_no_force_encoding",
        "table6_{}_no_energy_on_corrupted",
        "table6_{}_full_corruption",
    )
    for mol in MOLECULES:
        for suffix, hours in table4.items():
            runs.append(
                Run(f"md17_{mol}_{suffix}", "md17", 1, A5000, hours, "mean over the 8 molecules", mol)
            )
        runs += [Run("md17_" + a.format(mol), "md17", 1, A5000, molecule=mol) for a in ablations]
    return {r.experiment: r for r in runs}


#: Every run a table script can train, by experiment name.
RUNS: dict[str, Run] = _registry()


# ==================================================================================================
# Table layout
# ==================================================================================================
@dataclass(frozen=True)
class Column:
    """A column: header (under an optional group header), how our numbers are printed.

    ``kind`` is ``value`` (``decimals`` digits), ``params`` (millions, ``83.2M``) or ``mark`` (a static entry
    such as a check mark, printed once).
    """

    header: str
    group: str = ""
    decimals: int = 1
    kind: str = "value"

    @property
    def name(self) -> str:
        return f"{self.group} {self.header}".strip()

    def format(self, value: float) -> str:
        """Our number as the table prints it."""
        scale, unit = (1e6, "M") if self.kind == "params" else (1.0, "")
        value /= scale
        if value != 0 and abs(value) < 0.5 * 10.0**-self.decimals:  # tiny (smoke) values keep two digits
            return f"{value:.2g}{unit}"
        return f"{value:.{self.decimals}f}{unit}"


@dataclass(frozen=True)
class Cell:
    """One entry: the paper's text, and where our number comes from.

    Our number is the mean of ``key`` over ``runs`` (one run for most cells; Table 4's training time is a
    mean over the molecules). ``na`` says why the library cannot produce it; ``text`` is a static entry.
    """

    paper: str = ""
    runs: tuple[str, ...] = ()
    key: str = ""
    na: str = ""
    text: str = ""


@dataclass(frozen=True)
class Row:
    label: str
    cells: tuple[Cell, ...]


@dataclass(frozen=True)
class Table:
    """One table of the paper.

    Attributes
    ----------
    name : str
        File stem of the outputs (``table1a``).
    title : str
        The first line printed.
    label_header : str
        Header of the row-label column.
    columns, rows
        The layout; every row has one cell per column.
    notes : tuple of str
        Printed under the table (units, what is compared).
    eval_splits : tuple of str
        The split names ``--eval NAME=PATH`` accepts (OC20/OC22).
    relax_preset : str, optional
        :data:`dens.relax.RELAX_PRESETS` entry for the IS2RE splits.
    smoke_molecules : tuple of str
        ``--smoke`` trains only the runs of these MD17 molecules (those with sample data).
    """

    name: str
    title: str
    label_header: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    notes: tuple[str, ...] = ()
    eval_splits: tuple[str, ...] = ()
    relax_preset: str | None = None
    smoke_molecules: tuple[str, ...] = ("ethanol",)

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row.cells) != len(self.columns):
                raise ValueError(
                    f"{self.name}: row {row.label!r} has {len(row.cells)} cells for {len(self.columns)} columns"
                )
            for cell in row.cells:
                unknown = [r for r in cell.runs if r not in RUNS]
                if unknown:
                    raise ValueError(f"{self.name}: no run registered for {unknown}")

    @property
    def runs(self) -> list[Run]:
        """The runs behind the table, in order of first appearance."""
        names = dict.fromkeys(r for row in self.rows for cell in row.cells for r in cell.runs)
        return [RUNS[n] for n in names]


def paper_row(label: str, entries: Sequence[str]) -> Row:
    """A row of the paper alone (another method: no run of ours)."""
    return Row(label, tuple(Cell(p) for p in entries))


def marks(*flags: bool) -> tuple[Cell, ...]:
    """Static check-mark cells (Tables 1(b), 5, 6)."""
    return tuple(Cell(text=CHECK if f else "") for f in flags)


def mark_columns(*headers: str) -> tuple[Column, ...]:
    return tuple(Column(h, kind="mark") for h in headers)


def md17_columns() -> tuple[Column, ...]:
    """Energy (meV) and forces (meV/Å) per molecule, in the paper's order."""
    return tuple(Column(q, MOLECULE_TITLES[m]) for m in MOLECULES for q in ("energy", "forces"))


def cells(
    entries: Sequence[str], sources: Sequence[tuple[str, str] | None], na: str = ""
) -> tuple[Cell, ...]:
    """The paper's ``entries`` beside ours: ``(experiment, key)`` per entry, or ``None`` (the paper's alone)."""
    return tuple(
        Cell(p) if src is None else Cell(p, (src[0],), src[1], na)
        for p, src in zip(entries, sources, strict=True)
    )


def md17_cells(entries: Sequence[str], experiment: str) -> tuple[Cell, ...]:
    """Test energy and force MAE per molecule beside the paper's ``entries``; ``experiment`` has a ``{}``
    for the molecule."""
    sources = [(experiment.format(m), f"test.{q}") for m in MOLECULES for q in ("energy_mae", "forces_mae")]
    return cells(entries, sources)


# ==================================================================================================
# Rendering
# ==================================================================================================
@dataclass
class Rendered:
    text: str
    markdown: str
    csv: str


def _mean(values: Sequence[Any]) -> float | None:
    present = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(present) / len(present) if present else None


def _ours(col: Column, cell: Cell, results: Mapping[str, Mapping[str, Any]], reasons: list[str]) -> str:
    """Our entry of a cell: the mean over its runs, ``–`` (none yet) or ``n/a[k]`` (reason ``k``)."""
    if cell.na:
        if cell.na not in reasons:
            reasons.append(cell.na)
        return f"n/a[{reasons.index(cell.na) + 1}]"
    values = [results.get(r, {}).get(cell.key) for r in cell.runs]
    mean = _mean(values)
    if mean is None:
        return "–"
    n = sum(v is not None for v in values)
    return col.format(mean) + (f" ({n}/{len(values)})" if n < len(values) else "")


def _text(title: str, table: Table, grid: Sequence[Sequence[str]], notes: Sequence[str]) -> str:
    """Aligned columns under their group headers (the group spans its columns)."""
    headers = [table.label_header, *(c.header for c in table.columns)]
    groups = ["", *(c.group for c in table.columns)]
    widths = [max(len(h), *(len(r[i]) for r in grid)) for i, h in enumerate(headers)]
    lines = [title]
    if any(groups):
        line, i = "", 0
        while i < len(groups):
            j = i
            while j + 1 < len(groups) and groups[i] and groups[j + 1] == groups[i]:
                j += 1
            line += f"{groups[i]:^{sum(widths[i : j + 1]) + 2 * (j - i)}}  "
            i = j + 1
        lines.append(line.rstrip())
    for r in [headers, *grid]:
        cells = [
            f"{v:<{w}}" if k == 0 else f"{v:>{w}}" for k, (v, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join([*lines, *notes])


def _markdown(title: str, table: Table, grid: Sequence[Sequence[str]], notes: Sequence[str]) -> str:
    def md_row(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    headers = [table.label_header, *(c.name for c in table.columns)]
    lines = [f"## {title}", "", md_row(headers), md_row(["---"] * len(headers)), *map(md_row, grid), ""]
    return "\n".join([*lines, *(f"- {n}" for n in notes), ""])


def _csv(table: Table, flat: Sequence[Sequence[str]]) -> str:
    """One column per check-mark column, two (paper, ours) per value column."""
    head = [table.label_header]
    for c in table.columns:
        head += [c.name] if c.kind == "mark" else [f"{c.name} (paper)", f"{c.name} (ours)"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerows([head, *flat])
    return buf.getvalue()


def render(table: Table, results: Mapping[str, Mapping[str, Any]], title: str | None = None) -> Rendered:
    """The table with ``paper / ours`` in every cell that has a run, as text, Markdown and CSV.

    ``results`` maps experiment names to the dicts of :func:`collect_run`; missing values print ``–``, cells
    with ``na`` print ``n/a[k]`` with the reason as note ``k``.
    """
    reasons: list[str] = []
    grid: list[list[str]] = []  # displayed entries
    flat: list[list[str]] = []  # CSV entries
    for row in table.rows:
        shown, entries = [row.label], [row.label]
        for col, cell in zip(table.columns, row.cells, strict=True):
            if col.kind == "mark":
                shown.append(cell.text)
                entries.append(cell.text)
            elif not cell.runs:
                shown.append(cell.paper)
                entries += [cell.paper, ""]
            else:
                ours = _ours(col, cell, results, reasons)
                shown.append(f"{cell.paper or '-'} / {ours}")
                entries += [cell.paper, ours]
        grid.append(shown)
        flat.append(entries)
    title = title or table.title
    notes = [
        "cells: paper / ours; –: no result yet; (k/n): mean over the k of n runs that have one",
        *table.notes,
        *(f"[{i}] n/a: {reason}" for i, reason in enumerate(reasons, 1)),
    ]
    return Rendered(_text(title, table, grid, notes), _markdown(title, table, grid, notes), _csv(table, flat))


# ==================================================================================================
# Commands: local launches and SLURM scripts
# ==================================================================================================
@dataclass
class Plan:
    """One run as this invocation would launch it."""

    run: Run
    run_dir: Path
    overrides: list[str]
    nproc: int  # local processes (one per GPU)

    def command(self, python: str = "python") -> list[str]:
        """The training command (``torch.distributed.run`` is ``torchrun``)."""
        entry = ["-m", "dens.train", f"+experiment={self.run.experiment}", f"trainer.run_dir={self.run_dir}"]
        entry += self.overrides
        if self.nproc > 1:
            return [
                python,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={self.nproc}",
                *entry,
            ]
        return [python, *entry]


def run_status(run_dir: Path) -> str:
    """``finished`` (``FINISHED`` written), ``partial`` (a ``last.pt`` to resume from) or ``missing``."""
    if (run_dir / "FINISHED").is_file():
        return "finished"
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return "partial"
    return "missing"


def _layout(gpus: int, gpus_per_node: int) -> tuple[int, int]:
    """SLURM nodes and GPUs per node for ``gpus`` GPUs."""
    per_node = min(gpus, gpus_per_node)
    return math.ceil(gpus / per_node), per_node


def slurm_script(plan: Plan, gpus_per_node: int, time_limit: str, extra: Sequence[str]) -> str:
    """An sbatch script for the paper's number of GPUs (as ``experiments/slurm_example.sh``)."""
    gpus = plan.run.gpus
    nodes, per_node = _layout(gpus, gpus_per_node)
    args = " ".join(shlex.quote(a) for a in plan.command()[3:])  # after "python -m dens.train"
    if gpus > 1:
        launch = (
            f'srun python -m torch.distributed.run --nnodes "$SLURM_NNODES" --nproc_per_node {per_node} \\\n'
            '    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER:29500" \\\n'
            f"    -m dens.train {args}"
        )
    else:
        launch = f"srun python -m dens.train {args}"
    lines = [
        "#!/bin/bash",
        f"# {plan.run.experiment}: {gpus} x {plan.run.gpu_type} in the paper; global batch = the config's",
        f"#SBATCH --job-name=dens-{plan.run.experiment}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={per_node}",
        f"#SBATCH --cpus-per-task={8 * per_node}",
        f"#SBATCH --time={time_limit}",
        "#SBATCH --output=logs/%x-%j.out",
        "#SBATCH --requeue",
        *(f"#SBATCH {e}" for e in extra),
        "set -euo pipefail",
        "mkdir -p logs",
        'MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export OMP_NUM_THREADS=8 NCCL_ASYNC_ERROR_HANDLING=1",
        launch,
        f"touch {shlex.quote(str(plan.run_dir / 'FINISHED'))}",
        "",
    ]
    return "\n".join(lines)


@functools.cache
def experiment_config(experiment: str) -> Any:
    """The composed Hydra configuration of an experiment, without overrides (nothing instantiated)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("dens.conf", version_base=None):
        return compose("train", overrides=[f"experiment={experiment}"])


def missing_keys(experiment: str, overrides: Sequence[str]) -> list[str]:
    """Mandatory (``???``) config values the overrides leave unset, in override syntax (``data.train.0.path``)."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    keys = (re.sub(r"\[(\d+)\]", r".\1", k) for k in OmegaConf.missing_keys(experiment_config(experiment)))
    return sorted(k for k in keys if k not in given)


def train(plan: Plan, log: Path | None = None) -> bool:
    """Run (or resume) one training; write ``FINISHED`` on success. ``log``: capture the output there."""
    cmd = plan.command(sys.executable)
    print(f"--> {shlex.join(plan.command())}", flush=True)
    t0 = time.perf_counter()
    if log is None:
        rc = subprocess.run(cmd, check=False).returncode
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        tail = "" if log is None else "\n" + "\n".join(log.read_text().splitlines()[-20:])
        print(f"!!! {plan.run.experiment}: training failed (exit code {rc}){tail}", file=sys.stderr)
        return False
    (plan.run_dir / "FINISHED").write_text(shlex.join(plan.command()) + "\n")
    print(f"    {plan.run.experiment}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return True


# ==================================================================================================
# Collection: metrics files, checkpoints, evaluations
# ==================================================================================================
def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (training and validation), in order."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_summary(
    records: Sequence[Mapping[str, Any]], config: Mapping[str, Any], world_size: int
) -> dict[str, Any]:
    """Training time (GPU-hours), throughput (structures per GPU-second) and the last validation.

    Each training record covers the steps since the previous one (``trainer.log_every``), validation and
    checkpoint writes included: its wall time ``window_s`` and ``world_size`` (older runs logged only
    ``structures_per_s``, and the time is then its structures, steps x ``optim.batch_size``, divided by
    that rate). The sum of time times world size is the GPU-hours. Steps repeated after a resume count
    twice (they were computed twice); time before the first step (data loading, the step-0 validation) is
    left out.
    """
    batch = int(config["optim"]["batch_size"])
    log_every = int(config["trainer"]["log_every"])
    seconds = structures = gpu_seconds = 0.0
    out: dict[str, Any] = {"world_size": world_size}
    for r in records:
        out["step"] = max(out.get("step", 0), int(r.get("step", 0)))
        if "val/energy_mae_meV" in r:
            out["trainer_val.energy_mae"] = r["val/energy_mae_meV"]
            out["trainer_val.forces_mae"] = r["val/forces_mae_meV_A"]
        rate = r.get("structures_per_s")
        if rate:
            step = int(r["step"])
            n = (step - (step - 1) // log_every * log_every) * batch
            window = float(r.get("window_s", n / rate))
            gpus = int(r.get("world_size", world_size))
            structures += n
            seconds += window
            gpu_seconds += window * gpus
    if seconds > 0:
        out["gpu_hours"] = gpu_seconds / 3600
        out["throughput"] = structures / gpu_seconds
    return out


def _load(path: Path) -> dict[str, Any]:
    return load_checkpoint(path, verify=False, mmap=True)  # metadata: no need to read every tensor


class TotalEnergy(nn.Module):
    """A model whose energies get the per-element linear reference added back: OC22 total energies.

    OC22 runs train on energies minus ``Σ coeff[Z]`` (``data.options.linear_reference``); the OC22 metrics
    and the evaluation server use total energies.
    """

    def __init__(self, model: nn.Module, coeff: Any) -> None:
        super().__init__()
        self.model = model
        self.reference = LinearReference(coeff)
        self.direct_forces = getattr(model, "direct_forces", True)

    def predict(self, batch: Any) -> dict[str, Any]:
        out = dict(self.model.predict(batch))
        ref = self.reference.reference(batch.atomic_numbers, batch.batch, batch.num_graphs)
        out["energy"] = out["energy"] + ref.to(out["energy"])
        return out


@dataclass(frozen=True)
class EvalOptions:
    """How the checkpoints are evaluated.

    Attributes
    ----------
    splits : dict
        ``--eval`` split name -> data path: ``val_*`` (metrics), ``test_*`` (prediction files for the
        evaluation server), ``is2re_test_*`` (relaxations, IS2RE prediction files).
    device : str
        Evaluation device.
    batch_size : int
        Structures per forward pass (relaxations: per batch).
    limit : int, optional
        Evaluate only the first structures of every split (smoke runs).
    relax_steps : int, optional
        Cap the relaxation steps of the preset (smoke runs).
    """

    splits: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    batch_size: int = 8
    limit: int | None = None
    relax_steps: int | None = None


class RunEvaluator:
    """Evaluations of one run's ``best.pt`` (or another ``checkpoint``), cached in ``<run_dir>/eval``.

    A cached result is reused while the checkpoint (path and training step) and the evaluation settings are
    the same.
    """

    def __init__(
        self,
        run: Run,
        run_dir: Path,
        config: Mapping[str, Any],
        options: EvalOptions,
        checkpoint: Path | None = None,
    ) -> None:
        self.run, self.run_dir, self.config, self.options = run, run_dir, config, options
        self.checkpoint = checkpoint or run_dir / "checkpoints" / "best.pt"
        state = _load(self.checkpoint)
        self.step = int(state.get("step", -1)) if isinstance(state, Mapping) else -1
        self.cache = run_dir / "eval"
        self._model: Any = None
        data_options = dict(config.get("data", {}).get("options") or {})
        self.linear_reference = data_options.pop("linear_reference", None)
        self.data_options = data_options

    @property
    def model(self) -> Any:
        """The model of the checkpoint (EMA weights; OC22: predicting total energies)."""
        if self._model is None:
            model = load_model(self.checkpoint, device=self.options.device)
            self._model = (
                model if self.linear_reference is None else TotalEnergy(model, self.linear_reference)
            )
        return self._model

    def cached(
        self, name: str, key: Mapping[str, Any], compute: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """``compute()``, or its result stored in ``<run_dir>/eval/<name>.json`` under the same key."""
        path = self.cache / f"{name}.json"
        key = json.loads(json.dumps({"checkpoint": str(self.checkpoint), "step": self.step, **key}))
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("key") == key:
                return record["value"]
        value = compute()
        self.cache.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "value": value}, indent=2))
        return value

    def _dataset(self, path: str | Path, **options: Any) -> Any:
        ds = open_dataset(path, **options)
        if self.options.limit is not None and len(ds) > self.options.limit:
            ds = Subset(ds, list(range(self.options.limit)))
        return ds

    def params(self) -> int:
        return int(
            self.cached("params", {}, lambda: {"params": sum(p.numel() for p in self.model.parameters())})[
                "params"
            ]
        )

    def s2ef(self, split: str, path: str, predictions: bool) -> dict[str, Any]:
        """S2EF metrics (labelled splits) and, for test splits, the evaluation-server prediction file."""
        pred = self.cache / f"{split}_predictions.npz" if predictions else None
        dtype = "float32" if self.run.dataset == "oc22" else "float16"  # official prediction precision

        def compute() -> dict[str, Any]:
            ds = self._dataset(path, **self.data_options)
            out = evaluate(self.model, ds, self.options.batch_size, self.options.device, pred, dtype)
            return {"metrics": out, "files": [str(pred)] if pred else []}

        return self.cached(split, {"data": str(path), "limit": self.options.limit}, compute)

    def is2re(self, split: str, path: str, preset: str) -> dict[str, Any]:
        """Relax every initial structure (resumable); the IS2RE prediction file and, if labelled, metrics."""
        overrides = {} if self.options.relax_steps is None else {"steps": self.options.relax_steps}
        settings = RelaxSettings.preset(preset, **overrides)

        def compute() -> dict[str, Any]:
            ds = self._dataset(path, **self.data_options)
            out_dir = self.cache / f"{split}_step{self.step}"
            summary = relax_dataset(
                self.model, ds, out_dir, settings, self.options.batch_size, device=self.options.device
            )
            return {"metrics": summary.get("metrics", {}), "files": [str(out_dir / "is2re_predictions.npz")]}

        key = {"data": str(path), "limit": self.options.limit, "steps": settings.steps}
        return self.cached(split, key, compute)

    def md17_test_set(self) -> Subset:
        """The MD17 test split: the run's ``split.npz``, or the paper's split (950 / 50 / rest, seed 1)."""
        data = self.config["data"]
        whole = open_dataset(data["path"], **self.data_options)
        record = self.run_dir / "split.npz"
        test = load_split(record)["test"] if record.is_file() else md17_splits(whole)["test"].indices
        return Subset(whole, test[: self.options.limit])

    def md17_test(self) -> dict[str, Any]:
        """Energy and force MAE (meV, meV/Å) on the MD17 test split."""

        def compute() -> dict[str, Any]:
            out = evaluate(self.model, self.md17_test_set(), self.options.batch_size, self.options.device)
            return {"metrics": out, "files": []}

        return self.cached(
            "test", {"data": str(self.config["data"]["path"]), "limit": self.options.limit}, compute
        )


def _submission(name: str, files: Mapping[str, str], dataset: str, out: Path) -> str | None:
    """Merge per-split prediction files into the evaluation-server file once every test split is there."""
    if set(files) != set(SUBMISSION_SPLITS[dataset]):
        return None
    return str(merge_submission(files, out / f"submission_{name}.npz", dataset))


def collect_run(run: Run, run_dir: Path, options: EvalOptions, relax_preset: str | None) -> dict[str, Any]:
    """Everything the tables read from one run directory (see :func:`main` for the keys).

    Keys: ``status``, ``step``, ``world_size``, ``gpu_hours``, ``throughput``, ``trainer_val.*`` (the
    trainer's last validation), ``params``, ``<split>.<metric>`` per evaluated split (``energy_mae`` meV,
    ``forces_mae`` meV/Å, ...), ``val.<metric>`` (OC20: the mean over the ``val_*`` splits, as the paper
    averages), ``test.<metric>`` (MD17), ``files`` (prediction and submission files) and ``notes``.
    """
    out: dict[str, Any] = {"status": run_status(run_dir), "run_dir": str(run_dir), "files": [], "notes": []}
    if out["status"] == "missing":
        return out
    config = json.loads((run_dir / "config.json").read_text())
    world = int(_load(run_dir / "checkpoints" / "last.pt").get("world_size", 1))
    out.update(training_summary(read_metrics(run_dir), config, world))
    if not (run_dir / "checkpoints" / "best.pt").is_file():
        out["notes"].append("no checkpoints/best.pt yet")
        return out
    ev = RunEvaluator(run, run_dir, config, options)
    out["params"] = ev.params()
    if run.dataset == "md17":
        out.update({f"test.{k}": v for k, v in ev.md17_test()["metrics"].items()})
        return out
    val: dict[str, dict[str, float]] = {}
    tests: dict[str, dict[str, str]] = {"s2ef": {}, "is2re": {}}
    for split, path in options.splits.items():
        if split.startswith("is2re_test_"):
            if relax_preset is None:
                continue
            res = ev.is2re(split, path, relax_preset)
            tests["is2re"][split.removeprefix("is2re_test_")] = res["files"][0]
        else:
            res = ev.s2ef(split, path, predictions=split.startswith("test_"))
            if split.startswith("test_"):
                tests["s2ef"][split.removeprefix("test_")] = res["files"][0]
            elif res["metrics"]:
                val[split] = res["metrics"]
        out.update({f"{split}.{k}": v for k, v in res["metrics"].items()})
        out["files"] += res["files"]
    if run.dataset == "oc20" and val:
        out.update({f"val.{k}": v for k, v in average_metrics(val).items()})
        if len(val) < 4:
            out["notes"].append(f"val.* is the mean over {sorted(val)} only (the paper: all four splits)")
    for kind, files in tests.items():
        merged = _submission(kind, files, run.dataset, ev.cache) if files else None
        if merged:
            out["files"].append(merged)
    return out


# ==================================================================================================
# Smoke runs: tiny models, two steps, embedded or sample data, CPU
# ==================================================================================================
SMOKE_TRAINER = (
    "trainer.device=cpu", "trainer.max_steps=2", "trainer.eval_every=2", "trainer.checkpoint_every=2",
    "trainer.log_every=1", "trainer.progress_bar=false", "trainer.tensorboard=false", "trainer.val_max_batches=2",
    "optim.batch_size=4",
)  # fmt: skip
SMOKE_MODELS: dict[str, tuple[str, ...]] = {
    "dens.models.EquiformerV2": (
        "model.cutoff=5.0",
        "model.max_neighbors=8",
        "model.backbone.num_layers=1",
        "model.backbone.lmax=2",
        "model.backbone.mmax=1",
        "model.backbone.sphere_channels=16",
        "model.backbone.attn_hidden_channels=8",
        "model.backbone.num_heads=2",
        "model.backbone.attn_alpha_channels=8",
        "model.backbone.attn_value_channels=4",
        "model.backbone.ffn_hidden_channels=16",
        "model.backbone.edge_channels=16",
        "model.backbone.grid_resolution=8",
        "model.backbone.num_distance_basis=32",
    ),
    "dens.models.ESCN": (
        "model.cutoff=5.0",
        "model.max_neighbors=8",
        "model.backbone.num_layers=1",
        "model.backbone.lmax=2",
        "model.backbone.mmax=1",
        "model.backbone.sphere_channels=16",
        "model.backbone.hidden_channels=16",
        "model.backbone.edge_channels=16",
        "model.backbone.num_sphere_samples=16",
    ),
    "dens.models.Equiformer": (
        "model.backbone.num_layers=1",
        "model.backbone.number_of_basis=8",
        "model.backbone.fc_neurons=[8,8]",
    ),
}
_IRREPS = re.compile(r"^\d+x\d[eo](\+\d+x\d[eo])*$")


def _shrink_irreps(irreps: str, factor: int = 16) -> str:
    """``128x0e+64x1e`` -> ``8x0e+4x1e``: every multiplicity divided (at least 1)."""
    parts = [p.split("x", 1) for p in irreps.split("+")]
    return "+".join(f"{max(1, int(m) // factor)}x{ir}" for m, ir in parts)


def smoke_model_overrides(cfg: Any) -> list[str]:
    """Tiny-model overrides for a composed config (Equiformer: every irreps multiplicity / 16)."""
    backbone = cfg.model.backbone
    out = list(SMOKE_MODELS[backbone._target_])
    if backbone._target_ == "dens.models.Equiformer":
        out += [
            f"model.backbone.{k}={_shrink_irreps(v)}"
            for k, v in backbone.items()
            if isinstance(v, str) and _IRREPS.match(v)
        ]
    return out


def _demo_paths() -> dict[str, str]:
    return {split: str(demo_path(split)) for split in ("train", "val", "test")}


def _md17_sample(work: Path, molecule: str, frames: int = 120) -> tuple[str, str]:
    """A slice of the MD17 samples in ``../shared/data`` (path, energy unit), or a synthetic stand-in."""
    samples = {
        "ethanol": ("md17/md17_ethanol_2000_kcal.xyz", "kcal/mol"),
        "aspirin": ("md17/rmd17_aspirin_1000_meV.xyz", "meV"),
    }
    source, unit = samples[molecule]
    src = SHARED_DATA / source
    out = work / f"md17_{molecule}_{frames}.xyz"
    if src.is_file():
        lines, kept, i = src.read_text().splitlines(), [], 0
        for _ in range(frames):  # extended XYZ: a count line, a comment line, one line per atom
            n = int(lines[i])
            kept += lines[i : i + n + 2]
            i += n + 2
        out.write_text("\n".join(kept) + "\n")
        return str(out), unit
    print(
        f"note: {src} is absent (no ../shared/data): the MD17 smoke runs use a synthetic {molecule} "
        "trajectory (rattled geometries, ASE EMT energies and forces) instead"
    )
    rng = np.random.default_rng(0)
    frames_out = []
    for _ in range(frames):
        atoms = build_molecule("CH3CH2OH")  # ethanol stands in for every molecule
        atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
        atoms.calc = EMT()
        atoms.get_potential_energy()
        frames_out.append(atoms)
    ase.io.write(out, frames_out, format="extxyz")
    return str(out), "eV"


def _linear_reference(work: Path, train_path: str) -> str:
    """Per-element energies fitted on the demo training set: a stand-in for OC22's coefficient file."""
    path = work / "linref.npz"
    np.savez(path, coeff=fit_linear_reference(open_dataset(train_path)))
    return str(path)


def smoke_setup(
    table: Table, runs: Sequence[Run], work: Path
) -> tuple[list[Run], Callable[[Run], list[str]], EvalOptions]:
    """The runs ``--smoke`` trains (``runs`` of the table's smoke molecules), their overrides (tiny model,
    data, two steps) and the evaluation options; the data it makes go to ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    runs = [r for r in runs if r.molecule is None or r.molecule in table.smoke_molecules]
    demo = _demo_paths()
    md17 = {m: _md17_sample(work, m) for m in {r.molecule for r in runs if r.molecule}}
    linref = _linear_reference(work, demo["train"]) if any(r.dataset == "oc22" for r in runs) else None
    fill = {
        "data.val.path": demo["val"],
        "data.train.path": demo["train"],
        "data.train.0.path": demo["train"],
        "data.train.1.path": demo["test"],
        "data.options.linear_reference": linref,
    }

    def overrides(run: Run) -> list[str]:
        data: list[str] = []
        if run.molecule:
            path, unit = md17[run.molecule]
            data = [
                f"data.path={path}",
                f"data.options.energy_unit={unit}",
                "data.split.train=32",
                "data.split.val=8",
                "data.split.test=16",
            ]
        data += [f"{k}={fill[k]}" for k in missing_keys(run.experiment, data)]
        return [*SMOKE_TRAINER, *smoke_model_overrides(experiment_config(run.experiment)), *data]

    stand_in = {
        "val_id": demo["val"],
        "val_ood_ads": demo["test"],
        "val_ood_cat": demo["val"],
        "val_ood_both": demo["test"],
        "val_ood": demo["test"],
    }
    splits = {s: stand_in.get(s, demo["test"]) for s in table.eval_splits}
    return runs, overrides, EvalOptions(splits, "cpu", 8, limit=16, relax_steps=3)


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


def check_data(plans: Sequence[Plan]) -> None:
    """Stop when an unfinished run still has a ``???`` value (a data path) the overrides leave unset."""
    for plan in plans:
        needs = missing_keys(plan.run.experiment, plan.overrides)
        if needs and run_status(plan.run_dir) != "finished":
            raise SystemExit(
                f"{plan.run.experiment} needs {', '.join(needs)}: give them as KEY=VALUE overrides"
            )


def write_slurm(plans: Sequence[Plan], args: argparse.Namespace, folder: Path) -> None:
    """Write (and print, and with ``--submit`` submit) an sbatch script per unfinished run."""
    check_data(plans)
    folder.mkdir(parents=True, exist_ok=True)
    if args.submit:
        Path("logs").mkdir(exist_ok=True)  # the scripts' --output folder, opened before they start
    for plan in plans:
        if run_status(plan.run_dir) == "finished":
            continue
        path = folder / f"{plan.run.experiment}.sbatch"
        path.write_text(slurm_script(plan, args.gpus_per_node, args.time, args.sbatch))
        print(f"# ---- {path}\n{path.read_text()}")
        if args.submit:
            subprocess.run(["sbatch", str(path)], check=True)
    print(f"when the jobs have finished: python {sys.argv[0]} --collect-only ... (the same arguments)")


def train_all(plans: Sequence[Plan], smoke: bool) -> list[str]:
    """Train or resume every unfinished run; the experiments that failed."""
    if not smoke:
        check_data(plans)
    failed = []
    for plan in plans:
        if run_status(plan.run_dir) != "finished":
            if not train(plan, plan.run_dir / "train_output.log" if smoke else None):
                failed.append(plan.run.experiment)
    return failed


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
