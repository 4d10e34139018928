"""``python -m dens.train [+experiment=NAME] [overrides]``: the Hydra entry point.

With no arguments it trains a small EquiformerV2 + DeNS on the embedded demo data (OC20 relaxation
frames) on the CPU. ``+experiment=oc20_2m`` (and the other files of ``dens/conf/experiment``) select a
paper setting; any value can be overridden on the command line (``trainer.max_steps=100``). For many
GPUs: ``torchrun --nproc_per_node=8 -m dens.train +experiment=oc20_2m``.

One file of your own (``dens-train``, :func:`cli`)::

    dens-train --train-file mydata.extxyz [--valid-file v.extxyz | --valid-fraction 0.05] \
        [--energy-key REF_energy --forces-key REF_forces] [--energy-unit eV] [--steps 2000] [overrides]

selects the ``data=file`` config: total energies with per-element reference energies fitted from the
data (stored with the model: predictions are total energies), forces normalised by their own RMS, label
plausibility checks, and a validation split of the file when no validation file is given.
``trainer.init_from=CKPT`` starts from the weights of a dens or official checkpoint (fine-tuning).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from ase.data import chemical_symbols
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from .data import ConcatDataset, SetFields, Subset, compute_statistics, md17_splits, open_dataset, save_split
from .data.demo import demo_path
from .data.references import DEGENERATE_STD, Referenced, check_labels, element_references, label_statistics
from .feedback import ValidationTable, learning_curve, next_steps, summary_metrics
from .losses import DeNSSettings
from .losses.stress import fit_element_references, fit_stress_statistics
from .models.potential import gradient_force_std
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


def _references(cfg: DictConfig, train_set: Any) -> tuple[dict[int, float], dict[str, Any]]:
    """The element references of ``data.references`` (none when absent) and what the fit says."""
    method = cfg.data.get("references") or "none"
    method = OmegaConf.to_container(method, resolve=True) if isinstance(method, DictConfig) else method
    refs, info = element_references(train_set, method)
    if refs:
        logger.info("element reference energies (%s): %s", info["method"], _named(refs))
    return refs, info


def _normalizer(
    cfg: DictConfig, train_set: Any, references: tuple[dict[int, float], dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Per-element references (``data.references``) and explicit constants or statistics of the training set.

    ``auto``: energy mean and (population) std of the training set, and forces divided by the same
    energy std, the convention of the official OC20 (2.887 for both) and MD17 normalisers, for which the
    paper's force coefficients were chosen. ``auto_unbiased``: the same with the unbiased std (``n - 1``),
    as the official MD17 trainer (main_md17_dens.py l.159-161, torch's ``y.std()``; it computes it in
    float32 from float32 labels, which shifts it by about 6e-6 relative). ``auto_rms``: forces divided by
    their own RMS instead, leaving out structures whose force RMS is over 100 x the median structure's
    (named in a warning). ``forces_rms``: energies not normalised (mean 0, std 1; fairchem's materials
    recipes, which fit element references instead) and forces divided by their RMS, as ``auto_rms``. With
    references the
    statistics are those of ``E - Σ E0`` (:func:`dens.data.references.label_statistics`); degenerate
    stds (below 1e-6) are replaced, with a warning, in every case. Returns the normaliser, with the
    reference table (``element_references``) when there are references (``references``: those of
    :func:`_references`, computed here when not given).
    """
    norm = cfg.data.normalizer
    refs, info = references if references is not None else _references(cfg, train_set)
    free_only = cfg.optim.train_on_free_atoms
    if norm == "forces_rms":
        stats = compute_statistics(train_set, free_atoms_only=free_only)
        result = {"energy_mean": 0.0, "energy_std": 1.0, "force_std": stats["forces_rms_robust"]}
        return _with_table(result, refs, info)
    if cfg.data.get("checks", False):
        check_labels(train_set, refs, name=str(_path_of(cfg.data.get("train") or cfg.data)))
    if norm in ("auto", "auto_unbiased", "auto_rms"):
        if refs:
            stats = label_statistics(train_set, refs, free_atoms_only=free_only)
        else:
            stats = compute_statistics(train_set, free_atoms_only=free_only)
            if norm == "auto_unbiased":
                stats["energy_std"] = stats["energy_std_unbiased"]
            if norm == "auto_rms":  # the RMS without outlier structures (named in a warning)
                stats["forces_rms"] = stats["forces_rms_robust"]
            for key, other in (("energy_std", "forces_rms"), ("forces_rms", "energy_std")):
                if not (math.isfinite(stats[key]) and stats[key] > DEGENERATE_STD):
                    fallback = (
                        stats[other] if math.isfinite(stats[other]) and stats[other] > DEGENERATE_STD else 1.0
                    )
                    logger.warning(
                        "training-set %s = %.3g is degenerate: using %.3g", key, stats[key], fallback
                    )
                    stats[key] = fallback
        force_std = stats["forces_rms"] if norm == "auto_rms" else stats["energy_std"]
        result: dict[str, Any] = {
            "energy_mean": stats["energy_mean"],
            "energy_std": stats["energy_std"],
            "force_std": force_std,
        }
    else:
        result = {k: float(norm[k]) for k in ("energy_mean", "energy_std", "force_std")}
    return _with_table(result, refs, info)


def _with_table(result: dict[str, Any], refs: dict[int, float], info: dict[str, Any]) -> dict[str, Any]:
    """``result`` with the reference table ``element_references`` (indexed by Z) when there are references."""
    if refs:
        # elements absent from the training data get the mean energy per atom of a fit (0 otherwise), so
        # that a structure containing one still gets a total energy of the right size
        default = float(info.get("default", 0.0))
        table = [default] * max(max(refs) + 1, len(chemical_symbols))
        for z, value in refs.items():
            table[z] = value
        result["element_references"] = table
    return result


def _named(refs: dict[int, float]) -> dict[str, float]:
    return {chemical_symbols[z]: round(v, 6) for z, v in sorted(refs.items())}


def _path_of(spec: Any) -> Any:
    return spec.get("path") if hasattr(spec, "get") else spec


def _md17_unit(cfg: DictConfig, common: dict[str, Any]) -> None:
    """MD17 configs: ``.npz`` files are kcal/mol; other files state no unit, so it must be given."""
    if common.get("energy_unit") is not None:
        return
    if Path(str(cfg.data.path)).suffix.lower() == ".npz":
        common["energy_unit"] = "kcal/mol"
        return
    raise ValueError(
        f"{cfg.data.path}: this file does not state its energy unit; set data.options.energy_unit (rMD17 "
        f"extxyz files as written by dens/MACE: eV; the original MD17 values: kcal/mol)"
    )


def _split_fraction(whole: Any, fraction: float, seed: int, run_dir: Path, source: str) -> tuple[Any, Any]:
    """A seeded validation split of one file (at least one structure each), recorded in ``split.npz``."""
    n = len(whole)
    n_val = max(1, round(fraction * n))
    if not 0 < fraction < 1 or n_val >= n:
        raise ValueError(f"{source}: cannot split {n} structures with valid_fraction={fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    parts = {"train": np.sort(perm[n_val:]), "val": np.sort(perm[:n_val]), "seed": np.array(seed)}
    run_dir.mkdir(parents=True, exist_ok=True)
    save_split(run_dir / "split.npz", parts)
    logger.info("validation: %d of the %d structures of %s (seed %d; %s)", n_val, n, source, seed,
                run_dir / "split.npz")  # fmt: skip
    return Subset(whole, parts["train"]), Subset(whole, parts["val"])


def datasets(cfg: DictConfig) -> tuple[Any, Any]:
    """Training and validation sets: separate paths, one file split (``data.split``, MD17), or a file and a
    validation fraction of it (``data.valid_fraction`` when ``data.val.path`` is null)."""
    common = OmegaConf.to_container(cfg.data.get("options", {}), resolve=True) or {}
    common = {k: v for k, v in common.items() if v is not None}
    split = cfg.data.get("split")
    run_dir = Path(cfg.trainer.run_dir)
    if split is not None:
        _md17_unit(cfg, common)
        whole = open_dataset(cfg.data.path, **common)
        record = Path(cfg.trainer.run_dir) / "split.npz"
        record.parent.mkdir(parents=True, exist_ok=True)
        parts = md17_splits(whole, split.train, split.val, split.get("test"), split.seed, record=record)
        return parts["train"], parts["val"]
    train_set = _dataset(cfg.data.train, common)
    if train_set is None or (isinstance(cfg.data.train, DictConfig) and cfg.data.train.get("path") is None):
        raise ValueError("data.train.path is not set: pick a data config or set data.train.path=...")
    val_spec = cfg.data.get("val")
    fraction = cfg.data.get("valid_fraction")
    train_path = _path_of(cfg.data.train)
    if (
        isinstance(train_path, str)
        and train_path != str(demo_path("train"))
        and isinstance(val_spec, DictConfig)
    ):
        if val_spec.get("path") == str(demo_path("val")):
            # the demo's validation set says nothing about another file: never validate on it silently
            logger.warning(
                "data.train.path=%s but data.val.path is the embedded demo set: validating on %s of the "
                "training file instead (set data.val.path, or use `dens-train --train-file` / data=file)",
                train_path, fraction or 0.05,
            )  # fmt: skip
            val_spec, fraction = None, fraction or 0.05
    if (val_spec is None or val_spec.get("path") is None) and fraction:
        seed = int(cfg.data.get("split_seed", 0))
        return _split_fraction(train_set, float(fraction), seed, run_dir, str(train_path))
    return train_set, _dataset(val_spec, common)


def graph_statistics(dataset: Any, cutoff: float, max_neighbors: int | None, strict: bool = True,
                     limit: int = 200) -> dict[str, float]:  # fmt: skip
    """Mean atoms per structure and mean neighbours per atom (under the model's graph rule) of a dataset,
    from at most ``limit`` evenly spaced structures: the ``avg_num_nodes`` / ``avg_degree`` constants by
    which EquiformerV2 and eSCN divide their sums (the official values are OC20's, 77.8 and 23.4)."""
    from .data import collate
    from .data.graph import radius_graph_pbc

    indices = np.unique(np.linspace(0, len(dataset) - 1, min(limit, len(dataset))).astype(int))
    atoms = edges = 0
    for i in indices:
        item = dataset[int(i)]
        if item is None:
            continue
        b = collate([item])
        edge_index, _ = radius_graph_pbc(
            b.pos, b.cell, b.pbc, b.batch, cutoff, max_neighbors, strict, natoms=b.natoms
        )
        atoms, edges = atoms + b.num_atoms, edges + edge_index.shape[1]
    n = max(len(indices), 1)
    return {"avg_num_nodes": atoms / n, "avg_degree": max(edges / max(atoms, 1), 1.0)}


def _fit_graph_constants(cfg: DictConfig, train_set: Any) -> None:
    """``data.fit_graph_statistics``: set the backbone's ``avg_num_nodes`` / ``avg_degree`` to the data's."""
    backbone = cfg.model.backbone
    keys = [k for k in ("avg_num_nodes", "avg_degree") if k in backbone]
    if not cfg.data.get("fit_graph_statistics", False) or not keys or cfg.trainer.get("init_from"):
        return
    stats = graph_statistics(train_set, float(cfg.model.cutoff), cfg.model.get("max_neighbors"),
                             bool(cfg.model.get("strict_max_neighbors", True)))  # fmt: skip
    for key in keys:
        OmegaConf.update(cfg, f"model.backbone.{key}", round(stats[key], 4), merge=False)
    logger.info("graph constants of the data: %s", {k: round(stats[k], 4) for k in keys})


def _initial_model(cfg: DictConfig, normalizer: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    """The model to train: ``cfg.model`` with fresh weights, or the weights of ``trainer.init_from``.

    A dens checkpoint brings its architecture (its ``config.model``) and weights (EMA when it has them);
    an official one its backbone weights, loaded into ``cfg.model`` (which must match it). With
    ``trainer.init_normalizer=refit`` the normaliser and references are those of the new data; ``keep``
    keeps the checkpoint's. Returns the model and, for a dens checkpoint, its model config.
    """
    from .evaluate import load_model

    init = cfg.trainer.get("init_from")
    torch.manual_seed(cfg.trainer.seed)  # the same initial weights on every rank and every run
    if not init:
        backbone = instantiate(cfg.model.backbone)
        normalizer["force_std"] = gradient_force_std(
            backbone.direct_forces, normalizer["energy_std"], normalizer["force_std"]
        )
        return instantiate(cfg.model, backbone=backbone, **normalizer), None
    mode = cfg.trainer.get("init_normalizer", "refit")
    if mode not in ("refit", "keep"):
        raise ValueError(f"trainer.init_normalizer must be 'refit' or 'keep', got {mode!r}")
    from .checkpoint import load_checkpoint

    source = load_model(init, device="cpu", use_ema=True)
    state = load_checkpoint(init, what="trainer.init_from checkpoint")
    dens_config = (state.get("config") or {}) if isinstance(state, dict) else {}
    if "resolved_normalizer" in dens_config:
        model, model_config = source, dens_config["model"]
        if mode == "keep":
            normalizer.clear()
            normalizer.update(dens_config["resolved_normalizer"])
            logger.info("init_from %s: weights, normaliser and references of the checkpoint", init)
            return model, model_config
    else:
        model, model_config = instantiate(cfg.model, backbone=instantiate(cfg.model.backbone)), None
        try:
            model.backbone.load_state_dict(source.backbone.state_dict())
        except RuntimeError as err:
            raise ValueError(f"trainer.init_from={init}: its weights do not fit model={cfg.model.backbone._target_} "
                             f"as configured; choose the model config of that checkpoint ({err})") from err  # fmt: skip
        if mode == "keep":
            normalizer.clear()
            normalizer.update(
                {k: float(getattr(source, k)) for k in ("energy_mean", "energy_std", "force_std")}
            )
    normalizer["force_std"] = gradient_force_std(
        model.direct_forces, normalizer["energy_std"], normalizer["force_std"]
    )
    # refit (or an official checkpoint's constants): rebuild the wrapper's buffers around the same weights
    fresh = type(model)(
        model.backbone, model.cutoff, model.max_neighbors, model.strict_max_neighbors, **normalizer
    )
    logger.info("init_from %s: weights of the checkpoint; normaliser and references %s", init,
                "refitted to this data" if mode == "refit" else "of the checkpoint")  # fmt: skip
    return fresh, model_config


def build(cfg: DictConfig) -> Trainer:
    """Datasets, model and trainer of a composed configuration."""
    validate_config(OmegaConf.to_container(cfg, resolve=True))  # every key checked before any data are read
    settings = TrainerSettings(**OmegaConf.to_container(cfg.trainer, resolve=True))
    optim = OptimSettings(**OmegaConf.to_container(cfg.optim, resolve=True))
    dens = DeNSSettings.from_dict(OmegaConf.to_container(cfg.dens, resolve=True))
    train_set, val_set = datasets(cfg)
    materials = cfg.get("materials") or {}
    fitted, info = _references(cfg, train_set)
    materials_refs = None
    if materials.get("element_references") == "fit":
        if fitted:
            raise ValueError("set data.references or materials.element_references=fit, not both")
        # fairchem's recipe: fitted and subtracted from the training set's energies here
        materials_refs = fit_element_references(train_set, int(materials.get("normalizer_structures", 10000)))
    normalizer = _normalizer(cfg, train_set, (fitted, info))
    if materials_refs is not None:
        normalizer["element_references"] = materials_refs
    explicit = cfg.data.normalizer if isinstance(cfg.data.normalizer, DictConfig) else {}
    normalizer.update({k: float(v) for k, v in explicit.items() if str(k).startswith("stress_")})
    if float(materials.get("stress_coefficient", 0.0)) > 0 and "stress_isotropic_std" not in normalizer:
        # fairchem fits its stress normalisers on a sample of the training set; here: the first N structures
        normalizer.update(
            fit_stress_statistics(train_set, int(materials.get("normalizer_structures", 10000)))
        )
    _fit_graph_constants(cfg, train_set)
    model, model_config = _initial_model(cfg, normalizer)
    table = normalizer.get("element_references")
    if table is not None and materials_refs is None:
        # the model learns E - Σ E0 (ForceField.predict adds the references back): training labels only,
        # validation keeps its total energies
        train_set = Referenced(train_set, table)
    config = OmegaConf.to_container(cfg, resolve=True)
    if model_config is not None:
        config["model"] = model_config  # the architecture of init_from, so that the checkpoint rebuilds it
    config["resolved_normalizer"] = normalizer
    refs = normalizer.get("element_references")
    options = config["data"].get("options") or {}
    config["units"] = {
        "energy": "eV",
        "forces": "eV/Å",
        "length": "Å",
        "data_energy_unit": options.get("energy_unit") or "eV",
        "energy_target": "total energy: model residual + Σ element_references[Z]"
        if refs
        else "the data's energy labels as read (no element references)",
    }
    keep = cfg.trainer.get("init_from") and cfg.trainer.get("init_normalizer", "refit") == "keep"
    if refs:
        named = _named(fitted or {z: float(v) for z, v in enumerate(refs) if z and v})
        config["element_references"] = f"those of {cfg.trainer.init_from}" if keep else named
    return Trainer(model, train_set, val_set, optim, dens, settings, config=config)


def _eval_files(cfg: DictConfig) -> list[str]:
    val = cfg.data.get("val")
    path = _path_of(val) if val is not None else None
    if isinstance(path, str):
        return [path]
    train = _path_of(cfg.data.get("train")) if cfg.data.get("train") is not None else cfg.data.get("path")
    return [str(train)] if isinstance(train, str) else []


@hydra.main(config_path="conf", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    trainer = build(cfg)
    if trainer.is_main:
        n_params = sum(p.numel() for p in trainer.model.parameters())
        logger.info("%s: %s parameters, %d train steps, run dir %s", cfg.get("name", "run"), f"{n_params:,}",
                    trainer.total_steps, trainer.run_dir)  # fmt: skip
        trainer.on_validation = ValidationTable(trainer.settings.primary_metric)
    history = trainer.fit()
    if trainer.is_main:
        weights = " (EMA)" if trainer.ema else ""
        summary = summary_metrics(history).replace("validation", f"validation{weights}", 1)
        if history and "val/stress_mae_meV_A3" in history[-1]:
            first, last = history[0], history[-1]
            summary += f", stress MAE {first['val/stress_mae_meV_A3']:.2f} -> {last['val/stress_mae_meV_A3']:.2f} meV/Å³"
        print(summary)
        png = learning_curve(trainer.run_dir)
        if png is not None:
            print(f"learning curve: {png}")
        options = OmegaConf.to_container(cfg.data.get("options") or OmegaConf.create({}), resolve=True)
        print(next_steps(trainer.run_dir, _eval_files(cfg), trainer.val_loader is not None, options))


def _file_overrides(args: argparse.Namespace) -> list[str]:
    """Hydra overrides of the ``dens-train --train-file`` options."""

    def quote(value: str) -> str:
        return "'" + str(value).replace("'", "\\'") + "'"

    out = ["data=file", f"data.train.path={quote(Path(args.train_file).expanduser().resolve())}"]
    if args.valid_file:
        out.append(f"data.val.path={quote(Path(args.valid_file).expanduser().resolve())}")
    if args.valid_fraction is not None:
        out.append(f"data.valid_fraction={args.valid_fraction}")
    for key in ("energy_key", "forces_key", "stress_key", "energy_unit"):
        if getattr(args, key) is not None:
            out.append(f"data.options.{key}={quote(getattr(args, key))}")
    if args.references is not None:
        out.append(f"data.references={args.references}")
    if args.steps is not None:
        out.append(f"trainer.steps={args.steps}")
    return out


def cli(argv: list[str] | None = None) -> None:
    """``dens-train``: Hydra overrides, plus ``--train-file`` and its options (see the module docstring).

    Accepts ``+experiment=NAME`` as well as ``experiment=NAME`` (the defaults list has ``experiment: null``).
    """
    parser = argparse.ArgumentParser(
        prog="dens-train",
        description="Train a force field. Without --train-file: the Hydra entry point (python -m dens.train). "
        "Anything else on the line is a Hydra override (+experiment=NAME, trainer.max_steps=N, name=RUN, ...).",
    )
    parser.add_argument(
        "--train-file", help="one ASE-readable file (extxyz, traj, ...) of total energies and forces"
    )
    parser.add_argument(
        "--valid-file", help="validation file (default: --valid-fraction of the training file)"
    )
    parser.add_argument("--valid-fraction", type=float, default=None, help="validation share (default 0.05)")
    parser.add_argument(
        "--energy-key", help="energy field, e.g. REF_energy (default: energy, then REF_energy)"
    )
    parser.add_argument(
        "--forces-key", help="forces field, e.g. REF_forces (default: forces, then REF_forces)"
    )
    parser.add_argument(
        "--stress-key",
        help="stress field, e.g. REF_stress (default: the calculator's stress, then stress, then virial); "
        "stress is trained by the materials recipes (materials.stress_coefficient)",
    )
    parser.add_argument(
        "--energy-unit", help="unit of the file's energies (forces: per Å): eV, meV, kcal/mol, ..."
    )
    parser.add_argument("--references", help="element reference energies: fit (default), isolated or none")
    parser.add_argument("--steps", type=int, help="optimiser steps; the schedule is sized to them")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    overrides = [a[1:] if a.startswith("+experiment=") else a for a in overrides]
    if args.train_file is None:
        if any(v is not None for k, v in vars(args).items() if k != "train_file"):
            parser.error("--valid-file, --energy-key, ... need --train-file (or set data.* overrides)")
    else:
        names = [a for a in overrides if a.startswith("name=")]
        extra = [] if names else [f"name={Path(args.train_file).stem}"]
        overrides = _file_overrides(args) + extra + overrides
    sys.argv = [sys.argv[0], *overrides]
    main()


if __name__ == "__main__":
    cli()
