"""Collection: the metrics of a finished run (evaluations of ``checkpoints/best.pt``, cached in
``<run_dir>/eval``), its parameter count and its training cost."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _launch import run_status
from _paper import Run
from torch import nn

from dens.checkpoint import load_checkpoint
from dens.data import (
    LinearReference,
    Subset,
    load_split,
    md17_splits,
    open_dataset,
)
from dens.evaluate import SUBMISSION_SPLITS, average_metrics, evaluate, load_model, merge_submission
from dens.relax import RelaxSettings, relax_dataset


# ==================================================================================================
# Collection: metrics files, checkpoints, evaluations
# ==================================================================================================
def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (training and validation), in order."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_summary(
    records: Sequence[Mapping[str, Any]], config: Mapping[str, Any], world_size: int
) -> dict[str, Any]:
    """Training time (GPU-hours), throughput (structures per GPU-second) and the last validation.

    Each training record covers the steps since the previous one (``trainer.log_every``), validation and
    checkpoint writes included: its wall time ``window_s`` and ``world_size`` (older runs logged only
    ``structures_per_s``, and the time is then its structures, steps x ``optim.batch_size``, divided by
    that rate). The sum of time times world size is the GPU-hours. Steps repeated after a resume count
    twice (they were computed twice); time before the first step (data loading, the step-0 validation) is
    left out.
    """
    batch = int(config["optim"]["batch_size"])
    log_every = int(config["trainer"]["log_every"])
    seconds = structures = gpu_seconds = 0.0
    out: dict[str, Any] = {"world_size": world_size}
    for r in records:
        out["step"] = max(out.get("step", 0), int(r.get("step", 0)))
        if "val/energy_mae_meV" in r:
            out["trainer_val.energy_mae"] = r["val/energy_mae_meV"]
            out["trainer_val.forces_mae"] = r["val/forces_mae_meV_A"]
        rate = r.get("structures_per_s")
        if rate:
            step = int(r["step"])
            n = (step - (step - 1) // log_every * log_every) * batch
            window = float(r.get("window_s", n / rate))
            gpus = int(r.get("world_size", world_size))
            structures += n
            seconds += window
            gpu_seconds += window * gpus
    if seconds > 0:
        out["gpu_hours"] = gpu_seconds / 3600
        out["throughput"] = structures / gpu_seconds
    return out


def _load(path: Path) -> dict[str, Any]:
    return load_checkpoint(path, verify=False, mmap=True)  # metadata: no need to read every tensor


class TotalEnergy(nn.Module):
    """A model whose energies get the per-element linear reference added back: OC22 total energies.

    OC22 runs train on energies minus ``Σ coeff[Z]`` (``data.options.linear_reference``); the OC22 metrics
    and the evaluation server use total energies.
    """

    def __init__(self, model: nn.Module, coeff: Any) -> None:
        super().__init__()
        self.model = model
        self.reference = LinearReference(coeff)
        self.direct_forces = getattr(model, "direct_forces", True)

    def predict(self, batch: Any) -> dict[str, Any]:
        out = dict(self.model.predict(batch))
        ref = self.reference.reference(batch.atomic_numbers, batch.batch, batch.num_graphs)
        out["energy"] = out["energy"] + ref.to(out["energy"])
        return out


@dataclass(frozen=True)
class EvalOptions:
    """How the checkpoints are evaluated.

    Attributes
    ----------
    splits : dict
        ``--eval`` split name -> data path: ``val_*`` (metrics), ``test_*`` (prediction files for the
        evaluation server), ``is2re_test_*`` (relaxations, IS2RE prediction files).
    device : str
        Evaluation device.
    batch_size : int
        Structures per forward pass (relaxations: per batch).
    limit : int, optional
        Evaluate only the first structures of every split (smoke runs).
    relax_steps : int, optional
        Cap the relaxation steps of the preset (smoke runs).
    """

    splits: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    batch_size: int = 8
    limit: int | None = None
    relax_steps: int | None = None


class RunEvaluator:
    """Evaluations of one run's ``best.pt`` (or another ``checkpoint``), cached in ``<run_dir>/eval``.

    A cached result is reused while the checkpoint (path and training step) and the evaluation settings are
    the same.
    """

    def __init__(
        self,
        run: Run,
        run_dir: Path,
        config: Mapping[str, Any],
        options: EvalOptions,
        checkpoint: Path | None = None,
    ) -> None:
        self.run, self.run_dir, self.config, self.options = run, run_dir, config, options
        self.checkpoint = checkpoint or run_dir / "checkpoints" / "best.pt"
        state = _load(self.checkpoint)
        self.step = int(state.get("step", -1)) if isinstance(state, Mapping) else -1
        self.cache = run_dir / "eval"
        self._model: Any = None
        data_options = dict(config.get("data", {}).get("options") or {})
        self.linear_reference = data_options.pop("linear_reference", None)
        self.data_options = data_options

    @property
    def model(self) -> Any:
        """The model of the checkpoint (EMA weights; OC22: predicting total energies)."""
        if self._model is None:
            model = load_model(self.checkpoint, device=self.options.device)
            self._model = (
                model if self.linear_reference is None else TotalEnergy(model, self.linear_reference)
            )
        return self._model

    def cached(
        self, name: str, key: Mapping[str, Any], compute: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """``compute()``, or its result stored in ``<run_dir>/eval/<name>.json`` under the same key."""
        path = self.cache / f"{name}.json"
        key = json.loads(json.dumps({"checkpoint": str(self.checkpoint), "step": self.step, **key}))
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("key") == key:
                return record["value"]
        value = compute()
        self.cache.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "value": value}, indent=2))
        return value

    def _dataset(self, path: str | Path, **options: Any) -> Any:
        ds = open_dataset(path, **options)
        if self.options.limit is not None and len(ds) > self.options.limit:
            ds = Subset(ds, list(range(self.options.limit)))
        return ds

    def params(self) -> int:
        return int(
            self.cached("params", {}, lambda: {"params": sum(p.numel() for p in self.model.parameters())})[
                "params"
            ]
        )

    def s2ef(self, split: str, path: str, predictions: bool) -> dict[str, Any]:
        """S2EF metrics (labelled splits) and, for test splits, the evaluation-server prediction file."""
        pred = self.cache / f"{split}_predictions.npz" if predictions else None
        dtype = "float32" if self.run.dataset == "oc22" else "float16"  # official prediction precision

        def compute() -> dict[str, Any]:
            ds = self._dataset(path, **self.data_options)
            out = evaluate(self.model, ds, self.options.batch_size, self.options.device, pred, dtype)
            return {"metrics": out, "files": [str(pred)] if pred else []}

        return self.cached(split, {"data": str(path), "limit": self.options.limit}, compute)

    def is2re(self, split: str, path: str, preset: str) -> dict[str, Any]:
        """Relax every initial structure (resumable); the IS2RE prediction file and, if labelled, metrics."""
        overrides = {} if self.options.relax_steps is None else {"steps": self.options.relax_steps}
        settings = RelaxSettings.preset(preset, **overrides)

        def compute() -> dict[str, Any]:
            ds = self._dataset(path, **self.data_options)
            out_dir = self.cache / f"{split}_step{self.step}"
            summary = relax_dataset(
                self.model, ds, out_dir, settings, self.options.batch_size, device=self.options.device
            )
            return {"metrics": summary.get("metrics", {}), "files": [str(out_dir / "is2re_predictions.npz")]}

        key = {"data": str(path), "limit": self.options.limit, "steps": settings.steps}
        return self.cached(split, key, compute)

    def md17_test_set(self) -> Subset:
        """The MD17 test split: the run's ``split.npz``, or the paper's split (950 / 50 / rest, seed 1)."""
        data = self.config["data"]
        whole = open_dataset(data["path"], **self.data_options)
        record = self.run_dir / "split.npz"
        test = load_split(record)["test"] if record.is_file() else md17_splits(whole)["test"].indices
        return Subset(whole, test[: self.options.limit])

    def md17_test(self) -> dict[str, Any]:
        """Energy and force MAE (meV, meV/Å) on the MD17 test split."""

        def compute() -> dict[str, Any]:
            out = evaluate(self.model, self.md17_test_set(), self.options.batch_size, self.options.device)
            return {"metrics": out, "files": []}

        return self.cached(
            "test", {"data": str(self.config["data"]["path"]), "limit": self.options.limit}, compute
        )


def _submission(name: str, files: Mapping[str, str], dataset: str, out: Path) -> str | None:
    """Merge per-split prediction files into the evaluation-server file once every test split is there."""
    if set(files) != set(SUBMISSION_SPLITS[dataset]):
        return None
    return str(merge_submission(files, out / f"submission_{name}.npz", dataset))


def collect_run(run: Run, run_dir: Path, options: EvalOptions, relax_preset: str | None) -> dict[str, Any]:
    """Everything the tables read from one run directory (see :func:`main` for the keys).

    Keys: ``status``, ``step``, ``world_size``, ``gpu_hours``, ``throughput``, ``trainer_val.*`` (the
    trainer's last validation), ``params``, ``<split>.<metric>`` per evaluated split (``energy_mae`` meV,
    ``forces_mae`` meV/Å, ...), ``val.<metric>`` (OC20: the mean over the ``val_*`` splits, as the paper
    averages), ``test.<metric>`` (MD17), ``files`` (prediction and submission files) and ``notes``.
    """
    out: dict[str, Any] = {"status": run_status(run_dir), "run_dir": str(run_dir), "files": [], "notes": []}
    if out["status"] == "missing":
        return out
    config = json.loads((run_dir / "config.json").read_text())
    world = int(_load(run_dir / "checkpoints" / "last.pt").get("world_size", 1))
    out.update(training_summary(read_metrics(run_dir), config, world))
    if not (run_dir / "checkpoints" / "best.pt").is_file():
        out["notes"].append("no checkpoints/best.pt yet")
        return out
    ev = RunEvaluator(run, run_dir, config, options)
    out["params"] = ev.params()
    if run.dataset == "md17":
        out.update({f"test.{k}": v for k, v in ev.md17_test()["metrics"].items()})
        return out
    val: dict[str, dict[str, float]] = {}
    tests: dict[str, dict[str, str]] = {"s2ef": {}, "is2re": {}}
    for split, path in options.splits.items():
        if split.startswith("is2re_test_"):
            if relax_preset is None:
                continue
            res = ev.is2re(split, path, relax_preset)
            tests["is2re"][split.removeprefix("is2re_test_")] = res["files"][0]
        else:
            res = ev.s2ef(split, path, predictions=split.startswith("test_"))
            if split.startswith("test_"):
                tests["s2ef"][split.removeprefix("test_")] = res["files"][0]
            elif res["metrics"]:
                val[split] = res["metrics"]
        out.update({f"{split}.{k}": v for k, v in res["metrics"].items()})
        out["files"] += res["files"]
    if run.dataset == "oc20" and val:
        out.update({f"val.{k}": v for k, v in average_metrics(val).items()})
        if len(val) < 4:
            out["notes"].append(f"val.* is the mean over {sorted(val)} only (the paper: all four splits)")
    for kind, files in tests.items():
        merged = _submission(kind, files, run.dataset, ev.cache) if files else None
        if merged:
            out["files"].append(merged)
    return out
