"""``experiments/small_scale.py``: a smoke run on the real data and the aggregation of run results."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "small_scale.py"


@pytest.fixture(scope="module")
def small_scale():
    spec = importlib.util.spec_from_file_location("small_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.parametrize(("task", "variant"), [("ethanol", "dens_no_fe"), ("oc20", "dens")])
def test_smoke_run(small_scale, external_shared_dir, one_thread, tmp_path, task, variant):
    out = tmp_path / "results"
    result = small_scale.run_one(
        task, variant, 0, out=out, runs=tmp_path / "runs", cache=tmp_path / "cache", smoke=True
    )
    saved = json.loads((out / f"{task}_{variant}_seed0.json").read_text())
    assert saved["test"] == pytest.approx(result["test"])
    assert saved["steps"] == 8 and saved["val_curve"][0]["step"] == 0 and saved["val_curve"][-1]["step"] == 8
    assert saved["test_structures"] > 0
    for key in ("energy_mae_meV", "forces_mae_meV_A"):
        assert 0 < saved["test"][key] < 1e6
    dens = saved["config"]["dens"]
    assert dens["enabled"] and dens["force_encoding"] == (variant == "dens")
    assert saved["config"]["trainer"]["seed"] == 0
    # the schedule spans exactly the run: the last logged learning rate is the cosine floor
    lr_min = saved["config"]["optim"]["lr"] * saved["config"]["optim"]["lr_min_factor"]
    assert saved["train_log"][-1]["lr"] == pytest.approx(lr_min)
    # the held-out denoising check: every test structure corrupted, the zero predictor on the same draws
    held = saved["test_denoising"]
    assert held["atoms"] > 0 and 0 < held["zero_l2mae"] < 10 and held["noise_l2mae"] > 0


def test_window_means(small_scale):
    """Training terms averaged per validation interval; the noise term over steps with corrupted atoms only."""
    history = [{"step": 0, "val/forces_mae_meV_A": 5.0}]
    history += [
        {
            "step": s,
            "epoch": 0,
            "lr": 0.1 * s,
            "train/loss": float(s),
            "train/noise": 0.0 if s % 2 else 2.0 * s,
        }
        for s in range(1, 7)
    ]
    rows = small_scale.window_means(history, 3)
    assert [r["step"] for r in rows] == [3, 6] and rows[1]["lr"] == pytest.approx(0.6)
    assert rows[0]["train/loss"] == pytest.approx(2.0) and rows[1]["train/loss"] == pytest.approx(5.0)
    assert rows[0]["train/noise"] == pytest.approx(4.0) and rows[0]["noise_steps"] == 1
    assert rows[1]["train/noise"] == pytest.approx(10.0) and rows[1]["noise_steps"] == 2
    assert small_scale.NOISE_ZERO_L2MAE == pytest.approx(1.5957691216057308)


def _fake(task, variant, seed, force, energy, steps=100):
    return {
        "task": task,
        "variant": variant,
        "seed": seed,
        "steps": steps,
        "parameters": 1234,
        "val_curve": [
            {"step": s, "energy_mae_meV": energy * 2, "forces_mae_meV_A": force * (2 - s / steps)}
            for s in range(0, steps + 1, 50)
        ],
        "best_val_forces_mae_meV_A": force,
        "test": {"energy_mae_meV": energy, "forces_mae_meV_A": force},
        "wall_s": {"train": 50.0, "test_eval": 10.0, "total": 60.0},
    }


def test_report_aggregates(small_scale, tmp_path):
    runs = [
        _fake("ethanol", "baseline", 0, 10.0, 4.0),
        _fake("ethanol", "baseline", 1, 12.0, 6.0),
        _fake("ethanol", "dens", 0, 9.0, 4.0),
        _fake("ethanol", "dens", 1, 9.0, 3.0),
        _fake("oc20", "baseline", 0, 100.0, 500.0),
    ]
    for r in runs:
        (tmp_path / f"{r['task']}_{r['variant']}_seed{r['seed']}.json").write_text(json.dumps(r))
    md = small_scale.report(tmp_path)
    assert md == (tmp_path / "summary.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| MD17 ethanol") and "| 1,234 |" in line]
    rows = {line.split("|")[2].strip(): line for line in table}
    # mean ± sample std over seeds
    assert "5.0 ± 1.4 | 11.0 ± 1.4" in rows["without DeNS"]
    assert "3.5 ± 0.7 | 9.0 ± 0.0" in rows["with DeNS"]
    # paired by seed: 9/10 - 1 = -10 %, 9/12 - 1 = -25 %
    assert "-10.0, -25.0" in md
    assert "| OC20 relaxations (EquiformerV2) | without DeNS | 1,234 | 100 | 0 | 500.0 ± 0.0" in md
    assert "Runs: 5; total wall time 5.0 min." in md
    pytest.importorskip("matplotlib")
    png = tmp_path / "val_force_mae.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert f"]({png.name})" in md


def test_any_data_file(small_scale, shared_dir, one_thread, tmp_path):
    """--data runs the study on any molecular file, with its unit and split sizes, and the official
    objective of the paper experiments (MD17: each term its own mean, the unbiased-std normaliser)."""
    data = shared_dir / "data" / "md17" / "rmd17_aspirin_1000_meV.xyz"
    task = small_scale.data_task(data, "meV", n_train=100, n_val=20, n_test=30)
    assert task.name == "rmd17_aspirin_1000_meV" and task.experiments["dens"] == "md17_ethanol_l2"
    cfg, _ = small_scale.compose(task, "dens", 0, tmp_path / "run", 100, False, tmp_path / "cache")
    assert cfg.data.path == str(data.resolve()) and cfg.data.options.energy_unit == "meV"
    assert (cfg.data.split.train, cfg.data.split.val, cfg.data.split.test) == (100, 20, 30)
    assert cfg.dens.normalization == "separate" and cfg.data.normalizer == "auto_unbiased"
    out = tmp_path / "results"
    argv = ["--data", str(data), "--energy-unit", "meV", "--n-train", "100", "--n-val", "20", "--n-test", "30",
            "--variant", "baseline", "--seed", "0", "--smoke", "--out", str(out), "--runs", str(tmp_path / "runs")]  # fmt: skip
    assert small_scale.main(argv) == 0
    saved = json.loads((out / "rmd17_aspirin_1000_meV_baseline_seed0.json").read_text())
    assert saved["config"]["data"]["path"] == str(data.resolve()) and saved["test_structures"] > 0
    with pytest.raises(SystemExit):
        small_scale.main(["--data", str(data), "--task", "oc20", "--variant", "dens", "--seed", "0"])


def test_report_denoising(small_scale, tmp_path):
    """The report says whether denoising was learned: the training noise term per interval (first, last) and
    the held-out noise error against predicting zero; the run folders' progress is readable mid-run."""
    for seed, (first, last, held) in enumerate([(1.6, 1.0, 1.1), (1.6, 1.2, 1.3)]):
        for variant in ("baseline", "dens"):
            run = _fake("ethanol", variant, seed, 10.0, 4.0)
            run["train_log"] = [{"step": 50, "train/forces": 1.0}, {"step": 100, "train/forces": 0.5}]
            if variant == "dens":
                run["train_log"][0]["train/noise"], run["train_log"][1]["train/noise"] = first, last
                run["test_denoising"] = {"noise_l2mae": held, "zero_l2mae": 1.59, "atoms": 10, "seed": 0}
            (tmp_path / f"ethanol_{variant}_seed{seed}.json").write_text(json.dumps(run))
    md = small_scale.report(tmp_path)
    row = next(
        line for line in md.splitlines() if line.startswith("| MD17 ethanol") and "| 2 | 1.600" in line
    )
    assert "| 1.600 ± 0.000 | 1.100 ± 0.141 | 1.200 ± 0.141 | 1.590 |" in row
    assert "without DeNS | 2 |" not in md  # no noise term without DeNS
    runs = tmp_path / "runs" / "ethanol_dens_seed0"
    runs.mkdir(parents=True)
    records = [
        {"step": 0, "val/forces_mae_meV_A": 9.0},
        {"step": 7},
        {"step": 10, "val/forces_mae_meV_A": 4.0},
    ]
    (runs / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + '\n{"step": 1')
    assert small_scale.progress(tmp_path / "runs") == (
        "ethanol_dens_seed0: step 10; val force MAE last 4.0 (step 10), best 4.0 (step 10)"
    )
