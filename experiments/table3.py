"""Table 3 of the DeNS paper: OC22 S2EF-Total and IS2RE-Total, EquiformerV2 without and with DeNS.

Two runs: ``oc22_baseline`` (122M) and ``oc22`` (127M), lambda_E = 4, lambda_F = 100, 6 epochs, 32 V100s each
in the paper (§C.1: 5082 GPU-hours with DeNS). Reported: parameters, S2EF-Total validation and test energy and
force MAE on the ID and OOD splits, and IS2RE-Total test energy MAE (ID, OOD). Energies are total energies:
the runs train on energies minus the per-element linear reference (``data.options.linear_reference``,
fairchem's ``oc22_linfit_coeffs.npz``), which the evaluation adds back. The test labels are not public: the
script writes the prediction files for the evaluation server (``--eval test_*``; ``--eval is2re_test_*``:
batched L-BFGS relaxations with the OC22 settings) and prints n/a.

Usage::

    python experiments/table3.py --dry-run
    python experiments/table3.py --smoke
    python experiments/table3.py data.train.path=data/oc22/s2ef/train data.val.path=data/oc22/s2ef/val_id \\
        data.options.linear_reference=data/oc22/oc22_linfit_coeffs.npz \\
        --eval val_id=data/oc22/s2ef/val_id --eval val_ood=data/oc22/s2ef/val_ood \\
        --eval test_id=data/oc22/s2ef/test_id --eval test_ood=data/oc22/s2ef/test_ood \\
        --eval is2re_test_id=data/oc22/is2re/test_id --eval is2re_test_ood=data/oc22/is2re/test_ood
    python experiments/table3.py --slurm --submit data.train.path=... data.val.path=... data.options.linear_reference=...
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import _tables as T

S2EF_TEST = T.hidden_labels("OC22 S2EF-Total", T.OC22_TEST, T.OC22_SERVER)
IS2RE_TEST = T.hidden_labels("OC22 IS2RE-Total", T.OC22_IS2RE_TEST, T.OC22_SERVER)
#: Our rows: experiment and the paper's training time (§C.1; the baseline's is not reported).
OURS = {
    "EquiformerV2 (λE=4, λF=100)": ("oc22_baseline", "-"),
    "EquiformerV2 + DeNS (λE=4, λF=100)": ("oc22", T.PAPER_TRAINING["oc22"][0]),
}


def row(label: str) -> T.Row:
    """A row of Table 3 (plus the training time column); ours beside the paper's where we train."""
    entries = T.paper("table3", label)
    if label not in OURS:
        return T.paper_row(label, (*entries, "-"))
    run, hours = OURS[label]
    val = [(run, f"val_{split}.{q}") for q in ("energy_mae", "forces_mae") for split in ("id", "ood")]
    return T.Row(
        label,
        (
            T.Cell(entries[0], (run,), "params"),
            *T.cells(entries[1:5], val),
            *T.cells(entries[5:9], [(run, "")] * 4, na=S2EF_TEST),
            *T.cells(entries[9:11], [(run, "")] * 2, na=IS2RE_TEST),
            T.Cell(hours, (run,), "gpu_hours"),
        ),
    )


TABLE = T.Table(
    name="table3",
    title="Table 3: OC22 S2EF-Total validation and test, IS2RE-Total test",
    label_header="Model",
    columns=(
        T.Column("Number of parameters", decimals=1, kind="params"),
        T.Column("ID", "S2EF-Total val energy (meV)", 1),
        T.Column("OOD", "S2EF-Total val energy (meV)", 1),
        T.Column("ID", "S2EF-Total val force (meV/Å)", 2),
        T.Column("OOD", "S2EF-Total val force (meV/Å)", 2),
        T.Column("ID", "S2EF-Total test energy (meV)", 1),
        T.Column("OOD", "S2EF-Total test energy (meV)", 1),
        T.Column("ID", "S2EF-Total test force (meV/Å)", 2),
        T.Column("OOD", "S2EF-Total test force (meV/Å)", 2),
        T.Column("ID", "IS2RE-Total test energy (meV)", 0),
        T.Column("OOD", "IS2RE-Total test energy (meV)", 0),
        T.Column("GPU-hours", "Training (§C.1)", 0),
    ),
    rows=tuple(row(label) for label in T.PAPER["table3"]),
    notes=(
        "validation: best.pt (EMA weights) on val_id and val_ood, total energies",
        "GPU-hours: the paper's on V100s; ours from the wall times in metrics.jsonl, on our GPUs",
    ),
    eval_splits=(*T.OC22_VAL, *T.OC22_TEST, *T.OC22_IS2RE_TEST),
    relax_preset="oc22",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run, resume or plan the runs of Table 3 and write the table."""
    return T.main(TABLE, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
