"""``python -m dens.train [+experiment=NAME] [overrides]``: the Hydra entry point.

With no arguments it trains a small EquiformerV2 + DeNS on the embedded demo data (OC20 relaxation
frames) on the CPU. ``+experiment=oc20_2m`` (and the other files of ``dens/conf/experiment``) select a
paper setting; any value can be overridden on the command line (``trainer.max_steps=100``). For many
GPUs: ``torchrun --nproc_per_node=8 -m dens.train +experiment=oc20_2m``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from .data import ConcatDataset, SetFields, compute_statistics, md17_splits, open_dataset
from .data.demo import demo_path
from .losses import DeNSSettings
from .losses.stress import fit_element_references, fit_stress_statistics
from .settings import validate_config
from .trainer import OptimSettings, Trainer, TrainerSettings

logger = logging.getLogger("dens.train")

if not OmegaConf.has_resolver("demo_path"):
    OmegaConf.register_new_resolver("demo_path", lambda split: str(demo_path(split)))


def _dataset(spec: Any, common: dict[str, Any]) -> Any:
    """A dataset from ``{path, extra?, **options}``, or the concatenation of a list of such parts.

    ``extra`` adds constant per-structure entries, e.g. ``{md_split: true}`` for the MD split of OC20
    All+MD, which DeNS never corrupts (``dens.exclude_key``).
    """
    if spec is None:
        return None
    if isinstance(spec, ListConfig):
        # every part carries every tag (false where a part does not set it), so that batches mix parts
        keys = {key for part in spec for key in (part.get("extra") or {})}
        parts = []
        for part in spec:
            extra = {key: False for key in keys} | dict(part.get("extra") or {})
            # a plain copy: Hydra's struct flag would refuse the new key on a part that has no 'extra'
            part = OmegaConf.create(OmegaConf.to_container(part, resolve=True))
            parts.append(_dataset(OmegaConf.merge(part, {"extra": extra}) if extra else part, common))
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)
    if spec.get("path") is None:
        return None
    options = {**common, **{k: v for k, v in spec.items() if k not in ("path", "extra")}}
    if spec.get("extra"):
        transforms = list(options.pop("transforms", None) or [])
        options["transforms"] = [*transforms, SetFields(OmegaConf.to_container(spec.extra, resolve=True))]
    return open_dataset(spec.path, **options)


def _normalizer(cfg: DictConfig, train_set: Any) -> dict[str, float]:
    """Explicit constants, or statistics of the training set.

    ``auto``: energy mean and (population) std of the training set, and forces divided by the same
    energy std, the convention of the official OC20 (2.887 for both) and MD17 normalisers, for which the
    paper's force coefficients were chosen. ``auto_unbiased``: the same with the unbiased std (``n - 1``),
    as the official MD17 trainer (main_md17_dens.py l.159-161, torch's ``y.std()``; it computes it in
    float32 from float32 labels, which shifts it by about 6e-6 relative). ``auto_rms``: forces divided by
    their own RMS instead, leaving out structures whose force RMS is over 100 x the median structure's
    (named in a warning). ``forces_rms``: energies not normalised (mean 0, std 1; fairchem's materials
    recipes, which fit element references instead) and forces divided by their RMS, as ``auto_rms``.
    """
    norm = cfg.data.normalizer
    if norm == "forces_rms":
        stats = compute_statistics(train_set, free_atoms_only=cfg.optim.train_on_free_atoms)
        return {"energy_mean": 0.0, "energy_std": 1.0, "force_std": stats["forces_rms_robust"]}
    if norm in ("auto", "auto_unbiased", "auto_rms"):
        stats = compute_statistics(train_set, free_atoms_only=cfg.optim.train_on_free_atoms)
        energy_std = stats["energy_std_unbiased" if norm == "auto_unbiased" else "energy_std"]
        # auto_rms: the RMS without outlier structures (named in a warning), which one bad frame cannot skew
        force_std = stats["forces_rms_robust"] if norm == "auto_rms" else energy_std
        return {"energy_mean": stats["energy_mean"], "energy_std": energy_std, "force_std": force_std}
    return {k: float(norm[k]) for k in ("energy_mean", "energy_std", "force_std")}


def datasets(cfg: DictConfig) -> tuple[Any, Any]:
    """Training and validation sets: separate paths, or one file split (``data.split``, MD17)."""
    common = OmegaConf.to_container(cfg.data.get("options", {}), resolve=True) or {}
    split = cfg.data.get("split")
    if split is not None:
        whole = open_dataset(cfg.data.path, **common)
        record = Path(cfg.trainer.run_dir) / "split.npz"
        record.parent.mkdir(parents=True, exist_ok=True)
        parts = md17_splits(whole, split.train, split.val, split.get("test"), split.seed, record=record)
        return parts["train"], parts["val"]
    train_set = _dataset(cfg.data.train, common)
    if train_set is None or (isinstance(cfg.data.train, DictConfig) and cfg.data.train.get("path") is None):
        raise ValueError("data.train.path is not set: pick a data config or set data.train.path=...")
    return train_set, _dataset(cfg.data.get("val"), common)


def build(cfg: DictConfig) -> Trainer:
    """Datasets, model and trainer of a composed configuration."""
    validate_config(OmegaConf.to_container(cfg, resolve=True))  # every key checked before any data are read
    train_set, val_set = datasets(cfg)
    materials = cfg.get("materials") or {}
    references = None
    if materials.get("element_references") == "fit":
        references = fit_element_references(train_set, int(materials.get("normalizer_structures", 10000)))
    normalizer = _normalizer(cfg, train_set)
    if references is not None:
        normalizer["element_references"] = references
    torch.manual_seed(cfg.trainer.seed)  # the same initial weights on every rank and every run
    backbone = instantiate(cfg.model.backbone)
    if not getattr(backbone, "direct_forces", True):
        # gradient forces: the force labels are scaled by the energy std (as the official MD17 code)
        normalizer["force_std"] = normalizer["energy_std"]
    explicit = cfg.data.normalizer if isinstance(cfg.data.normalizer, DictConfig) else {}
    normalizer.update({k: float(v) for k, v in explicit.items() if str(k).startswith("stress_")})
    if float(materials.get("stress_coefficient", 0.0)) > 0 and "stress_isotropic_std" not in normalizer:
        # fairchem fits its stress normalisers on a sample of the training set; here: the first N structures
        normalizer.update(
            fit_stress_statistics(train_set, int(materials.get("normalizer_structures", 10000)))
        )
    model = instantiate(cfg.model, backbone=backbone, **normalizer)
    settings = TrainerSettings(**OmegaConf.to_container(cfg.trainer, resolve=True))
    optim = OptimSettings(**OmegaConf.to_container(cfg.optim, resolve=True))
    dens = DeNSSettings.from_dict(OmegaConf.to_container(cfg.dens, resolve=True))
    config = OmegaConf.to_container(cfg, resolve=True)
    config["resolved_normalizer"] = normalizer
    return Trainer(model, train_set, val_set, optim, dens, settings, config=config)


@hydra.main(config_path="conf", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    trainer = build(cfg)
    if trainer.is_main:
        n_params = sum(p.numel() for p in trainer.model.parameters())
        logger.info("%s: %s parameters, %d train steps, run dir %s", cfg.get("name", "run"), f"{n_params:,}",
                    trainer.total_steps, trainer.run_dir)  # fmt: skip
    history = trainer.fit()
    if trainer.is_main and history:
        first, last = history[0], history[-1]
        weights = " (EMA)" if trainer.ema else ""
        print(
            f"validation{weights} energy MAE {first['val/energy_mae_meV']:.1f} -> {last['val/energy_mae_meV']:.1f} meV, "
            f"force MAE {first['val/forces_mae_meV_A']:.1f} -> {last['val/forces_mae_meV_A']:.1f} meV/Å "
            f"(step {first['step']} -> {last['step']})"
            + (
                f", stress MAE {first['val/stress_mae_meV_A3']:.2f} -> {last['val/stress_mae_meV_A3']:.2f} meV/Å³"
                if "val/stress_mae_meV_A3" in last
                else ""
            )
        )


def cli() -> None:
    """Accept ``+experiment=NAME`` as well as ``experiment=NAME`` (the defaults list has ``experiment: null``)."""
    sys.argv = [a[1:] if a.startswith("+experiment=") else a for a in sys.argv]
    main()


if __name__ == "__main__":
    cli()
