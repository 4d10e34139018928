"""Table 1(a) of the DeNS paper: EquiformerV2 and eSCN on OC20 S2EF-2M, trained with and without DeNS.

Eight runs: EquiformerV2 for 12, 20 and 30 epochs and eSCN for 20 epochs, each without and with DeNS
(experiments ``oc20_2m_baseline``, ``oc20_2m``, ``oc20_2m_baseline_20ep``, ``oc20_2m_20ep``,
``oc20_2m_baseline_30ep``, ``oc20_2m_30ep``, ``oc20_2m_escn_baseline``, ``oc20_2m_escn``; 16 or 32 V100s each in
the paper). Reported: force and energy MAE (meV/Å, meV) averaged over the four OC20 validation splits, the
number of parameters and the training time in GPU-hours.

Usage::

    python experiments/table1a.py --dry-run                  # the runs, their commands and the paper's cost
    python experiments/table1a.py --smoke                    # the pipeline with tiny models on the demo data
    python experiments/table1a.py data.train.path=data/oc20/s2ef/2M/train data.val.path=data/oc20/s2ef/all/val_id \\
        --eval val_id=data/oc20/s2ef/all/val_id --eval val_ood_ads=data/oc20/s2ef/all/val_ood_ads \\
        --eval val_ood_cat=data/oc20/s2ef/all/val_ood_cat --eval val_ood_both=data/oc20/s2ef/all/val_ood_both
    python experiments/table1a.py --slurm --submit data.train.path=... data.val.path=...   # then --collect-only

Every run trains in ``runs/<experiment>`` (``--runs-dir``) and resumes when started again; the table goes to
``runs/tables/table1a.{md,csv,json}`` (``--out``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import _tables as T

COLUMNS = tuple(
    T.Column(header, group, decimals, kind)
    for group in ("EquiformerV2", "EquiformerV2 + DeNS")
    for header, decimals, kind in (
        ("forces", 2, "value"),
        ("energy", 0, "value"),
        ("parameters", 1, "params"),
        ("GPU-hours", 0, "value"),
    )
)
KEYS = ("val.forces_mae", "val.energy_mae", "params", "gpu_hours")
#: Row of the paper -> the experiments without and with DeNS.
ROWS = {
    "12": ("oc20_2m_baseline", "oc20_2m"),
    "20": ("oc20_2m_baseline_20ep", "oc20_2m_20ep"),
    "30": ("oc20_2m_baseline_30ep", "oc20_2m_30ep"),
    "eSCN 20": ("oc20_2m_escn_baseline", "oc20_2m_escn"),
}

TABLE = T.Table(
    name="table1a",
    title="Table 1(a): OC20 S2EF-2M, EquiformerV2 and eSCN trained with and without DeNS",
    label_header="Epochs",
    columns=COLUMNS,
    rows=tuple(
        T.Row(label, T.cells(T.paper("table1a", label), [(run, key) for run in runs for key in KEYS]))
        for label, runs in ROWS.items()
    ),
    notes=(
        "forces meV/Å, energy meV: mean over the four OC20 validation splits (best.pt, EMA weights)",
        "row 'eSCN 20': eSCN without / with DeNS in the EquiformerV2 / EquiformerV2 + DeNS columns",
        "GPU-hours: the paper's on V100s; ours from the wall times in metrics.jsonl, on our GPUs",
    ),
    eval_splits=T.OC20_VAL,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run, resume or plan the runs of Table 1(a) and write the table."""
    return T.main(TABLE, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
