"""The model benchmark's quick mode runs end to end and writes comparable JSON (as CI runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = ("escn_oc20_2m", "equiformer_md17_l2")  # a direct-force and a gradient-force model


def test_quick_model_benchmark_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "benchmarks.models", "--quick", "--models", ",".join(MODELS),
           "--threads", "1", "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "train s" in done.stdout and "failed" not in done.stdout, done.stdout

    payload = json.loads(out.read_text())
    assert payload["machine"]["threads"] == 1 and payload["machine"]["torch"]
    assert payload["machine"]["bf16_products"] in ("AMX", "AVX512-BF16", "none (converted to float32)")
    assert payload["options"]["quick"] and payload["options"]["compile"] == ["off"]
    results = payload["results"]
    assert [(r["model"], r["dens"]) for r in results] == [(m, d) for m in MODELS for d in (False, True)]
    for r in results:
        assert not [key for key in r if "error" in key], r
        assert r["params"] > 0 and r["atoms"] > 0 and r["edges"] > 0 and r["structures"] == r["batch_size"]
        for key in ("graph_ms", "train_s", "train_first_s", "train_structures_per_s", "infer_s",
                    "infer_first_s", "infer_ms_per_structure", "infer_structures_per_s"):  # fmt: skip
            assert r[key] > 0, (key, r)
        assert isinstance(r["train_peak_mb"], float) and isinstance(r["infer_peak_mb"], float)
    for model in MODELS:
        off, on = (r for r in results if r["model"] == model)
        assert on["params"] > off["params"]  # the force encoder and the noise head


def test_small_molecule_benchmark_reports_where_it_ran() -> None:
    """``benchmarks.small_molecule --quick`` times the DeNS study's step and names the machine."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "benchmarks.small_molecule", "--quick", "--layers", "1", "--steps", "2"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "machine:" in done.stdout and "threads 1" in done.stdout, done.stdout
    row = next(
        line
        for line in done.stdout.splitlines()
        if line.startswith("1 block(s), 1 thread(s), eager, this tree")
    )
    assert row.split()[-1] == "x1.00" and float(row.split()[-3]) > 0, row
