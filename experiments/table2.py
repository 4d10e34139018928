"""Table 2 of the DeNS paper: OC20 S2EF-All+MD, EquiformerV2 (153M) without and with DeNS (160M).

Two runs: ``oc20_all_md_baseline`` (1 epoch) and ``oc20_all_md`` (2 epochs, DeNS only on structures of the
All split), 128 V100s each in the paper. Reported: training throughput (structures per GPU-second), S2EF
validation energy and force MAE (mean of the four OC20 validation splits), S2EF test MAEs and IS2RE test
energy MAE. The test labels are not public: the script writes the prediction files for the evaluation
server (``--eval test_*``: S2EF; ``--eval is2re_test_*``: batched L-BFGS relaxations with the All+MD
settings) and prints n/a. §B.1 adds the training time (88982 GPU-hours) and size (160M) of the DeNS model,
shown in two extra columns.

The training data are two folders: the All split and the MD split (``data.train.0.path``,
``data.train.1.path``; DeNS never corrupts the second).

Usage::

    python experiments/table2.py --dry-run
    python experiments/table2.py --smoke
    python experiments/table2.py data.train.0.path=data/oc20/s2ef/all/train data.train.1.path=data/oc20/s2ef/md/train \\
        data.val.path=data/oc20/s2ef/all/val_id --eval val_id=... --eval val_ood_ads=... --eval val_ood_cat=... \\
        --eval val_ood_both=... --eval test_id=data/oc20/s2ef/test/id ... --eval is2re_test_id=data/oc20/is2re/test_id ...
    python experiments/table2.py --slurm --submit data.train.0.path=... data.train.1.path=... data.val.path=...
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import _tables as T

S2EF_TEST = T.hidden_labels("OC20 S2EF", T.OC20_TEST, T.OC20_SERVER)
IS2RE_TEST = T.hidden_labels("OC20 IS2RE", T.OC20_IS2RE_TEST, T.OC20_SERVER)
#: Our rows: experiment, and the paper's training time and size (§B.1; the baseline's time is not reported).
OURS = {
    "EquiformerV2 (λE=4, 153M)": ("oc20_all_md_baseline", ("-", "153M")),
    "EquiformerV2 + DeNS (λE=4, 160M)": ("oc20_all_md", T.PAPER_TRAINING["oc20_all_md"]),
}


def row(label: str) -> T.Row:
    """A row of Table 2 (plus the training time and size columns); ours beside the paper's where we train."""
    entries = T.paper("table2", label)
    if label not in OURS:
        return T.paper_row(label, (*entries, "-", "-"))
    run, (hours, params) = OURS[label]
    return T.Row(
        label,
        (
            T.Cell(entries[0], (run,), "throughput"),
            T.Cell(entries[1], (run,), "val.energy_mae"),
            T.Cell(entries[2], (run,), "val.forces_mae"),
            T.Cell(entries[3], (run,), na=S2EF_TEST),
            T.Cell(entries[4], (run,), na=S2EF_TEST),
            T.Cell(entries[5], (run,), na=IS2RE_TEST),
            T.Cell(hours, (run,), "gpu_hours"),
            T.Cell(params, (run,), "params"),
        ),
    )


TABLE = T.Table(
    name="table2",
    title="Table 2: OC20 S2EF-All+MD, S2EF validation and test, IS2RE test",
    label_header="Model",
    columns=(
        T.Column("Samples / GPU sec.", "Throughput", 1),
        T.Column("Energy MAE (meV)", "S2EF validation", 0),
        T.Column("Force MAE (meV/Å)", "S2EF validation", 1),
        T.Column("Energy MAE (meV)", "S2EF test", 0),
        T.Column("Force MAE (meV/Å)", "S2EF test", 1),
        T.Column("Energy MAE (meV)", "IS2RE test", 0),
        T.Column("GPU-hours", "Training (§B.1)", 0),
        T.Column("Parameters", "Training (§B.1)", 1, "params"),
    ),
    rows=tuple(row(label) for label in T.PAPER["table2"]),
    notes=(
        "S2EF validation: mean over the four OC20 validation splits (best.pt, EMA weights)",
        "throughput and GPU-hours: the paper's on V100s; ours from the wall times in metrics.jsonl, on our GPUs",
    ),
    eval_splits=(*T.OC20_VAL, *T.OC20_TEST, *T.OC20_IS2RE_TEST),
    relax_preset="oc20_all",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run, resume or plan the runs of Table 2 and write the table."""
    return T.main(TABLE, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
