"""Table 1(b) of the DeNS paper: the design choices of DeNS, EquiformerV2 on OC20 S2EF-2M for 12 epochs.

Five runs: Index 1 without DeNS (``oc20_2m_baseline``), Index 2 with every design choice (``oc20_2m``, the
12-epoch run of Table 1(a); ``oc20_2m_ablation_all_on`` is the same setting under another name), Index 3
without force encoding, Index 4 with lambda_E = 0 in Eq. 6 (no energy loss on corrupted structures) and
Index 5 without partially corrupted structures (``oc20_2m_ablation_*``); 16 V100s each in the paper.
Reported: force and energy MAE (meV/Å, meV) averaged over the four OC20 validation splits.

Usage::

    python experiments/table1b.py --dry-run
    python experiments/table1b.py --smoke
    python experiments/table1b.py data.train.path=data/oc20/s2ef/2M/train data.val.path=data/oc20/s2ef/all/val_id \\
        --eval val_id=... --eval val_ood_ads=... --eval val_ood_cat=... --eval val_ood_both=...
    python experiments/table1b.py --slurm --submit data.train.path=... data.val.path=...   # then --collect-only
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import _tables as T

#: Index -> experiment and the check marks: DeNS, force encoding, lambda_E != 0 in Eq. 6, partial corruption.
ROWS = {
    "1": ("oc20_2m_baseline", (False, False, False, False)),
    "2": ("oc20_2m", (True, True, True, True)),
    "3": ("oc20_2m_ablation_no_force_encoding", (True, False, True, True)),
    "4": ("oc20_2m_ablation_no_energy_on_corrupted", (True, True, False, True)),
    "5": ("oc20_2m_ablation_full_corruption", (True, True, True, False)),
}


def row(index: str, run: str, flags: tuple[bool, ...]) -> T.Row:
    """Check marks, then the validation force and energy MAE of ``run`` beside the paper's."""
    sources = [(run, "val.forces_mae"), (run, "val.energy_mae")]
    return T.Row(index, (*T.marks(*flags), *T.cells(T.paper("table1b", index), sources)))


TABLE = T.Table(
    name="table1b",
    title="Table 1(b): design choices of DeNS, EquiformerV2 on OC20 S2EF-2M, 12 epochs",
    label_header="Index",
    columns=(
        *T.mark_columns("DeNS", "Force encoding", "λE≠0 in Eq. 6", "Partially corrupted structures"),
        T.Column("forces", decimals=2),
        T.Column("energy", decimals=0),
    ),
    rows=tuple(row(index, run, flags) for index, (run, flags) in ROWS.items()),
    notes=("forces meV/Å, energy meV: mean over the four OC20 validation splits (best.pt, EMA weights)",),
    eval_splits=T.OC20_VAL,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run, resume or plan the runs of Table 1(b) and write the table."""
    return T.main(TABLE, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
