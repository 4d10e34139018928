"""Table 4 of the DeNS paper: MD17 test MAEs of Equiformer (Lmax 2 and 3) trained with and without DeNS.

32 runs: 8 molecules x {Lmax 2, Lmax 3} x {without, with DeNS} (experiments ``md17_<molecule>_l2_baseline``,
``_l3_baseline``, ``_l2``, ``_l3``), one A5000 each in the paper. Reported: test energy and force MAE (meV,
meV/Å; the structures after the 950 / 50 training / validation split, seed 1) per molecule, the training time
averaged over the molecules (GPU-hours) and the number of parameters. The other methods' rows are the paper's.

Usage::

    python experiments/table4.py --dry-run
    python experiments/table4.py --smoke                     # ethanol only, tiny models, MD17 sample slice
    python experiments/table4.py --data-dir data/md17        # md17_<molecule>.npz (python -m dens.data.download md17 ...)
    python experiments/table4.py --slurm --submit --data-dir data/md17   # one 1-GPU job per run; then --collect-only
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import _tables as T

#: Our rows: experiment pattern ({} = molecule).
OURS = {
    "Equiformer (Lmax=2)": "md17_{}_l2_baseline",
    "Equiformer (Lmax=3)": "md17_{}_l3_baseline",
    "Equiformer (Lmax=2) + DeNS": "md17_{}_l2",
    "Equiformer (Lmax=3) + DeNS": "md17_{}_l3",
}


def row(label: str) -> T.Row:
    """Per molecule test MAEs, then the mean training time and the parameters over the molecules' runs."""
    entries = T.paper("table4", label)
    if label not in OURS:
        return T.paper_row(label, entries)
    runs = tuple(OURS[label].format(m) for m in T.MOLECULES)
    return T.Row(
        label,
        (
            *T.md17_cells(entries[:16], OURS[label]),
            T.Cell(entries[16], runs, "gpu_hours"),
            T.Cell(entries[17], runs, "params"),
        ),
    )


TABLE = T.Table(
    name="table4",
    title="Table 4: MD17 test MAEs (energy meV, forces meV/Å)",
    label_header="Model",
    columns=(
        *T.md17_columns(),
        T.Column("Training time (GPU-hours)", decimals=0),
        T.Column("Number of parameters", decimals=2, kind="params"),
    ),
    rows=tuple(row(label) for label in T.PAPER["table4"]),
    notes=(
        "test split: the structures after the 950 / 50 training / validation split (seed 1); best.pt",
        "training time: mean over the molecules; the paper's on one A5000; ours from the wall times in metrics.jsonl",
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run, resume or plan the runs of Table 4 and write the table."""
    return T.main(TABLE, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
