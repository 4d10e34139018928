"""The paper's numbers (transcribed from ../shared/paper/dens-tmlr2024.txt) and its runs: the
experiment behind each number and what it cost (GPU-hours, GPUs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dens.data import (
    MD17_MOLECULES,
)

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
