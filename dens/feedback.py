"""What a training run tells its user: a validation table as it goes, a learning curve, and next steps.

* :class:`ValidationTable`: one line per validation (step, energy and force MAE, the best so far),
  printed as soon as it is computed.
* :func:`learning_curve`: ``<run_dir>/learning_curve.png`` from ``metrics.jsonl`` when matplotlib is
  installed (``pip install dens[plot]``); otherwise a note says how to get it.
* :func:`next_steps`: where the checkpoints are and the commands that evaluate and use them.
"""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from typing import Any

from .data.open import LABEL_OPTIONS

__all__ = ["ValidationTable", "learning_curve", "next_steps"]

logger = logging.getLogger(__name__)


class ValidationTable:
    """Prints validation metrics as a compact table, one row per validation, marking new bests.

    Examples
    --------
    >>> table = ValidationTable("forces_mae_meV_A")
    >>> table({"energy_mae_meV": 12.0, "forces_mae_meV_A": 80.0}, step=0)
      step   E MAE (meV)   F MAE (meV/Å)   best F MAE
         0        12.000          80.000       80.000 *
    >>> table({"energy_mae_meV": 9.0, "forces_mae_meV_A": 90.0}, step=10)
        10         9.000          90.000       80.000
    """

    def __init__(self, primary_metric: str = "forces_mae_meV_A") -> None:
        self.primary = primary_metric
        self.best = float("inf")
        self._header = False

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        if not metrics:
            return
        value = metrics.get(self.primary, float("inf"))
        new_best = value < self.best
        self.best = min(self.best, value)
        label = "best F MAE" if self.primary.startswith("forces") else "best E MAE"
        if not self._header:
            print(f"{'step':>6}{'E MAE (meV)':>14}{'F MAE (meV/Å)':>16}{label:>13}", flush=True)
            self._header = True
        e, f = metrics.get("energy_mae_meV", float("nan")), metrics.get("forces_mae_meV_A", float("nan"))
        print(f"{step:>6}{e:>14.3f}{f:>16.3f}{self.best:>13.3f}" + (" *" if new_best else ""), flush=True)


def learning_curve(run_dir: str | Path) -> Path | None:
    """Plot validation energy / force MAE and the training loss against the step; returns the PNG path.

    Returns None (with a log note) when matplotlib is absent or there is nothing to plot.
    """
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    val = [r for r in records if "val/forces_mae_meV_A" in r]
    train = [r for r in records if "train/loss" in r]
    if not val and not train:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no learning_curve.png (pip install 'dens[plot]')")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    if train:
        axes[0].plot([r["step"] for r in train], [r["train/loss"] for r in train], color="0.5")
    axes[0].set(xlabel="step", ylabel="training loss", yscale="log")
    if val:
        steps = [r["step"] for r in val]
        axes[1].plot(steps, [r["val/energy_mae_meV"] for r in val], "o-", label="energy (meV)")
        axes[1].plot(steps, [r["val/forces_mae_meV_A"] for r in val], "s-", label="forces (meV/Å)")
        axes[1].legend()
    axes[1].set(xlabel="step", ylabel="validation MAE", yscale="log")
    fig.tight_layout()
    out = run_dir / "learning_curve.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def next_steps(
    run_dir: str | Path, eval_data: list[str], validated: bool, options: dict[str, Any] | None = None
) -> str:
    """The closing message of a run: checkpoints and the commands that evaluate and use them.

    ``options``: the reader options of the data (:data:`dens.data.open.LABEL_OPTIONS`), repeated
    in the commands.
    """
    ckpt = shlex.quote(str(Path(run_dir) / "checkpoints" / "best.pt"))
    which = "best validation" if validated else "final (no validation set)"
    flags = "".join(
        f" --{k.replace('_', '-')} {shlex.quote(str(v))}"
        for k, v in (options or {}).items()
        if k in LABEL_OPTIONS and v is not None
    )
    data = " ".join(f"--data {shlex.quote(d)}" for d in eval_data[:1]) or "--data FILE"
    lines = [
        f"checkpoints: {ckpt} ({which} weights), {Path(run_dir) / 'checkpoints' / 'last.pt'} (resumable)",
        f"evaluate:    python -m dens.evaluate --checkpoint {ckpt} {data}{flags}",
        f"predict:     dens-predict --checkpoint {ckpt} --data FILE{flags} --out predictions.extxyz",
        f"python:      model = dens.load({ckpt!r}); model.predict(atoms)  "
        f"# or DeNSCalculator.from_checkpoint({ckpt!r})",
    ]
    return "\n".join(lines)


def summary_metrics(history: list[dict[str, Any]]) -> str:
    """``first -> last (best)`` of the validation MAEs, one line."""
    if not history:
        return "no validation set: no validation errors"
    first, last = history[0], history[-1]
    best_f = min(r["val/forces_mae_meV_A"] for r in history)
    return (
        f"validation energy MAE {first['val/energy_mae_meV']:.1f} -> {last['val/energy_mae_meV']:.1f} meV, "
        f"force MAE {first['val/forces_mae_meV_A']:.1f} -> {last['val/forces_mae_meV_A']:.1f} meV/Å "
        f"(best {best_f:.1f}; step {first['step']} -> {last['step']})"
    )
