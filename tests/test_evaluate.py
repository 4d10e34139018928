"""S2EF metrics against hand computations, prediction / submission files, and the evaluation CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from inference_helpers import tiny_force_field, write_checkpoint

from dens.data import collate, make_structure
from dens.data.demo import demo_dataset, demo_path
from dens.evaluate import (
    S2EFMetrics,
    average_metrics,
    evaluate,
    load_model,
    main,
    merge_submission,
    s2ef_metrics,
    write_predictions,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _two_structures():
    # structure 0: 2 atoms, atom 1 fixed; structure 1: 1 free atom
    a = make_structure(torch.zeros(2, 3), [1, 8], energy=1.0, forces=[[1.0, 0.0, 0.0], [9.0, 9.0, 9.0]],
                       fixed=[False, True], dtype=torch.float64)  # fmt: skip
    b = make_structure(torch.zeros(1, 3), [6], energy=-2.0, forces=[[0.0, 3.0, 4.0]], dtype=torch.float64)
    batch = collate([a, b])
    pred_e = torch.tensor([1.01, -2.5], dtype=torch.float64)
    pred_f = torch.tensor([[1.02, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 5.0]], dtype=torch.float64)
    return batch, pred_e, pred_f


def test_metrics_match_hand_computation():
    batch, pred_e, pred_f = _two_structures()
    m = s2ef_metrics(pred_e, pred_f, batch)
    # energy: |0.01| and |0.5| eV -> mean 0.255 eV
    assert m["energy_mae"] == pytest.approx(255.0)
    # free atoms: errors (0.02, 0, 0) and (0, 3, 1) -> 6 components sum 4.02 -> 0.67 eV/Å
    assert m["forces_mae"] == pytest.approx(1000 * 4.02 / 6)
    assert m["forces_x_mae"] == pytest.approx(1000 * 0.02 / 2)
    assert m["forces_y_mae"] == pytest.approx(1000 * 3.0 / 2)
    assert m["forces_z_mae"] == pytest.approx(1000 * 1.0 / 2)
    # cosine: 1 for the first atom, (0,3,4).(0,0,5)/(5*5) = 0.8 for the other
    assert m["forces_cosine"] == pytest.approx(0.9)
    # magnitudes: |1.02 - 1| and |5 - 5|
    assert m["forces_magnitude_error"] == pytest.approx(1000 * 0.02 / 2)
    # EFwT: structure 0 has |dE| = 0.01 < 0.02 and max |dF| = 0.02 < 0.03 (the fixed atom ignored); 1 fails
    assert m["efwt"] == pytest.approx(50.0)
    assert m["structures"] == 2 and m["free_atoms"] == 2


def test_efwt_thresholds_are_strict_and_componentwise():
    s = make_structure(torch.zeros(1, 3), [1], energy=0.0, forces=[[0.0, 0.0, 0.0]], dtype=torch.float64)
    batch = collate([s])
    ok = s2ef_metrics(
        torch.tensor([0.0199], dtype=torch.float64), torch.tensor([[0.029, 0.029, 0.029]]), batch
    )
    assert ok["efwt"] == 100.0  # the norm 0.05 exceeds 0.03 but every component is below
    bad = s2ef_metrics(torch.tensor([0.0], dtype=torch.float64), torch.tensor([[0.0, 0.031, 0.0]]), batch)
    assert bad["efwt"] == 0.0


def test_streaming_equals_one_shot():
    batch, pred_e, pred_f = _two_structures()
    whole = s2ef_metrics(pred_e, pred_f, batch)
    m = S2EFMetrics()
    for i, (lo, hi) in enumerate([(0, 2), (2, 3)]):
        sub = collate([batch.structure(i)])
        m.update(pred_e[i : i + 1], pred_f[lo:hi], sub)
    for k, v in whole.items():
        assert m.compute()[k] == pytest.approx(v)


def test_trainer_validation_reports_the_evaluation_metrics():
    from dens.trainer import evaluate_s2ef

    model = tiny_force_field(direct_forces=False, double=False)
    data = [demo_dataset("val")[i] for i in range(6)]
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate)
    val = evaluate_s2ef(model, loader, torch.device("cpu"))
    ref = evaluate(model, data, batch_size=4)
    assert val["energy_mae_meV"] == pytest.approx(ref["energy_mae"], rel=1e-12)
    assert val["forces_mae_meV_A"] == pytest.approx(ref["forces_mae"], rel=1e-12)
    assert val["structures"] == 6 and set(val) == {"energy_mae_meV", "forces_mae_meV_A", "structures"}


def test_average_over_splits_is_plain_mean():
    avg = average_metrics(
        {"val_id": {"energy_mae": 100.0, "efwt": 2.0, "structures": 5.0},
         "val_ood_ads": {"energy_mae": 300.0, "efwt": 4.0, "structures": 1.0}}
    )  # fmt: skip
    assert avg == {"energy_mae": 200.0, "efwt": 3.0}


def test_prediction_file_layout(tmp_path):
    forces = [np.full((2, 3), 1.0), np.full((1, 3), 2.0), np.full((3, 3), 3.0), np.full((1, 3), 9.0)]
    path = write_predictions(tmp_path / "p.npz", ["7_1", "3_0", "10_2", "7_1"], [1.0, 2.0, 3.0, 9.0], forces)
    f = np.load(path)
    assert sorted(f.files) == ["chunk_idx", "energy", "forces", "ids"]
    assert f["ids"].tolist() == ["10_2", "3_0", "7_1"]  # np.unique order, duplicate dropped (first kept)
    assert f["energy"].dtype == np.float16 and f["forces"].dtype == np.float16
    assert f["energy"].tolist() == [3.0, 2.0, 1.0]
    parts = np.split(f["forces"], f["chunk_idx"])
    assert [p.shape[0] for p in parts] == [3, 1, 2]
    assert [float(p[0, 0]) for p in parts] == [3.0, 2.0, 1.0]
    f32 = np.load(write_predictions(tmp_path / "q.npz", ["1_0"], [1.0], [np.ones((1, 3))], "float32"))
    assert f32["forces"].dtype == np.float32


def test_merge_submission(tmp_path):
    files = {}
    for k, split in enumerate(["test_id", "test_ood_ads", "test_ood_cat", "test_ood_both"]):
        files[split] = write_predictions(tmp_path / f"{split}.npz", [f"{k}_0"], [float(k)], [np.ones((1, 3))])
    out = np.load(merge_submission(files, tmp_path / "sub.npz"))
    assert sorted(out.files) == sorted(
        f"{s}_{k}"
        for s in ("id", "ood_ads", "ood_cat", "ood_both")
        for k in ("ids", "energy", "forces", "chunk_idx")
    )
    assert out["ood_cat_ids"].tolist() == ["2_0"]
    with pytest.raises(ValueError, match="need the splits"):
        merge_submission({"id": files["test_id"]}, tmp_path / "bad.npz", "oc20")


def test_evaluate_matches_direct_model_call(tmp_path):
    model = tiny_force_field(direct_forces=True, double=False)
    ds = demo_dataset("val")
    items = [ds[i] for i in range(3)]
    metrics = evaluate(model, items, batch_size=2, predictions_path=tmp_path / "val.npz")
    batch = collate(items)
    pred = model.predict(batch)
    expected = s2ef_metrics(pred["energy"], pred["forces"], batch)
    for k in ("energy_mae", "forces_mae", "forces_cosine", "efwt"):
        assert metrics[k] == pytest.approx(expected[k], rel=1e-4, abs=1e-6)
    f = np.load(tmp_path / "val.npz")
    assert len(f["ids"]) == 3 and all("_" in i for i in f["ids"].tolist())
    assert f["forces"].shape[0] == int((~batch.fixed).sum())


def test_cli_uses_ema_weights_and_writes_files(tmp_path, capsys):
    model = tiny_force_field(direct_forces=True, double=False)
    ckpt = write_checkpoint(model, tmp_path / "best.pt", direct_forces=True, ema_shift=0.01)
    ema_model = load_model(ckpt)
    raw_model = load_model(ckpt, use_ema=False)
    p_ema, p_raw = next(ema_model.parameters()), next(raw_model.parameters())
    assert torch.allclose(p_ema, p_raw + 0.01)
    demo = str(demo_path("val"))
    report = main(["--checkpoint", str(ckpt), "--data", demo, "--data", demo, "--split-name", "val_id",
                   "--split-name", "val_ood_ads", "--out", str(tmp_path / "eval"), "--limit", "2",
                   "--device", "cpu", "--no-progress"])  # fmt: skip
    assert "average" in report and math.isfinite(report["average"]["energy_mae"])
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["ema"] is True and set(saved["splits"]) == {"val_id", "val_ood_ads"}
    assert (tmp_path / "eval" / "val_id_predictions.npz").is_file()
    out = capsys.readouterr().out
    assert "E MAE (meV)" in out and "average" in out
    # the EMA weights are the ones evaluated
    direct = evaluate(ema_model, [demo_dataset("val")[i] for i in range(2)])
    assert saved["splits"]["val_id"]["energy_mae"] == pytest.approx(direct["energy_mae"], rel=1e-6)
