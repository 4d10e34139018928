"""The table model (columns, cells, rows: the paper's numbers and the runs behind each of our cells) and
its rendering (text, Markdown, CSV)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from _paper import CHECK, MOLECULE_TITLES, MOLECULES, RUNS, Run


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
