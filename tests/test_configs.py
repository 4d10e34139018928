"""Every experiment config composes, and its hyper-parameters equal the paper's tables.

The expected values below are transcribed by hand from the paper (``../shared/paper``: Tables 1, 4-9 and the
appendix text) and, where the paper is silent, from ``../shared/OFFICIAL_SETTINGS.md`` (and the official
Equiformer MD17 scripts it points to). They are written out as literal data on purpose: the test must not
read them from the configs it checks. Composition only: no target is imported or instantiated.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, ListConfig, OmegaConf

import dens.conf
from dens.losses import DeNSSettings
from dens.losses.stress import MATERIALS_KEYS
from dens.models import ESCN, EquiformerV2, ForceField
from dens.trainer import OptimSettings, TrainerSettings

CONF = Path(dens.conf.__file__).parent
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
NOT_A_PAPER_SETTING = {"demo"}  # the CPU demo run
MOLECULES = [
    "aspirin",
    "benzene",
    "ethanol",
    "malonaldehyde",
    "naphthalene",
    "salicylic_acid",
    "toluene",
    "uracil",
]

# ------------------------------------------------------------------------------------------------------------
# The paper's values (transcribed)
# ------------------------------------------------------------------------------------------------------------
# Table 7, left column: EquiformerV2 (89M) on OC20 S2EF-2M. Values the table gives per number of epochs
# ("2e-4 for 12 epochs, 4e-4 for 20, 30 epochs", ...) are in TABLE7_2M_BY_EPOCHS.
TABLE7_2M = dict(
    warmup_epochs=0.1, weight_decay=1e-3, dropout=0.1, drop_path=0.05, lambda_E=2, lambda_F=100, clip=100,
    ema=0.999, cutoff=12.0, max_neighbors=20, radial_bases=600, d_edge=128, lmax=6, mmax=2, layers=12,
    d_embed=128, d_attn_hidden=64, heads=8, d_attn_alpha=64, d_attn_value=16, d_ffn=128, grid=18,
    p_dens=0.5, lambda_dens=10, r_dens=0.5,
)  # fmt: skip
TABLE7_2M_BY_EPOCHS = {
    12: dict(lr=2e-4, batch=64, sigma=0.1),
    20: dict(lr=4e-4, batch=128, sigma=0.15),
    30: dict(lr=4e-4, batch=128, sigma=0.15),
}
# Table 7, right column: EquiformerV2 (160M) + DeNS on OC20 S2EF-All+MD.
TABLE7_ALL_MD = dict(
    warmup_epochs=0.01, lr=4e-4, batch=512, epochs=2, weight_decay=1e-3, dropout=0.1, drop_path=0.1,
    lambda_E=4, lambda_F=100, clip=100, ema=0.999, cutoff=12.0, max_neighbors=20, radial_bases=600,
    d_edge=128, lmax=6, mmax=3, layers=20, d_embed=128, d_attn_hidden=64, heads=8, d_attn_alpha=64,
    d_attn_value=16, d_ffn=128, grid=18, p_dens=0.125, lambda_dens=15, sigma=0.1, r_dens=0.25,
)  # fmt: skip
# Table 8: EquiformerV2 (127M) + DeNS on OC22.
TABLE8_OC22 = dict(
    warmup_epochs=0.1, lr=2e-4, batch=128, epochs=6, weight_decay=1e-3, dropout=0.1, drop_path=0.1,
    lambda_E=4, lambda_F=100, clip=50, ema=0.999, cutoff=12.0, max_neighbors=20, radial_bases=600,
    d_edge=128, lmax=6, mmax=2, layers=18, d_embed=128, d_attn_hidden=64, heads=8, d_attn_alpha=64,
    d_attn_value=16, d_ffn=128, grid=18, p_dens=0.5, lambda_dens=25, sigma=0.15, r_dens=0.5,
)  # fmt: skip
DENS_ROWS = ("p_dens", "lambda_dens", "sigma", "r_dens")  # rows of Tables 7 and 8 that a baseline drops
# Table 1(a): epochs of each row; §B.1: eSCN uses the DeNS values of the 20-epoch EquiformerV2.
TABLE1A_ESCN = dict(epochs=20, p_dens=0.5, lambda_dens=10, sigma=0.15, r_dens=0.5)
# Table 1(b) / Table 6 check marks: DeNS, force encoding, lambda_E != 0 in Eq. 6, partially corrupted.
DESIGN_CHOICES = {
    1: (False, False, False, False),
    2: (True, True, True, True),
    3: (True, False, True, True),
    4: (True, True, False, True),
    5: (True, True, True, False),
}
# Table 5 check marks: attention, layer normalisation, DeNS (Index 3/4 read as "no attention": README).
TABLE5 = {1: (True, True, False), 2: (True, True, True), 3: (False, True, False), 4: (False, True, True),
          5: (False, False, False), 6: (False, False, True)}  # fmt: skip
# Table 9: lambda_E, lambda_F, p_DeNS, lambda_DeNS, sigma, r_DeNS of Equiformer (Lmax 2 and 3) + DeNS.
TABLE9 = {
    "aspirin": (1, 80, 0.25, 5, 0.05, 0.25),
    "benzene": (1, 80, 0.25, 5, 0.05, 0.25),
    "ethanol": (1, 80, 0.25, 5, 0.05, 0.25),
    "malonaldehyde": (1, 100, 0.25, 5, 0.05, 0.25),
    "naphthalene": (2, 20, 0.25, 5, 0.05, 0.25),
    "salicylic_acid": (1, 80, 0.25, 5, 0.05, 0.25),
    "toluene": (1, 80, 0.125, 5, 0.025, 0.25),
    "uracil": (1, 20, 0.25, 5, 0.05, 0.25),
}
# §4.3 / Table 4: MD17 graphs are all pairs within 5 Å; 6 blocks; Lmax 2 or 3.
MD17_MODEL = dict(cutoff=5.0, max_neighbors=None, layers=6)

# What the paper leaves out, from OFFICIAL_SETTINGS.md.
# §2.1: every OC20/OC22 EquiformerV2 config; eSCN's optimiser and schedule.
OFFICIAL_OC = dict(warmup_factor=0.2, lr_min_factor=0.01, scheduler="cosine", amsgrad=False)
OFFICIAL_ESCN = dict(
    lr=8e-4, batch=96, warmup_epochs=0.01, warmup_factor=0.2, weight_decay=1e-2, amsgrad=True,
    scheduler="multistep", decay_epochs=[11.7, 15.0, 18.3], decay_rate=0.3, clip=100, ema=0.999, lambda_E=2,
    lambda_F=100, layers=12, lmax=6, mmax=2, cutoff=12.0, max_neighbors=20,
)  # fmt: skip
OFFICIAL_ALL_MD_BASELINE_EPOCHS = 1  # also §B.1: "we increase the number of epochs from 1 to 2"
# §2.2: MD17 lr / batch / epochs of the DeNS scripts (equiformer_dens/se_l{2,3}/target@<mol>.sh).
OFFICIAL_MD17_DENS = {
    "l2": {m: (5e-4, 8, 1500) for m in MOLECULES} | {"benzene": (1e-4, 8, 1500)},
    "l3": {m: (2e-4, 5, 2000) for m in MOLECULES} | {"benzene": (1e-4, 8, 1500)},
}
# The baseline scripts (equiformer/se_l{2,3}/target@<mol>.sh): lr, batch, epochs, lambda_E, lambda_F.
OFFICIAL_MD17_BASELINE = {
    "l2": {
        "aspirin": (5e-4, 8, 1500, 1, 80), "benzene": (1e-4, 8, 1500, 1, 80),
        "ethanol": (5e-4, 8, 1500, 1, 80), "malonaldehyde": (5e-4, 8, 1500, 1, 100),
        "naphthalene": (5e-4, 8, 1500, 1, 20), "salicylic_acid": (5e-4, 8, 1500, 1, 80),
        "toluene": (5e-4, 8, 1500, 1, 80), "uracil": (5e-4, 8, 1500, 1, 20),
    },
    "l3": {
        "aspirin": (2e-4, 5, 2000, 1, 100), "benzene": (1e-4, 5, 2000, 1, 80),
        "ethanol": (2e-4, 5, 2000, 1, 80), "malonaldehyde": (2e-4, 5, 2000, 1, 100),
        "naphthalene": (2e-4, 5, 2000, 1, 100), "salicylic_acid": (2e-4, 5, 2000, 1, 100),
        "toluene": (2e-4, 5, 2000, 1, 100), "uracil": (2e-4, 5, 2000, 1, 100),
    },
}  # fmt: skip
# Every MD17 script: weight decay 1e-6, no EMA, no clipping; timm cosine with 10 warm-up epochs from 1e-6
# and a minimum lr of 1e-6; lambda_DeNS decayed linearly (also §D.2); one draw per structure (§D.1); seed 1.
OFFICIAL_MD17 = dict(weight_decay=1e-6, ema=None, clip=None, warmup_epochs=10, scheduler="cosine")
MD17_LR_FLOOR = 1e-6
# The official model configs (md17/configs/equiformer_dens/*.yml, graph_attention_transformer_*_md17).
OFFICIAL_MD17_NODE = {"l2": "128x0e+64x1e+32x2e", "l3": "128x0e+64x1e+64x2e+32x3e"}
OFFICIAL_MD17_FEATURE = {
    ("l2", True): "512x0e+256x1e+128x2e",
    ("l3", True): "512x0e+256x1e+256x2e+128x3e",
    ("l2", False): "512x0e",
    ("l3", False): "512x0e",
}
OFFICIAL_MD17_FORCE_ENCODING = {
    "l2": "1x0e+1x1e+1x2e",
    "l3": "1x0e+1x1e+1x2e+1x3e",
}  # official irreps_equivariant_inputs = dens irreps_force_encoding
OFFICIAL_EVAL_EVERY = {"oc20_2m": 5000, "oc20_all_md": 25000, "oc22": 5000}
# The objective the official trainers compute (proven on ../shared/fixtures/official/objective by
# tests/test_objective_fixtures.py). OC20/OC22 DeNS trainer: one coin per batch (denoising_forces_trainer.py
# l.369), the mask over all atoms with fixed ones encoded (l.56-64, 82-84), forces and noise averaged over the
# free atoms of the batch (l.204-217, 488-627; OCP loss.py l.48-102).
OFFICIAL_OC_OBJECTIVE = dict(
    selection="batch", mask_atoms="all", normalization="atoms", schedule_unit="step", encoding_scale=1.0,
    free_atoms=True,
)  # fmt: skip
# MD17 (main_md17_dens.py): a coin per structure (l.525-530), each term its own mean (l.389-403), lambda_DeNS
# per epoch (l.375), forces encoded in kcal/mol/Å (1 / 0.04336410390059322 eV), the unbiased std (l.159-161).
OFFICIAL_MD17_OBJECTIVE = dict(
    selection="structure", mask_atoms="free", normalization="separate", schedule_unit="epoch",
    encoding_scale=23.060548012069496,
)  # fmt: skip
# Without DeNS, OCP and main_md17.py average forces over the (free) atoms of the batch, energy over structures.
OFFICIAL_BASELINE_OBJECTIVE = dict(normalization="atoms")

# Where each quantity lives in a composed config.
KEYS = dict(
    batch="optim.batch_size", lr="optim.lr", epochs="optim.max_epochs", warmup_epochs="optim.warmup_epochs",
    warmup_factor="optim.warmup_factor", lr_min_factor="optim.lr_min_factor",
    weight_decay="optim.weight_decay",
    amsgrad="optim.amsgrad", scheduler="optim.scheduler", decay_epochs="optim.decay_epochs",
    decay_rate="optim.decay_rate", clip="optim.clip_grad_norm", ema="optim.ema_decay",
    lambda_E="optim.energy_coefficient", lambda_F="optim.force_coefficient",
    dropout="model.backbone.alpha_drop", drop_path="model.backbone.drop_path_rate", cutoff="model.cutoff",
    max_neighbors="model.max_neighbors", radial_bases="model.backbone.num_distance_basis",
    d_edge="model.backbone.edge_channels", lmax="model.backbone.lmax", mmax="model.backbone.mmax",
    layers="model.backbone.num_layers", d_embed="model.backbone.sphere_channels",
    d_attn_hidden="model.backbone.attn_hidden_channels", heads="model.backbone.num_heads",
    d_attn_alpha="model.backbone.attn_alpha_channels", d_attn_value="model.backbone.attn_value_channels",
    d_ffn="model.backbone.ffn_hidden_channels", grid="model.backbone.grid_resolution",
    dens="dens.enabled", p_dens="dens.prob", lambda_dens="dens.coefficient", sigma="dens.sigma",
    r_dens="dens.corrupt_ratio", force_encoding="dens.force_encoding",
    energy_on_corrupted="dens.energy_on_corrupted", lambda_schedule="dens.coefficient_schedule",
    selection="dens.selection", model_dens="model.backbone.dens_heads",
    mask_atoms="dens.mask_atoms", normalization="dens.normalization", schedule_unit="dens.schedule_unit",
    encoding_scale="dens.force_encoding_scale", free_atoms="optim.train_on_free_atoms",
    normalizer="data.normalizer",
    eval_every="trainer.eval_every", molecule="data.molecule",
    md17_node="model.backbone.irreps_node_embedding",
    md17_feature="model.backbone.irreps_feature", md17_sh="model.backbone.irreps_sh",
    md17_radius="model.backbone.max_radius", md17_layers="model.backbone.num_layers",
    attention="model.backbone.attention", layer_norm="model.backbone.layer_norm",
    md17_force_irreps="model.backbone.irreps_force_encoding",
)  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# Expected values of every experiment
# ------------------------------------------------------------------------------------------------------------
def _dens_rows(dens: bool, **values: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"dens": dens, "model_dens": dens}
    if dens:
        out.update(values)
    return out


def _objective(dens: bool, md17: bool) -> dict[str, Any]:
    if not dens:
        return dict(OFFICIAL_BASELINE_OBJECTIVE)
    return dict(OFFICIAL_MD17_OBJECTIVE if md17 else OFFICIAL_OC_OBJECTIVE)


def _oc20_2m(epochs: int, dens: bool) -> dict[str, Any]:
    table = {**TABLE7_2M, **TABLE7_2M_BY_EPOCHS[epochs], "epochs": epochs, **OFFICIAL_OC}
    rows = {k: table.pop(k) for k in DENS_ROWS}
    return {**table, **_dens_rows(dens, **rows, force_encoding=True, energy_on_corrupted=True),
            "eval_every": OFFICIAL_EVAL_EVERY["oc20_2m"], **_objective(dens, md17=False)}  # fmt: skip


def _escn(dens: bool) -> dict[str, Any]:
    table = {**OFFICIAL_ESCN, **TABLE1A_ESCN}
    rows = {k: table.pop(k) for k in DENS_ROWS}
    return {**table, **_dens_rows(dens, **rows), "eval_every": OFFICIAL_EVAL_EVERY["oc20_2m"],
            **_objective(dens, md17=False)}  # fmt: skip


def _table(table: dict[str, Any], dens: bool, eval_every: int, **changes: Any) -> dict[str, Any]:
    table = {**table, **OFFICIAL_OC, **changes}
    rows = {k: table.pop(k) for k in DENS_ROWS}
    return {**table, **_dens_rows(dens, **rows), "eval_every": eval_every, **_objective(dens, md17=False)}


def _ablation(index: int) -> dict[str, Any]:
    dens, force_encoding, energy, partial = DESIGN_CHOICES[index]
    out = _oc20_2m(12, dens)
    out.update(force_encoding=force_encoding, energy_on_corrupted=energy)
    if not partial:
        out["r_dens"] = None
    return out


def _md17(mol: str, lmax: str, dens: bool, **changes: Any) -> dict[str, Any]:
    if dens:
        lr, batch, epochs = OFFICIAL_MD17_DENS[lmax][mol]
        lambda_e, lambda_f, p, lam, sigma, r = TABLE9[mol]
    else:
        lr, batch, epochs, lambda_e, lambda_f = OFFICIAL_MD17_BASELINE[lmax][mol]
    out: dict[str, Any] = dict(
        OFFICIAL_MD17, lr=lr, batch=batch, epochs=epochs, lambda_E=lambda_e, lambda_F=lambda_f,
        cutoff=MD17_MODEL["cutoff"], max_neighbors=MD17_MODEL["max_neighbors"],
        md17_layers=MD17_MODEL["layers"], md17_radius=MD17_MODEL["cutoff"],
        md17_node=OFFICIAL_MD17_NODE[lmax],
        md17_feature=OFFICIAL_MD17_FEATURE[lmax, dens], lmax_sh=int(lmax[1]), molecule=mol,
        eval_every=950 // batch,  # one validation per epoch (drop_last), as the official loop
    )  # fmt: skip
    if dens:
        out.update(_dens_rows(True, p_dens=p, lambda_dens=lam, sigma=sigma, r_dens=r))
        out.update(force_encoding=True, energy_on_corrupted=True)
        out.update(lambda_schedule="linear_decay", selection="structure")
        out.update(md17_force_irreps=OFFICIAL_MD17_FORCE_ENCODING[lmax])
    else:
        out.update(_dens_rows(False))
    out.update(_objective(dens, md17=True), normalizer="auto_unbiased")
    out.update(changes)
    return out


def _table5(mol: str, index: int) -> dict[str, Any]:
    attention, layer_norm, dens = TABLE5[index]
    return _md17(mol, "l2", dens, attention=attention, layer_norm=layer_norm)


def _table6(mol: str, index: int) -> dict[str, Any]:
    dens, force_encoding, energy, partial = DESIGN_CHOICES[index]
    out = _md17(mol, "l2", dens, force_encoding=force_encoding, energy_on_corrupted=energy)
    if not partial:
        out["r_dens"] = None
    return out


# fairchem's MPtrj DeNS recipe (eqV2 S DeNS), transcribed from FAIR-Chem/fairchem
# configs/omat24/mptrj/eqV2_31M_dens_mptrj.yml and configs/omat24/mptrj_dataset.yml (fairchem-core 1.10) and,
# for the conventions fairchem's code fixes, ../shared/fixtures/fairchem/README.md. Not a paper table.
FAIRCHEM_MPTRJ_DENS_S = dict(
    layers=8, lmax=4, mmax=2, d_embed=128, d_attn_hidden=64, heads=8, d_attn_alpha=64, d_attn_value=16,
    d_ffn=128, d_edge=128, grid=18, max_elements=96, avg_num_nodes=31.16592360068011,
    avg_degree=61.94676351484548, cutoff=12.0, max_neighbors=20, strict_max_neighbors=False,
    radial_bases=600, dropout=0.1, drop_path=0.1, stress_head="fairchem", stress_use_denoising=False,
    dens=True, model_dens=True, p_dens=0.5, sigma=0.1, r_dens=None, lambda_dens=10, energy_on_corrupted=True,
    force_encoding=True, selection="batch", lambda_E=5, lambda_F=20, stress_coefficient=5,
    stress_on_corrupted="skip", stress_anisotropic_error="mae", energy_per_atom=True, element_references="fit", normalizer="forces_rms",
    lr=2e-4, batch=512, epochs=150, weight_decay=1e-3, scheduler="cosine", warmup_epochs=0.1,
    warmup_factor=0.2, lr_min_factor=0.01, clip=100, ema=0.999, free_atoms=True, eval_every=5000,
)  # fmt: skip
# configs/omat24/mptrj/eqV2_{86M,153M}_dens_mptrj.yml: the same but for the size and lambda_E 2.5
FAIRCHEM_MPTRJ_DENS_M = dict(FAIRCHEM_MPTRJ_DENS_S, layers=10, lmax=6, mmax=4, lambda_E=2.5)
FAIRCHEM_MPTRJ_DENS_L = dict(FAIRCHEM_MPTRJ_DENS_S, layers=20, lmax=6, mmax=3, lambda_E=2.5)
# name -> (the fairchem file the header must name, expected values)
FAIRCHEM_RECIPES = {
    "mptrj_dens_s": ("configs/omat24/mptrj/eqV2_31M_dens_mptrj.yml", FAIRCHEM_MPTRJ_DENS_S),
    "mptrj_dens_m": ("configs/omat24/mptrj/eqV2_86M_dens_mptrj.yml", FAIRCHEM_MPTRJ_DENS_M),
    "mptrj_dens_l": ("configs/omat24/mptrj/eqV2_153M_dens_mptrj.yml", FAIRCHEM_MPTRJ_DENS_L),
}
KEYS.update(
    max_elements="model.backbone.max_num_elements", avg_num_nodes="model.backbone.avg_num_nodes",
    avg_degree="model.backbone.avg_degree", strict_max_neighbors="model.strict_max_neighbors",
    stress_head="model.backbone.stress_head", stress_use_denoising="model.backbone.stress_use_denoising",
    stress_coefficient="materials.stress_coefficient", stress_on_corrupted="materials.stress_on_corrupted",
    stress_anisotropic_error="materials.stress_anisotropic_error",
    energy_per_atom="materials.energy_per_atom", element_references="materials.element_references",
)  # fmt: skip

# The official file each header must name (OFFICIAL_SETTINGS §2).
DENS_2M_12 = "equiformer_dens_v2_N@12_L@6_M@2_lr@2e-4_epochs@12_std@0.1_gpus@16.yml"
DENS_2M_30 = "equiformer_dens_v2_N@12_L@6_M@2_lr@4e-4_epochs@30_std@0.15_gpus@32.yml"
DENS_ESCN = "escn_dens_N@12_L@6_M@2_epochs@20.yml"
DENS_ALL_MD = "equiformer_v2_dens_N@20_L@6_M@3_lr@4e-4_epochs@2_std@0.1_dens-relax-data-only.yml"
DENS_OC22 = "equiformer_v2_dens_N@18_L@6_M@2_e@4_f@100_std@0.15.yml"

# name -> (the table the header must cite, the official file it must name or None, expected values)
EXPECTED: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    "oc20_2m": ("Table 1(a)", DENS_2M_12, _oc20_2m(12, True)),
    "oc20_2m_20ep": ("Table 1(a)", None, _oc20_2m(20, True)),
    "oc20_2m_30ep": ("Table 1(a)", DENS_2M_30, _oc20_2m(30, True)),
    "oc20_2m_baseline": ("Table 1(a)", "equiformer_v2_N@12_L@6_M@2.yml", _oc20_2m(12, False)),
    "oc20_2m_baseline_20ep": ("Table 1(a)", None, _oc20_2m(20, False)),
    "oc20_2m_baseline_30ep": ("Table 1(a)", "equiformer_v2_N@12_L@6_M@2_epochs@30.yml", _oc20_2m(30, False)),
    "oc20_2m_escn": ("Table 1(a)", DENS_ESCN, _escn(True)),
    "oc20_2m_escn_baseline": ("Table 1(a)", DENS_ESCN, _escn(False)),
    "oc20_2m_ablation_all_on": ("Table 1(b), Index 2", DENS_2M_12, _ablation(2)),
    "oc20_2m_ablation_no_force_encoding": ("Table 1(b), Index 3", DENS_2M_12, _ablation(3)),
    "oc20_2m_ablation_no_energy_on_corrupted": ("Table 1(b), Index 4", DENS_2M_12, _ablation(4)),
    "oc20_2m_ablation_full_corruption": ("Table 1(b), Index 5", DENS_2M_12, _ablation(5)),
    "oc20_all_md": ("Table 2", DENS_ALL_MD, _table(TABLE7_ALL_MD, True, OFFICIAL_EVAL_EVERY["oc20_all_md"])),
    "oc20_all_md_baseline": (
        "Table 2",
        "equiformer_v2_N@20_L@6_M@3_153M.yml",
        _table(TABLE7_ALL_MD, False, 10000, epochs=OFFICIAL_ALL_MD_BASELINE_EPOCHS),
    ),
    "oc22": ("Table 3", DENS_OC22, _table(TABLE8_OC22, True, OFFICIAL_EVAL_EVERY["oc22"])),
    "oc22_baseline": (
        "Table 3",
        "equiformer_v2_N@18_L@6_M@2_e4_f100_121M.yml",
        _table(TABLE8_OC22, False, OFFICIAL_EVAL_EVERY["oc22"]),
    ),
}
TABLE5_NAMES = {
    3: "no_attention_baseline",
    4: "no_attention",
    5: "no_attention_no_layer_norm_baseline",
    6: "no_attention_no_layer_norm",
}
TABLE6_NAMES = {3: "no_force_encoding", 4: "no_energy_on_corrupted", 5: "full_corruption"}
for _mol in MOLECULES:
    for _l in ("l2", "l3"):
        _dens = f"equiformer_dens/se_{_l}/target@{_mol}.sh"
        _base = f"equiformer/se_{_l}/target@{_mol}.sh"
        EXPECTED[f"md17_{_mol}_{_l}"] = ("Table 4", _dens, _md17(_mol, _l, True))
        EXPECTED[f"md17_{_mol}_{_l}_baseline"] = ("Table 4", _base, _md17(_mol, _l, False))
    for _index, _name in TABLE5_NAMES.items():
        EXPECTED[f"md17_table5_{_mol}_{_name}"] = (f"Table 5, Index {_index}", None, _table5(_mol, _index))
    for _index, _name in TABLE6_NAMES.items():
        EXPECTED[f"md17_table6_{_mol}_{_name}"] = (f"Table 6, Index {_index}", None, _table6(_mol, _index))


# ------------------------------------------------------------------------------------------------------------
# Composition
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def composed() -> dict[str, DictConfig]:
    """Every experiment, composed once (``experiment=NAME``, as ``python -m dens.train +experiment=NAME``).

    Speed: Hydra re-reads every config file (its own included) for each composition; sharing its per-call
    file cache across the ~100 compositions makes this fixture about 40% faster. Plain Hydra without it.
    """
    with pytest.MonkeyPatch.context() as mp:
        try:
            from hydra._internal import config_loader_impl
        except ImportError:  # pragma: no cover - another Hydra layout: compose without the shared cache
            config_loader_impl = None
        if hasattr(config_loader_impl, "CachingConfigRepository"):
            caches: dict[int, Any] = {}
            make = config_loader_impl.CachingConfigRepository

            def shared(repository: Any) -> Any:
                if id(repository) not in caches:
                    caches[id(repository)] = make(repository)
                return caches[id(repository)]

            mp.setattr(config_loader_impl, "CachingConfigRepository", shared)
        with initialize_config_module("dens.conf", version_base=None):
            return {name: compose("train", overrides=[f"experiment={name}"]) for name in EXPERIMENTS}


def _get(cfg: DictConfig, key: str) -> Any:
    """A concrete value (interpolations resolved; ``???`` values are never touched)."""
    assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", f"{key} is not in the config"
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value


def _same(actual: Any, expected: Any) -> bool:
    if isinstance(expected, bool) or expected is None or isinstance(expected, str):
        return actual == expected and type(actual) is type(expected)
    if isinstance(expected, list):
        return isinstance(actual, list) and len(actual) == len(expected) and all(map(_same, actual, expected))
    return isinstance(actual, int | float) and not isinstance(actual, bool) and math.isclose(actual, expected)


def test_every_expected_experiment_exists():
    assert set(EXPECTED) == set(EXPERIMENTS) - NOT_A_PAPER_SETTING - set(FAIRCHEM_RECIPES)
    assert set(FAIRCHEM_RECIPES) <= set(EXPERIMENTS)
    assert len(EXPECTED) == 16 + 8 * (4 + 4 + 3)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_composes_and_fits_the_schemas(composed, name):
    cfg = composed[name]
    container = OmegaConf.to_container(cfg, resolve=False)  # composes; '???' values stay unresolved
    assert set(container) >= {"model", "data", "dens", "optim", "trainer", "name"}
    OptimSettings(**OmegaConf.to_container(cfg.optim, resolve=True))
    TrainerSettings(**OmegaConf.to_container(cfg.trainer, resolve=True))
    DeNSSettings.from_dict(OmegaConf.to_container(cfg.dens, resolve=True))
    model = OmegaConf.to_container(cfg.model, resolve=False)
    assert set(model) - {"_target_", "backbone"} <= set(inspect.signature(ForceField).parameters)
    backbone = model["backbone"]
    classes = {"dens.models.EquiformerV2": EquiformerV2, "dens.models.ESCN": ESCN}
    if backbone["_target_"] in classes:  # dens.models.Equiformer (MD17) is reconciled by its author
        assert set(backbone) - {"_target_"} <= set(
            inspect.signature(classes[backbone["_target_"]]).parameters
        )


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_name_and_citation(composed, name):
    assert composed[name].name == name
    lines = (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    header = []
    for line in lines[1:]:
        if not line.startswith("#"):
            break
        header.append(line)
    text = " ".join(header)
    if name in NOT_A_PAPER_SETTING:
        return
    if name in FAIRCHEM_RECIPES:
        assert "Fairchem" in text and FAIRCHEM_RECIPES[name][0] in text, f"{name}: name the fairchem file"
        return
    table, official, _ = EXPECTED[name]
    assert re.search(r"Table \d", header[0]), f"{name}: the first comment line must cite a table"
    assert table in text, f"{name}: the header must cite {table!r}"
    if official is not None:
        assert "Official" in text and official in text, (
            f"{name}: the header must name the official {official}"
        )


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_values_equal_the_paper(composed, name):
    cfg = composed[name]
    _, _, expected = EXPECTED[name]
    wrong = []
    for quantity, value in expected.items():
        if quantity == "lmax_sh":  # MD17: Lmax is the highest degree of the edge spherical harmonics
            actual = max(int(part.split("x")[1][:-1]) for part in _get(cfg, KEYS["md17_sh"]).split("+"))
        else:
            actual = _get(cfg, KEYS[quantity])
        if not _same(actual, value):
            wrong.append(
                f"{quantity} ({KEYS.get(quantity, 'irreps_sh')}): config {actual!r}, paper {value!r}"
            )
    assert not wrong, f"{name}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("name", sorted(FAIRCHEM_RECIPES))
def test_values_equal_fairchems(composed, name):
    cfg = composed[name]
    wrong = []
    for quantity, value in FAIRCHEM_RECIPES[name][1].items():
        actual = _get(cfg, KEYS[quantity])
        if not _same(actual, value):
            wrong.append(f"{quantity} ({KEYS[quantity]}): config {actual!r}, fairchem {value!r}")
    assert not wrong, f"{name}:\n" + "\n".join(wrong)
    # the objective rules of the proven OC20 DeNS objective (fairchem's dens_trainer is its port); MPtrj has
    # no fixed atoms, so mask_atoms 'all' and 'free' coincide
    proven = composed["oc20_2m"]
    assert [_get(cfg, k) for k in OBJECTIVE_RULES] == [_get(proven, k) for k in OBJECTIVE_RULES]


def test_fairchem_recipe_validates_and_builds_the_published_size(composed):
    """The recipe passes dens.train's config check; its model is fairchem's 31M + DeNS parts (34,339,083)."""
    from hydra.utils import instantiate

    from dens.settings import validate_config

    cfg = composed["mptrj_dens_s"].copy()
    cfg.data.train.path, cfg.data.val.path = "train.aselmdb", "val.aselmdb"
    validate_config(OmegaConf.to_container(cfg, resolve=True))
    backbone = instantiate(cfg.model.backbone)
    assert sum(p.numel() for p in backbone.parameters()) == 34_339_083


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_models_without_dens_have_no_dens(composed, name):
    cfg = composed[name]
    dens_on = EXPECTED[name][2]["dens"]
    assert cfg.dens.enabled is dens_on
    assert cfg.model.backbone.dens_heads is dens_on  # no force encoder, no noise head
    if not dens_on:
        assert cfg.dens.prob == 0.0 and cfg.dens.coefficient == 0.0
    assert ("_baseline" in name) is (not dens_on)


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if n.startswith("md17_")))
def test_md17_schedule_floors(composed, name):
    """timm's warm-up and minimum learning rates are 1e-6 whatever the peak lr (OFFICIAL_SETTINGS §2.2)."""
    optim = composed[name].optim
    assert math.isclose(optim.lr * optim.warmup_factor, MD17_LR_FLOOR, rel_tol=1e-9)
    assert math.isclose(optim.lr * optim.lr_min_factor, MD17_LR_FLOOR, rel_tol=1e-9)
    assert composed[name].trainer.seed == 1


def test_md17_variants_use_uniform_init(composed):
    """§D.2: the variant without attention and layer normalisation uses uniform weight initialisation."""
    for mol in MOLECULES:
        for suffix in ("_baseline", ""):
            cfg = composed[f"md17_table5_{mol}_no_attention_no_layer_norm{suffix}"]
            assert cfg.model.backbone.weight_init == "uniform"
            assert cfg.model.backbone.layer_norm is False


def test_all_md_never_corrupts_the_md_split(composed):
    """§B.1: DeNS only on structures of the All split (the MD split is flagged in the data)."""
    assert composed["oc20_all_md"].dens.exclude_key == "md_split"


def test_settings_fields_cover_the_groups():
    """The optim / dens / trainer groups hold exactly the dataclass fields (nothing silently ignored)."""
    for group, cls in (("optim", OptimSettings), ("dens", DeNSSettings), ("trainer", TrainerSettings)):
        fields = {f.name for f in dataclasses.fields(cls)}
        for path in (CONF / group).glob("*.yaml"):
            keys = set(OmegaConf.load(path))
            assert keys <= fields, f"{path.name}: unknown keys {sorted(keys - fields)}"
            if group != "trainer":
                assert keys == fields, f"{path.name}: missing keys {sorted(fields - keys)}"
    for path in (CONF / "materials").glob("*.yaml"):
        assert set(OmegaConf.load(path)) == MATERIALS_KEYS, path.name


# The objective settings: the rules (not the coefficients, which the tables give per experiment).
OBJECTIVE_RULES = (
    "dens.selection", "dens.mask_atoms", "dens.normalization", "dens.schedule_unit", "dens.noise_loss",
    "dens.coefficient_schedule", "dens.force_encoding_scale", "optim.train_on_free_atoms",
)  # fmt: skip


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if EXPECTED[n][2]["dens"]))
def test_dens_experiments_share_the_proven_objective(composed, name):
    """Every DeNS experiment computes its objective with the rules of the experiment that the official
    objective fixtures prove (tests/test_objective_fixtures.py): md17_ethanol_l2 for MD17, oc20_2m for
    OC20 and OC22; the Table 1(b)/5/6 variants differ only in their own switches."""
    proven = composed["md17_ethanol_l2" if name.startswith("md17_") else "oc20_2m"]
    cfg = composed[name]
    wrong = [key for key in OBJECTIVE_RULES if _get(cfg, key) != _get(proven, key)]
    assert not wrong, f"{name}: {[(k, _get(cfg, k), _get(proven, k)) for k in wrong]}"
    if name.startswith("md17_"):
        assert cfg.data.normalizer == proven.data.normalizer == "auto_unbiased"
    else:  # the official constants (OFFICIAL_SETTINGS §4); OC22 has its own after the linear reference
        assert set(cfg.data.normalizer) == {"energy_mean", "energy_std", "force_std"}


@pytest.mark.parametrize(
    "name", [n for n in EXPERIMENTS if n.startswith(("md17_table5_", "md17_table6_", "oc20_2m_ablation_"))]
)
def test_variants_build_on_their_recipe(name):
    """A Table 5/6 variant is its recipe's experiment plus the keys it changes (the values are guarded by
    the tests above, on the composed configuration)."""
    defaults = OmegaConf.load(CONF / "experiment" / f"{name}.yaml").defaults
    assert defaults[0] in EXPERIMENTS and defaults[-1] == "_self_", defaults
