"""The table scripts of ``experiments/``: dry runs, metric collection, rendering, the paper's numbers.

The smoke trainings (``--smoke``) are not run here: ``.ci/run`` runs them. Collection is tested on run
directories fabricated in ``tmp_path`` (metrics, checkpoints, a tiny real model).
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

import _collect  # noqa: E402
import _tables as T  # noqa: E402

from dens.data import Subset, open_dataset  # noqa: E402
from dens.data.demo import demo_path  # noqa: E402
from dens.evaluate import evaluate, load_model  # noqa: E402

PAPER_TEXT = REPO.parent / "shared" / "paper" / "dens-tmlr2024.txt"
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
OC20_2M = ["oc20_2m_baseline", "oc20_2m", "oc20_2m_baseline_20ep", "oc20_2m_20ep", "oc20_2m_baseline_30ep",
           "oc20_2m_30ep", "oc20_2m_escn_baseline", "oc20_2m_escn"]  # fmt: skip
TABLE5 = ["table5_{}_no_attention_baseline", "table5_{}_no_attention", "table5_{}_no_attention_no_layer_norm_baseline",
          "table5_{}_no_attention_no_layer_norm"]  # fmt: skip
TABLE6 = ["table6_{}_no_force_encoding", "table6_{}_no_energy_on_corrupted", "table6_{}_full_corruption"]
# The experiments behind every table, written out independently of the scripts.
EXPECTED = {
    "table1a": OC20_2M,
    "table1b": ["oc20_2m_baseline", "oc20_2m", "oc20_2m_ablation_no_force_encoding",
                "oc20_2m_ablation_no_energy_on_corrupted", "oc20_2m_ablation_full_corruption"],
    "table2": ["oc20_all_md_baseline", "oc20_all_md"],
    "table3": ["oc22_baseline", "oc22"],
    "table4": [f"md17_{m}_{v}" for m in MOLECULES for v in ("l2_baseline", "l3_baseline", "l2", "l3")],
    "table5": [f"md17_{m}_{v}" for m in MOLECULES for v in ("l2_baseline", "l2")]
    + [f"md17_{p.format(m)}" for m in MOLECULES for p in TABLE5],
    "table6": [f"md17_{m}_{v}" for m in MOLECULES for v in ("l2_baseline", "l2")]
    + [f"md17_{p.format(m)}" for m in MOLECULES for p in TABLE6],
    "table10": [f"md17_{m}_{v}" for m in ("aspirin", "ethanol", "naphthalene", "salicylic_acid")
                for v in ("l2_baseline", "l2")],
}  # fmt: skip


def script(name: str) -> ModuleType:
    """A table script of ``experiments/`` as a module."""
    return importlib.import_module(name)


# --------------------------------------------------------------------------------------------------
# Dry runs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dry_run_lists_the_experiments(name, tmp_path, capsys):
    assert script(name).main(["--dry-run", "--runs-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^\[\d+/\d+\] (\S+)", out, flags=re.MULTILINE)
    assert sorted(listed) == sorted(set(EXPECTED[name]))
    for experiment in listed:
        assert (REPO / "dens" / "conf" / "experiment" / f"{experiment}.yaml").is_file()
        assert f"+experiment={experiment} trainer.run_dir={tmp_path / 'runs' / experiment}" in out
    assert out.count("    paper:  ") == len(listed)
    assert "paper total:" in out
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_dry_run_reports_gpus_hours_and_missing_data(capsys):
    assert script("table1a").main(["--dry-run", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "16 x V100 32GB, 1501 GPU-hours" in out  # oc20_2m: §B.1 and Table 1(a)
    assert "32 x V100 32GB, 3752 GPU-hours" in out  # oc20_2m_30ep
    assert "--nproc_per_node=8" in out and "slurm:  4 node(s) x 8 GPU(s)" in out
    assert "needs:  data.train.path, data.val.path" in out
    assert "paper total: 18,608 GPU-hours over the 8 of 8 runs" in out
    assert script("table4").main(["--dry-run", "--data-dir", "/data/md17"]) == 0
    out = capsys.readouterr().out
    assert "data.path=/data/md17/md17_benzene2017.npz" in out and "needs:" not in out
    assert "1 x A5000 24GB, 61 GPU-hours (mean over the 8 molecules)" in out
    assert script("table6").main(["--dry-run"]) == 0
    assert "1 x A5000 24GB, not reported" in capsys.readouterr().out


def test_slurm_scripts_use_the_papers_gpus(tmp_path, capsys):
    argv = [
        "--slurm",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--out",
        str(tmp_path / "out"),
        "--only",
        "oc20_2m",
    ]
    assert script("table1b").main([*argv, "data.train.path=/d/train", "data.val.path=/d/val"]) == 0
    text = (tmp_path / "out" / "slurm" / "oc20_2m.sbatch").read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=8" in text
    assert "-m dens.train +experiment=oc20_2m" in text and "data.train.path=/d/train" in text
    assert f"touch {tmp_path / 'runs' / 'oc20_2m' / 'FINISHED'}" in text
    with pytest.raises(SystemExit, match=r"needs data\.train\.path"):
        script("table1b").main(argv)


def test_local_commands():
    run = T.RUNS["oc20_all_md"]
    plan = T.Plan(run, Path("runs/oc20_all_md"), [], nproc=4)
    cmd = plan.command()
    assert cmd[:5] == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    one = T.Plan(T.RUNS["md17_ethanol_l2"], Path("r"), ["data.path=x.npz"], nproc=1).command()
    assert one == [
        "python",
        "-m",
        "dens.train",
        "+experiment=md17_ethanol_l2",
        "trainer.run_dir=r",
        "data.path=x.npz",
    ]
    assert T.missing_keys("oc20_all_md", ["data.train.0.path=a"]) == ["data.train.1.path", "data.val.path"]


# --------------------------------------------------------------------------------------------------
# Collection from fabricated run directories
# --------------------------------------------------------------------------------------------------
def test_training_summary_from_metrics_records():
    config = {"optim": {"batch_size": 8}, "trainer": {"log_every": 10}}
    records = [
        {"step": 0, "val/energy_mae_meV": 900.0, "val/forces_mae_meV_A": 90.0},
        {"step": 10, "structures_per_s": 80.0},  # 80 structures in 1 s
        {"step": 20, "structures_per_s": 40.0},  # 80 structures in 2 s
        {"step": 25, "structures_per_s": 50.0},  # the last, shorter window: 40 structures in 0.8 s
        {"step": 25, "val/energy_mae_meV": 500.0, "val/forces_mae_meV_A": 50.0},
    ]
    out = T.training_summary(records, config, world_size=2)
    assert out["step"] == 25 and out["world_size"] == 2
    assert out["gpu_hours"] == pytest.approx(3.8 * 2 / 3600)
    assert out["throughput"] == pytest.approx(200 / 3.8 / 2)
    assert (out["trainer_val.energy_mae"], out["trainer_val.forces_mae"]) == (500.0, 50.0)
    # current runs log each window's wall time and world size: those are used as they are
    timed = [{"step": 10, "structures_per_s": 80.0, "window_s": 1.5, "world_size": 4}]
    out = T.training_summary(timed, config, world_size=2)
    assert out["gpu_hours"] == pytest.approx(1.5 * 4 / 3600)
    assert out["throughput"] == pytest.approx(80 / 1.5 / 4)


def _fabricate_run(run_dir: Path, step: int = 7) -> None:
    """A finished run: config, metrics, last.pt (world size 2) and best.pt of a tiny real EquiformerV2."""
    cfg = T.experiment_config("demo")
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(T.SMOKE_MODELS["dens.models.EquiformerV2"])))
    normalizer = {"energy_mean": 0.0, "energy_std": 1.0, "force_std": 1.0}
    torch.manual_seed(0)
    model = instantiate(cfg.model, backbone=instantiate(cfg.model.backbone), **normalizer)
    config = OmegaConf.to_container(cfg, resolve=True) | {"resolved_normalizer": normalizer}
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save(
        {"model": model.state_dict(), "config": config, "step": step}, run_dir / "checkpoints" / "best.pt"
    )
    torch.save({"world_size": 2, "step": 10}, run_dir / "checkpoints" / "last.pt")
    (run_dir / "config.json").write_text(json.dumps(config))
    records = [{"step": 10, "structures_per_s": 8.0}]  # 10 steps x 8 structures in 10 s, on 2 devices
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "FINISHED").write_text("python -m dens.train ...\n")


def test_collect_run_evaluates_best_pt_and_caches(tmp_path, monkeypatch):
    run_dir = tmp_path / "oc20_2m"
    _fabricate_run(run_dir)
    splits = {"val_id": str(demo_path("val")), "val_ood_ads": str(demo_path("test"))}
    options = T.EvalOptions(splits, "cpu", 4, limit=3)
    out = T.collect_run(T.RUNS["oc20_2m"], run_dir, options, None)
    model = load_model(run_dir / "checkpoints" / "best.pt")
    expected = {s: evaluate(model, Subset(open_dataset(p), range(3)), 4) for s, p in splits.items()}
    assert out["status"] == "finished" and out["step"] == 10
    assert out["val_id.energy_mae"] == pytest.approx(expected["val_id"]["energy_mae"])
    assert out["val_ood_ads.forces_mae"] == pytest.approx(expected["val_ood_ads"]["forces_mae"])
    mean = (expected["val_id"]["energy_mae"] + expected["val_ood_ads"]["energy_mae"]) / 2
    assert out["val.energy_mae"] == pytest.approx(mean)
    assert out["params"] == sum(p.numel() for p in model.parameters())
    assert out["gpu_hours"] == pytest.approx(10 * 2 / 3600)
    assert any("mean over ['val_id', 'val_ood_ads'] only" in n for n in out["notes"])
    # a second collection reads the cache in run_dir/eval: nothing is evaluated again
    monkeypatch.setattr(_collect, "evaluate", lambda *a, **k: pytest.fail("evaluated twice"))
    assert T.collect_run(T.RUNS["oc20_2m"], run_dir, options, None) == out


def test_collect_only_puts_cached_metrics_in_their_cells(tmp_path, capsys):
    """Fabricated MD17 outputs with known numbers land in Table 6, row 2, ethanol."""
    runs = tmp_path / "runs"
    run_dir = runs / "md17_ethanol_l2"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"step": 3}, run_dir / "checkpoints" / "best.pt")
    torch.save({"world_size": 1}, run_dir / "checkpoints" / "last.pt")
    config = {"optim": {"batch_size": 8}, "trainer": {"log_every": 1}, "data": {"path": "eth.npz"}}
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "structures_per_s": 8.0}) + "\n")
    best = str(run_dir / "checkpoints" / "best.pt")
    for name, key, value in [
        ("test", {"data": "eth.npz", "limit": None}, {"metrics": {"energy_mae": 2.345, "forces_mae": 2.567}, "files": []}),
        ("params", {}, {"params": 4_000_000}),
    ]:  # fmt: skip
        (run_dir / "eval").mkdir(exist_ok=True)
        record = {"key": {"checkpoint": best, "step": 3, **key}, "value": value}
        (run_dir / "eval" / f"{name}.json").write_text(json.dumps(record))
    out = tmp_path / "out"
    argv = ["--collect-only", "--runs-dir", str(runs), "--out", str(out), "--only", "md17_ethanol_l2"]
    assert script("table6").main(argv) == 0
    rows = {r["Index"]: r for r in csv.DictReader(io.StringIO((out / "table6.csv").read_text()))}
    assert rows["2"]["Ethanol energy (paper)"] == "2.2" and rows["2"]["Ethanol energy (ours)"] == "2.3"
    assert rows["2"]["Ethanol forces (paper)"] == "2.6" and rows["2"]["Ethanol forces (ours)"] == "2.6"
    assert rows["2"]["Aspirin forces (ours)"] == "–" and rows["3"]["Ethanol forces (ours)"] == "–"
    assert rows["2"]["DeNS"] == T.CHECK and rows["4"]["λE≠0 in Eq. 6"] == ""
    assert "| 2 | ✓ | ✓ | ✓ | ✓ | 5.1 / – |" in (out / "table6.md").read_text()
    results = json.loads((out / "table6.json").read_text())
    assert results["runs"]["md17_ethanol_l2"]["test.forces_mae"] == 2.567
    assert "2.6 / 2.6" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------
def test_render_cells_means_and_reasons():
    table = T.Table(
        name="t",
        title="Test table",
        label_header="Model",
        columns=(
            T.Column("forces", "Group", 2),
            T.Column("energy", "Group", 0),
            T.Column("params", decimals=1, kind="params"),
            T.Column("test", decimals=1),
        ),
        rows=(
            T.Row("ours", (T.Cell("19.09", ("oc20_2m",), "val.forces_mae"), T.Cell("269", ("oc20_2m",), "val.energy_mae"),
                           T.Cell("89M", ("oc20_2m", "oc20_2m_20ep"), "params"), T.Cell("214", ("oc20_2m",), na="hidden labels"))),
            T.paper_row("other", ("1.5", "2", "3M", "-")),
        ),
    )  # fmt: skip
    results = {"oc20_2m": {"val.forces_mae": 19.123, "val.energy_mae": 270.6, "params": 89_200_000}}
    r = T.render(table, results)
    assert "19.09 / 19.12" in r.text and "269 / 271" in r.text and "89M / 89.2M (1/2)" in r.text
    assert "214 / n/a[1]" in r.text and "[1] n/a: hidden labels" in r.text
    assert r.text.splitlines()[1].split() == ["Group"]  # the group header spans its two columns
    rows = list(csv.reader(io.StringIO(r.csv)))
    assert rows[0][:3] == ["Model", "Group forces (paper)", "Group forces (ours)"]
    assert rows[1][1:3] == ["19.09", "19.12"] and rows[2][1:3] == ["1.5", ""]
    assert "| ours | 19.09 / 19.12 | 269 / 271 | 89M / 89.2M (1/2) | 214 / n/a[1] |" in r.markdown
    assert T.render(table, {}).text.count("/ –") == 3


def test_columns_format_like_the_paper():
    assert T.Column("x", decimals=2).format(18.024) == "18.02"
    assert T.Column("x", decimals=0).format(250.6) == "251"
    assert T.Column("x", decimals=2, kind="params").format(4_003_000) == "4.00M"
    assert T.Column("x", decimals=0).format(0.0002) == "0.0002"  # tiny smoke values stay visible


def test_tables_are_consistent():
    for name in EXPECTED:
        table = script(name).TABLE
        assert all(len(row.cells) == len(table.columns) for row in table.rows)
        paper = T.PAPER[table.name]
        assert [row.label for row in table.rows] == list(paper)
        for row in table.rows:
            shown = [c.paper for c, col in zip(row.cells, table.columns, strict=True) if col.kind != "mark"]
            assert shown[: len(T.paper(table.name, row.label))] == list(T.paper(table.name, row.label))


# --------------------------------------------------------------------------------------------------
# The paper's numbers
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paper_text() -> str:
    if not PAPER_TEXT.is_file():
        pytest.skip(f"the paper's text is not at {PAPER_TEXT} (no ../shared in this checkout)")
    return PAPER_TEXT.read_text()


def test_every_transcribed_row_is_in_the_paper(paper_text):
    squeezed = re.sub(r"\s+", "", paper_text)
    for table, rows in T.PAPER.items():
        for label, entries in rows.items():
            assert entries.replace(" ", "") in squeezed, f"{table}, row {label!r}: {entries}"
    for hours, params in T.PAPER_TRAINING.values():
        assert f"{hours}GPU-hours" in squeezed and params in squeezed


def test_spot_checks_against_the_paper_lines(paper_text):
    lines = paper_text.splitlines()

    def line(start: str) -> str:
        return next(x for x in lines if x.startswith(start))

    assert (
        line("Equiformer ( Lmax“3) + DeNS 5.0 5.2")
        .replace(" ", "")
        .endswith("".join(T.paper("table4", "Equiformer (Lmax=3) + DeNS")))
    )
    assert line("12 20.46 285").split() == ["12", *T.paper("table1a", "12")]
    assert line("EquiformerV2 + DeNS ( λE“4,160M)").split()[-6:] == list(T.paper("table2", "EquiformerV2 + DeNS (λE=4, 160M)"))  # fmt: skip
    assert T.paper("table3", "EquiformerV2 + DeNS (λE=4, λF=100)")[1] == "391.6"
    assert T.paper("table6", "3")[10:12] == ("5.2", "10.6")  # salicylic acid without force encoding
    assert T.paper("table5", "5")[3] == "9.2" and T.paper("table10", "Equiformer (Lmax=2)")[6] == "289.9"
    assert T.RUNS["oc20_all_md"].gpu_hours == 88982 and T.RUNS["oc22"].gpu_hours == 5082
