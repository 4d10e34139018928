"""fairchem 1.x EquiformerV2 checkpoints (OMat24, MPtrj, sAlex; with and without DeNS), both ways.

fairchem 1.x (``fairchem-core`` <= 1.10, the last release with EquiformerV2) stores a ``HydraModel``: a
backbone (``EquiformerV2Backbone`` or ``EqV2DeNSBackbone``) under ``backbone.*`` and heads under
``output_heads.<name>.*``. A training checkpoint is a dict::

    {"state_dict": ..., "config": {"model": {"name": "hydra", "backbone": {"model": ..., ...},
                                             "heads": {<name>: {"module": ..., ...}}}, "dataset": ...},
     "normalizers": {target: {"mean", "rmsd"}}, "elementrefs": {"energy": {"element_references"}},
     "ema": {"shadow_params": [...], ...} (optional), ...}

(``BaseTrainer.save`` in fairchem 1.x; keys behind ``module.`` when saved from DDP). This module maps it
onto :class:`~dens.models.EquiformerV2` with a stress head and a :class:`~dens.models.ForceField` holding
the normalisers, element references and the non-strict neighbour rule, and writes such checkpoints back.

What fairchem's modules compute and how they name things is described in
``../shared/fixtures/fairchem/README.md``; :func:`run_fairchem_fixture` reproduces those fixtures.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import load_checkpoint
from .equiformer_v2 import EquiformerV2
from .official.equiformer_v2 import (
    _EQV2_BUFFER,
    _adopt_official_grids,
    _run_equiformer_v2,
    equiformer_v2_from_official_config,
)
from .official.renames import load_mapped_state_dict
from .potential import ForceField
from .stress import FairchemRank2Head, assemble_stress

__all__ = [
    "FAIRCHEM_PRETRAINED",
    "build_fairchem_model",
    "export_fairchem_state_dict",
    "fairchem_model_config",
    "is_fairchem_checkpoint",
    "load_fairchem_checkpoint",
    "resolve_pretrained",
    "run_fairchem_fixture",
    "save_fairchem_checkpoint",
]


# registry and class names of fairchem 1.x (commit aa16078, fairchem-core 1.10): name -> DeNS backbone?
FAIRCHEM_BACKBONES = {
    "equiformer_v2_backbone": False,
    "EquiformerV2Backbone": False,
    "equiformer_v2_dens_backbone": True,
    "EqV2DeNSBackbone": True,
}
# head module -> (role, attribute of its block); the deprecated energy/force names are thin aliases
_HEADS = {
    "equiformerV2_scalar_head": ("energy", "energy_block"),
    "EqV2ScalarHead": ("energy", "energy_block"),
    "equiformer_v2_energy_head": ("energy", "energy_block"),
    "EquiformerV2EnergyHead": ("energy", "energy_block"),
    "eqV2_DeNS_scalar_head": ("energy", "scalar_block"),
    "DeNSScalarHead": ("energy", "scalar_block"),
    "equiformerV2_vector_head": ("forces", "force_block"),
    "EqV2VectorHead": ("forces", "force_block"),
    "equiformer_v2_force_head": ("forces", "force_block"),
    "EquiformerV2ForceHead": ("forces", "force_block"),
    "eqV2_DeNS_vector_head": ("forces", "vector_block"),
    "DeNSVectorHead": ("forces", "vector_block"),
    # the earlier DeNS heads (e.g. configs/omat24/mptrj/eqV2_86M_dens_mptrj.yml): plain block names, the
    # DeNS flags on the backbone (use_denoising_energy / use_denoising_stress)
    "equiformer_v2_dens_energy_head": ("energy", "energy_block"),
    "DeNSEnergyHead": ("energy", "energy_block"),
    "equiformer_v2_dens_force_head": ("forces", "force_block"),
    "DeNSForceHead": ("forces", "force_block"),
    "rank2_symmetric_head": ("stress", None),
    "Rank2SymmetricTensorHead": ("stress", None),
    "dens_rank2_symmetric_head": ("stress", None),
    "DeNSRank2Head": ("stress", None),
}
_DENS_STRESS = {"dens_rank2_symmetric_head", "DeNSRank2Head"}
_DENS_ENERGY = {"eqV2_DeNS_scalar_head", "DeNSScalarHead", "equiformer_v2_dens_energy_head", "DeNSEnergyHead"}
# the only rank-2 head options implemented (the OMat24 / MPtrj configurations)
_STRESS_REQUIRED = {
    "decompose": True,
    "edge_level_mlp": False,
    "extensive": False,
    "num_mlp_layers": 2,
    "use_source_target_embedding": True,
}

# Published fairchem 1.x EquiformerV2 models (Hugging Face fairchem/OMAT24; the files are gated):
# name -> (dens preset, DeNS model). Aliases include the Matbench Discovery name "eqV2 S DeNS".
FAIRCHEM_PRETRAINED: dict[str, tuple[str, bool]] = {}
for _size, _preset in (("31M", "omat24_s"), ("86M", "omat24_m"), ("153M", "omat24_l")):
    for _alias in (f"eqV2-{_size}-OMAT24", f"eqV2_{_size}_omat", f"eqV2-{_size}-OMAT24-MP-sAlex",
                   f"eqV2_{_size}_omat_mp_salex"):  # fmt: skip
        FAIRCHEM_PRETRAINED[_alias] = (_preset, False)
    for _alias in (f"EquiformerV2-DeNS-{_size}-MP", f"eqV2_dens_{_size}_mp"):
        FAIRCHEM_PRETRAINED[_alias] = (_preset.replace("omat24", "mptrj_dens"), True)
for _alias in ("eqV2-S-DeNS-MP", "eqV2 S DeNS", "eqV2-S-DeNS"):
    FAIRCHEM_PRETRAINED[_alias] = ("mptrj_dens_s", True)


def _registered(name: Any) -> Any:
    """A registry name, or the class name of a full import path (``fairchem.core.models....EqV2DeNSBackbone``,
    as ``configs/omat24/mptrj/*.yml`` write them)."""
    return name.rsplit(".", 1)[-1] if isinstance(name, str) else name


def _unwrap(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state_dict.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


def is_fairchem_checkpoint(checkpoint: Any) -> bool:
    """Whether ``checkpoint`` (a loaded dict) is a fairchem 1.x hydra EquiformerV2 checkpoint."""
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        return False
    model = (
        (checkpoint.get("config") or {}).get("model")
        if isinstance(checkpoint.get("config"), Mapping)
        else None
    )
    if not isinstance(model, Mapping):
        return False
    backbone = model.get("backbone")
    return isinstance(backbone, Mapping) and _registered(backbone.get("model")) in FAIRCHEM_BACKBONES


def fairchem_model_config(
    model_cfg: Mapping[str, Any],
) -> tuple[dict[str, Any], bool, dict[str, dict[str, Any]]]:
    """Parse a fairchem ``config['model']``: ``(backbone kwargs, DeNS backbone?, {role: head config})``.

    Each head config gets ``name`` (its key under ``output_heads``) and ``module``.

    Raises
    ------
    ValueError
        For a backbone or head module that is not an EquiformerV2 one, or two heads of the same role.
    NotImplementedError
        For head options these models never use (naming them).
    """
    backbone = dict(model_cfg.get("backbone") or {})
    name = _registered(backbone.pop("model", None))
    if name not in FAIRCHEM_BACKBONES:
        raise ValueError(
            f"fairchem backbone {name!r} is not an EquiformerV2 backbone; known: {sorted(FAIRCHEM_BACKBONES)}"
        )
    heads: dict[str, dict[str, Any]] = {}
    for head_name, head in (model_cfg.get("heads") or {}).items():
        module = _registered(head.get("module"))
        if module not in _HEADS:
            raise ValueError(
                f"fairchem head {head_name!r}: unknown module {module!r}; known: {sorted(_HEADS)}"
            )
        role = _HEADS[module][0]
        if role in heads:
            raise ValueError(f"fairchem heads {heads[role]['name']!r} and {head_name!r} both predict {role}")
        heads[role] = {**head, "name": head_name, "module": module}
        if role == "stress" and module in _DENS_STRESS and "use_denoising" not in head:
            # the earlier DeNSRank2Head read the flag from the backbone; fairchem main's default is True
            heads[role]["use_denoising"] = bool(backbone.get("use_denoising_stress", True))
        if role == "energy":
            if head.get("reduce", "sum") != "sum":
                raise NotImplementedError(f"fairchem energy head reduce={head['reduce']!r} (only 'sum')")
            flag = head.get("use_denoising", backbone.get("use_denoising_energy", True))
            if module in _DENS_ENERGY and not flag:
                raise NotImplementedError("fairchem DeNS energy head with use_denoising=False")
        if role == "stress":
            for key, value in _STRESS_REQUIRED.items():
                if head.get(key, value) != value:
                    raise NotImplementedError(f"fairchem rank-2 head option {key}={head[key]!r}")
    for role in ("energy", "forces"):
        if role not in heads:
            raise ValueError(f"the fairchem model has no {role} head")
    return backbone, FAIRCHEM_BACKBONES[name], heads


def _stress_use_denoising(head: Mapping[str, Any]) -> bool:
    # DeNSRank2Head reads the flag (fairchem main's default is True); the plain head never zeroes
    return bool(head.get("use_denoising", True)) if head["module"] in _DENS_STRESS else True


def build_fairchem_model(model_cfg: Mapping[str, Any]) -> EquiformerV2:
    """An untrained :class:`EquiformerV2` for a fairchem ``config['model']`` (hydra with EquiformerV2)."""
    backbone, dens, heads = fairchem_model_config(model_cfg)
    overrides: dict[str, Any] = {}
    if "stress" in heads:
        overrides = {
            "stress_head": "fairchem",
            "stress_use_denoising": _stress_use_denoising(heads["stress"]),
        }
    return equiformer_v2_from_official_config(backbone, dens, **overrides)


def _key_map(model_cfg: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(fairchem prefix, dens prefix)`` pairs, most specific first."""
    _, _, heads = fairchem_model_config(model_cfg)
    energy, forces = heads["energy"], heads["forces"]
    pairs = [
        ("backbone.force_embedding.", "force_encoder.linear."),
        (f"output_heads.{energy['name']}.{_HEADS[energy['module']][1]}.", "energy_block."),
        (f"output_heads.{forces['name']}.{_HEADS[forces['module']][1]}.", "force_block."),
        (f"output_heads.{forces['name']}.denoising_pos_block.", "denoising_pos_block."),
    ]
    if "stress" in heads:
        pairs.append((f"output_heads.{heads['stress']['name']}.", "stress_head."))
    pairs.append(("backbone.", ""))
    return pairs


def import_fairchem_state_dict(
    model: EquiformerV2, state_dict: Mapping[str, Tensor], model_cfg: Mapping[str, Any]
) -> None:
    """Load a fairchem hydra state_dict (``module.`` prefixes allowed) into ``model``.

    The constant buffers (``SO3_rotation``, ``SO3_grid``, ``mappingReduced``, ``expand_index``,
    ``balance_degree_weight``) are computed by dens; the grid matrices are taken from the file where it
    has them (after checking them).

    Raises
    ------
    ValueError
        Naming unknown keys, missing parameters and shape mismatches.
    """
    fairchem = _unwrap(state_dict)
    buffers = {k: v for k, v in fairchem.items() if _EQV2_BUFFER.search(k)}
    _adopt_official_grids(model, buffers)
    pairs = _key_map(model_cfg)
    mapped, unknown = {}, []
    for key, value in fairchem.items():
        if key in buffers:
            continue
        for prefix, target in pairs:
            if key.startswith(prefix):
                mapped[target + key[len(prefix) :]] = value
                break
        else:
            unknown.append(key)
    load_mapped_state_dict(model, mapped, "fairchem", unknown)


def export_fairchem_state_dict(model: EquiformerV2, model_cfg: Mapping[str, Any]) -> dict[str, Tensor]:
    """``model``'s parameters under fairchem's names for ``model_cfg`` (constant buffers left out: fairchem's
    constructor builds them, so load with ``strict=False``, i.e. ``task.strict_load: False``)."""
    reverse = [(target, prefix) for prefix, target in _key_map(model_cfg)]
    # the most specific dens prefix first; "" (the backbone) last
    reverse.sort(key=lambda pair: -len(pair[0]))
    out = {}
    for key, value in model.state_dict().items():
        for target, prefix in reverse:
            if key.startswith(target):
                out[prefix + key[len(target) :]] = value.detach().clone()
                break
    return out


def _scalar(value: Any) -> float:
    return float(torch.as_tensor(value).reshape(-1)[0])


def _normalizer(state: Mapping[str, Any], target: str) -> tuple[float, float] | None:
    """``(mean, rmsd)`` of ``target`` from ``checkpoint['normalizers']`` or the training transforms."""
    norms = state.get("normalizers") or {}
    if target in norms:
        entry = norms[target]
        return _scalar(entry.get("mean", 0.0)), _scalar(entry.get("rmsd", entry.get("std", 1.0)))
    legacy = {"energy": "target", "forces": "grad_target"}.get(target)
    if legacy in norms:
        return _scalar(norms[legacy]["mean"]), _scalar(norms[legacy]["std"])
    cfg = state.get("config") or {}
    for path in (
        ("dataset", "train", "transforms", "normalizer"),
        ("dataset", "transforms", "normalizer"),
        ("normalizer",),
    ):
        node: Any = cfg
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and isinstance(node.get(target), Mapping):
            entry = node[target]
            std = entry.get("rmsd", entry.get("stdev", entry.get("std")))
            if std is not None:
                return float(entry.get("mean", 0.0)), float(std)
    return None


def _element_references(state: Mapping[str, Any]) -> Tensor | None:
    refs = (state.get("elementrefs") or {}).get("energy")
    if isinstance(refs, Mapping) and "element_references" in refs:
        return torch.as_tensor(refs["element_references"], dtype=torch.float64).reshape(-1)
    return None


def load_fairchem_checkpoint(
    path_or_checkpoint: str | Path | Mapping[str, Any], use_ema: bool = True
) -> ForceField:
    """A :class:`ForceField` (eval mode) from a fairchem 1.x EquiformerV2 checkpoint, as fairchem predicts.

    The graph rule (``max_radius``, ``max_neighbors``, ``enforce_max_neighbors_strictly``) comes from
    the backbone config; energy = ``raw * rmsd + mean + sum_atoms ref[Z]``, forces = ``raw * rmsd``,
    stress parts de-normalised with their own normalisers and assembled (fairchem's trainer and
    ``OCPCalculator``). A target without a normaliser is in its own units (the MPtrj recipe normalises no
    energy: it has element references).

    Parameters
    ----------
    use_ema : bool
        Use ``checkpoint['ema']['shadow_params']`` when present (fairchem predicts with the EMA weights).
    """
    ckpt = path_or_checkpoint
    where = str(path_or_checkpoint) if isinstance(path_or_checkpoint, (str, Path)) else "checkpoint"
    if not isinstance(ckpt, Mapping):
        ckpt = load_checkpoint(ckpt)
    if not is_fairchem_checkpoint(ckpt):
        raise ValueError(f"{where} is not a fairchem 1.x hydra EquiformerV2 checkpoint")
    model_cfg = ckpt["config"]["model"]
    backbone = build_fairchem_model(model_cfg)
    state_dict = _unwrap(ckpt["state_dict"])
    ema = ckpt.get("ema") if use_ema else None
    if ema and ema.get("shadow_params"):
        names = [k for k in state_dict if not _EQV2_BUFFER.search(k) and not k.endswith("offset")]
        if len(names) != len(ema["shadow_params"]):
            raise ValueError(
                f"{where}: the EMA has {len(ema['shadow_params'])} tensors but the state_dict {len(names)} parameters"
            )
        state_dict.update(zip(names, ema["shadow_params"], strict=True))
    import_fairchem_state_dict(backbone, state_dict, model_cfg)
    bcfg = model_cfg["backbone"]
    kwargs: dict[str, Any] = {}
    for target, (mean_key, std_key) in {
        "energy": ("energy_mean", "energy_std"),
        "forces": (None, "force_std"),
        "stress_isotropic": ("stress_isotropic_mean", "stress_isotropic_std"),
        "stress_anisotropic": ("stress_anisotropic_mean", "stress_anisotropic_std"),
    }.items():
        norm = _normalizer(ckpt, target)
        if norm is None:  # fairchem trains a target without a normaliser in its own units (MPtrj: energy)
            continue
        if mean_key is None and norm[0] != 0.0:
            raise ValueError(f"{where}: a force normaliser with a non-zero mean ({norm[0]}) is not supported")
        if mean_key is not None:
            kwargs[mean_key] = norm[0]
        kwargs[std_key] = norm[1]
    refs = _element_references(ckpt)
    model = ForceField(
        backbone,
        cutoff=float(bcfg.get("max_radius", 5.0)),
        max_neighbors=bcfg.get("max_neighbors", 500),  # fairchem EquiformerV2Backbone defaults: 500, 5 Å
        strict_max_neighbors=bool(bcfg.get("enforce_max_neighbors_strictly", True)),
        element_references=refs,
        **kwargs,
    )
    model.fairchem_config = copy.deepcopy(dict(ckpt["config"]))
    return model.eval()


def save_fairchem_checkpoint(
    model: ForceField, path: str | Path, config: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model`` as a fairchem 1.x checkpoint (``state_dict``, ``config``, ``normalizers``,
    ``elementrefs``).

    Parameters
    ----------
    model : ForceField
        An EquiformerV2 force field (with or without a fairchem stress head).
    config : dict, optional
        The fairchem config to store (its ``model`` section names the heads); default: the one the model
        was loaded with (``model.fairchem_config``), else one built from the model's sizes.

    Notes
    -----
    The constant buffers are not written and ``config['task']['strict_load']`` is set to False:
    fairchem's constructor builds them, and its ``load_state_dict(strict=False)`` then reports exactly
    those keys as missing (as for the fairchem fixtures).

    Loading the file in fairchem-core 1.x (1.10, torch 2.4):

    * ``OCPCalculator(checkpoint_path=path)``: fairchem builds its trainer from ``config``, so the
      config must be a complete fairchem config (``trainer``, ``outputs``, ``loss_functions``,
      ``optim``, ``model``...). A model imported from a fairchem checkpoint keeps that file's config; for
      a dens-trained model pass one, e.g. fairchem's ``load_config("configs/omat24/mptrj/
      eqV2_31M_dens_mptrj.yml")[0]`` (its ``includes`` resolved), whose ``model`` section must describe
      this model. ``BaseTrainer.load_checkpoint`` reads ``task.strict_load`` (False here), matches the
      ``module.`` prefixes, and loads ``normalizers`` (``energy``, ``forces``, ``stress_isotropic``,
      ``stress_anisotropic``: ``mean`` / ``rmsd``) and ``elementrefs``.
    * By hand: build fairchem's ``HydraModel`` from ``config['model']`` (without ``name``), then
      ``model.load_state_dict(ckpt['state_dict'], strict=False)``: nothing unexpected, and missing only
      the ``SO3_rotation`` / ``SO3_grid`` / ``mappingReduced`` / ``expand_index`` /
      ``balance_degree_weight`` constants; de-normalise the outputs and add the element references as
      fairchem's trainer does.

    Untested against fairchem itself (it needs torch 2.4); the tests check the key set, shapes and
    dtypes against the fixtures' real fairchem state_dicts.
    """
    backbone = model.backbone
    if not isinstance(backbone, EquiformerV2):
        raise ValueError(f"only EquiformerV2 exports to fairchem, not {type(backbone).__name__}")
    if backbone.stress_head is not None and not isinstance(backbone.stress_head, FairchemRank2Head):
        raise ValueError(
            "fairchem has no equivariant rank-2 head: export a model with stress_head='fairchem'"
        )
    config = copy.deepcopy(dict(config or getattr(model, "fairchem_config", None) or _default_config(model)))
    config.setdefault("task", {})["strict_load"] = False
    state_dict = export_fairchem_state_dict(backbone, config["model"])
    mean_iso, std_iso, mean_aniso, std_aniso = model.stress_normalizer.tolist()
    normalizers = {
        "energy": {"mean": model.energy_mean.clone(), "rmsd": model.energy_std.clone()},
        "forces": {"mean": torch.tensor(0.0, dtype=torch.float64), "rmsd": model.force_std.clone()},
    }
    if backbone.stress_head is not None:
        normalizers["stress_isotropic"] = {"mean": torch.tensor(mean_iso), "rmsd": torch.tensor(std_iso)}
        normalizers["stress_anisotropic"] = {
            "mean": torch.tensor(mean_aniso),
            "rmsd": torch.tensor(std_aniso),
        }
    elementrefs = {}
    if model.element_references is not None:
        elementrefs["energy"] = {"element_references": model.element_references.clone()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"state_dict": state_dict, "config": config, "normalizers": normalizers, "elementrefs": elementrefs},
        path,
    )
    return path


def _default_config(model: ForceField) -> dict[str, Any]:
    """A fairchem hydra ``config['model']`` for a dens EquiformerV2 force field (DeNS head names when it
    has a force encoder, as fairchem's DeNS configs use them)."""
    b: EquiformerV2 = model.backbone
    dens = b.has_dens_heads
    first = b.blocks[0]
    backbone = {
        "model": "equiformer_v2_dens_backbone" if dens else "equiformer_v2_backbone",
        "use_pbc": True,
        "use_pbc_single": True,
        "otf_graph": True,
        "max_neighbors": model.max_neighbors,
        "max_radius": model.cutoff,
        "enforce_max_neighbors_strictly": model.strict_max_neighbors,
        "max_num_elements": b.max_num_elements,
        "num_layers": len(b.blocks),
        "sphere_channels": b.sphere_channels,
        "attn_hidden_channels": first.ga.so2_conv_2.in_channels,
        "num_heads": first.ga.num_heads,
        "attn_alpha_channels": first.ga.alpha_channels,
        "attn_value_channels": first.ga.value_channels,
        "ffn_hidden_channels": first.ffn.so3_linear_1.out_channels,
        "edge_channels": first.ga.source_embedding.embedding_dim,
        "lmax_list": [b.lmax],
        "mmax_list": [b.mmax],
        "grid_resolution": first.ffn.grid.resolution[0],
        "avg_num_nodes": b.avg_num_nodes,
        "avg_degree": b.edge_degree_embedding.avg_degree,
        "norm_type": "layer_norm_sh",
        "use_force_encoding": dens and b.force_encoder is not None,
    }
    heads: dict[str, Any] = {
        "energy": {"module": "eqV2_DeNS_scalar_head" if dens else "equiformerV2_scalar_head"},
        "forces": {"module": "eqV2_DeNS_vector_head" if dens else "equiformerV2_vector_head"},
    }
    if b.stress_head is not None:
        heads["stress"] = {
            "module": "dens_rank2_symmetric_head" if dens else "rank2_symmetric_head",
            "output_name": "stress",
            "use_source_target_embedding": True,
            "decompose": True,
        }
        if dens:
            heads["stress"]["use_denoising"] = b.stress_head.use_denoising
    return {
        "model": {
            "name": "hydra",
            "backbone": backbone,
            "heads": heads,
            "otf_graph": True,
            "pass_through_head_outputs": True,
        }
    }


def resolve_pretrained(name: str) -> tuple[str, bool]:
    """``(dens preset, DeNS model?)`` of a published fairchem EquiformerV2 name (case-insensitive;
    ``FAIRCHEM_PRETRAINED`` lists them)."""
    lookup = {k.lower(): v for k, v in FAIRCHEM_PRETRAINED.items()}
    key = name.lower()
    if key not in lookup:
        raise KeyError(f"unknown pretrained model {name!r}; known: {sorted(FAIRCHEM_PRETRAINED)}")
    return lookup[key]


def load_pretrained(name: str, path: str | Path, use_ema: bool = True) -> ForceField:
    """Load the published model ``name`` from its local checkpoint file ``path``.

    The files are gated on Hugging Face (``fairchem/OMAT24``): download them with your own access. The
    checkpoint's sizes must match the name's preset (a wrong file raises ``ValueError``).
    """
    from .equiformer_v2 import PRESETS

    preset, dens = resolve_pretrained(name)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: the {name} weights are gated on Hugging Face (fairchem/OMAT24); "
            f"download the file with your own access and pass its path"
        )
    model = load_fairchem_checkpoint(path, use_ema=use_ema)
    b: EquiformerV2 = model.backbone
    want = PRESETS[preset]
    got = {"num_layers": len(b.blocks), "lmax": b.lmax, "mmax": b.mmax}
    if any(got[k] != want[k] for k in got) or b.has_dens_heads != dens:
        raise ValueError(
            f"{path} does not hold {name}: it has {got} (DeNS {b.has_dens_heads}), {name} is "
            f"{ {k: want[k] for k in got} } (DeNS {dens})"
        )
    return model


def run_fairchem_fixture(
    fixture: Mapping[str, Any], dtype: torch.dtype = torch.float64
) -> dict[str, dict[str, Tensor]]:
    """Reproduce a fairchem fixture (``../shared/fixtures/fairchem``): ``{mode: {output: tensor}}``.

    The model is built from ``fixture['config']['yaml_model']`` (the ``model:`` section of a fairchem
    config) and runs on the stored graph with the stored edge frames (``edge_rand``). Outputs: ``energy``,
    ``node_energy``, ``forces``, ``force_head``, ``noise_head``, ``stress_isotropic``,
    ``stress_anisotropic``, ``stress`` (assembled from the raw parts), ``stress_denorm_example`` (with
    ``meta.example_normalizers``) and, in DeNS modes, the ``*_before_zeroing`` stress outputs.
    """
    model_cfg = fixture["config"]["yaml_model"]
    model = build_fairchem_model(model_cfg)
    import_fairchem_state_dict(model, fixture["state_dict"], model_cfg)
    model = model.to(dtype).eval()
    results = _run_equiformer_v2(model, fixture, dtype)
    before = None
    if model.stress_head is not None and not model.stress_head.use_denoising:
        model.stress_head.use_denoising = True
        before = _run_equiformer_v2(model, fixture, dtype)
        model.stress_head.use_denoising = False
    norms = (fixture.get("meta") or {}).get("example_normalizers") or {}
    for mode, out in results.items():
        if "stress_isotropic" not in out:
            continue
        out["stress"] = assemble_stress(out["stress_isotropic"], out["stress_anisotropic"])
        if norms:
            iso = (
                out["stress_isotropic"] * norms["stress_isotropic"]["rmsd"]
                + norms["stress_isotropic"]["mean"]
            )
            aniso = (
                out["stress_anisotropic"] * norms["stress_anisotropic"]["rmsd"]
                + norms["stress_anisotropic"]["mean"]
            )
            out["stress_denorm_example"] = assemble_stress(iso, aniso)
        if before is not None and mode != "s2ef":
            iso, aniso = before[mode]["stress_isotropic"], before[mode]["stress_anisotropic"]
            out["stress_isotropic_before_zeroing"] = iso
            out["stress_anisotropic_before_zeroing"] = aniso
            out["stress_before_zeroing"] = assemble_stress(iso, aniso)
    return results
