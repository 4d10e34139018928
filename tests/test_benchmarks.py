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


def test_equiformer_v2_report_pairs_each_precision_with_its_float32_case(capsys) -> None:
    """``benchmarks.equiformer_v2 --amp none,bf16``: the table has a row per precision, and the autocast
    ratio divides each case by the float32 case of the same mode (synthetic results, no model run)."""
    import argparse

    from benchmarks._machine import describe
    from benchmarks.equiformer_v2 import _report

    args = argparse.Namespace(optimizer=False, layers=None, preset="oc20_2m", quick=True, device="cpu",
                              amp=["none", "bf16"], repeats=1, rounds=2, threads=[2], versus=None,
                              modes=["s2ef", "dens"], json=None)  # fmt: skip
    seconds = {("s2ef", "none"): 10.0, ("s2ef", "bf16"): 6.0, ("dens", "none"): 12.0, ("dens", "bf16"): 9.0}
    results = [
        dict(revision="now", design="fused/passive", mode=mode, load=0, threads=2, amp=amp, round=rnd,
             median_s=t * (1 + rnd / 10), params=1, edges=1, structures=2, peak_gb=1.0)
        for rnd in (0, 1) for (mode, amp), t in seconds.items()
    ]  # fmt: skip
    _report(args, describe(2, "retain"), results)
    out = capsys.readouterr().out
    assert "s2ef load 0 threads 2 amp bf16: x0.60" in out and "dens load 0 threads 2 amp bf16: x0.75" in out
    assert "DeNS overhead (now fused/passive load 0 threads 2 amp bf16): +50.0%" in out, out
