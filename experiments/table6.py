"""Table 6 of the DeNS paper: the design choices of DeNS on MD17, Equiformer (Lmax 2).

40 runs: 8 molecules x 5 indices, one A5000 each in the paper. Index 1 / 2 are the Lmax = 2 runs of Table 4
without / with DeNS (``md17_<molecule>_l2_baseline``, ``md17_<molecule>_l2``); Index 3 drops force encoding,
Index 4 sets lambda_E = 0 in Eq. 6 and Index 5 corrupts every atom (``md17_table6_<molecule>_no_force_encoding``,
``_no_energy_on_corrupted``, ``_full_corruption``). Reported: test energy and force MAE (meV, meV/Å).

Usage::

    python experiments/table6.py --dry-run
    python experiments/table6.py --smoke
    python experiments/table6.py --data-dir data/md17
    python experiments/table6.py --slurm --submit --data-dir data/md17   # then --collect-only
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import _tables as T

#: Index -> experiment pattern ({} = molecule) and the check marks: DeNS, force encoding, lambda_E != 0 in
#: Eq. 6, partially corrupted structures.
ROWS = {
    "1": ("md17_{}_l2_baseline", (False, False, False, False)),
    "2": ("md17_{}_l2", (True, True, True, True)),
    "3": ("md17_table6_{}_no_force_encoding", (True, False, True, True)),
    "4": ("md17_table6_{}_no_energy_on_corrupted", (True, True, False, True)),
    "5": ("md17_table6_{}_full_corruption", (True, True, True, False)),
}

TABLE = T.Table(
    name="table6",
    title="Table 6: design choices of DeNS on MD17, Equiformer (Lmax=2), test MAEs",
    label_header="Index",
    columns=(
        *T.mark_columns("DeNS", "Force encoding", "λE≠0 in Eq. 6", "Partially corrupted structures"),
        *T.md17_columns(),
    ),
    rows=tuple(
        T.Row(index, (*T.marks(*flags), *T.md17_cells(T.paper("table6", index), run)))
        for index, (run, flags) in ROWS.items()
    ),
    notes=(
        "energy meV, forces meV/Å on the test split (the structures after the 950 / 50 split, seed 1); best.pt",
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run, resume or plan the runs of Table 6 and write the table."""
    return T.main(TABLE, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
