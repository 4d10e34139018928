"""Official Equiformer v1 (MD17) weights: config translation, state-dict import/export, fixture runner.

The official modules are ``GraphAttentionTransformerMD17`` (``equiformer/nets/
graph_attention_transformer_md17.py``) and ``Equiformer_MD17_DeNS`` (``equiformer/nets/
equiformer_md17_dens.py``) of ``atomicarchitects/equiformer``. Their state-dict names map onto
:class:`~dens.models.equiformer.Equiformer` by the prefix renames in :data:`_RENAMES`; every weight keeps
its flat e3nn layout, so values are copied unchanged (up to the sign flips below).

**The e3nn sign trap.** The official tensor products keep their Clebsch-Gordan tensors as state-dict
buffers (``..._compiled_main_left_right._w3j_{l1}_{l2}_{l3}``). e3nn 0.4.4, which the official environments
pin, and e3nn >= 0.5 differ in the sign of ``wigner_3j(1, 2, 2)``, ``(1, 3, 3)`` and their permutations, so a
checkpoint trained under 0.4.4 computes those paths with the opposite sign. On import every checkpoint
buffer is compared with e3nn's current ``wigner_3j`` (which dens uses): a path whose tensor has the
opposite sign gets its weights negated (the tensor product's own weights, or the matching output rows
and offset of the radial MLP that produces its per-edge weights). A buffer equal to neither sign is an
error. The imported model then computes what the official one computed, in dens's sign convention.
By default the checkpoint's tensors (sign-corrected, single precision) also replace dens's
double-precision ones, so float64 runs reproduce the official float64 numbers to round-off.
:func:`export_official_equiformer` writes dens's tensors into the same buffers, so the official code
computes what dens computes under any e3nn version.

Official checkpoints (``main_md17*.py``) are ``{'state_dict': model.state_dict()}`` without the model
config: :func:`load_official_equiformer_checkpoint` takes a preset name or the official kwargs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from e3nn import o3
from torch import Tensor

from ..equiformer import AVG_DEGREE, AVG_NUM_NODES, PRESETS, Equiformer, EquivariantGraphAttention
from ..irreps import DepthwiseTensorProduct, IrrepsLayerNorm, IrrepsLinear
from .renames import apply_rules, prefix_rules

__all__ = [
    "EQUIFORMER_CLASSES",
    "equiformer_from_official_config",
    "export_official_equiformer",
    "load_official_equiformer",
    "load_official_equiformer_checkpoint",
    "official_to_dens_name",
    "run_equiformer_fixture",
]

# official class name -> DeNS model?
EQUIFORMER_CLASSES = {"GraphAttentionTransformerMD17": False, "Equiformer_MD17_DeNS": True}

# Module names (official, dens) that map one to one (see dens.models.official.renames: {n} a block index); the
# import rules and the export rules are both derived from this list.
_MODULES: list[tuple[str, str]] = [
    ("atom_embed.atom_type_lin", "atom_embedding"),
    ("rbf", "radial_basis"),
    ("edge_deg_embed.exp", "edge_degree_embedding.constant"),
    ("edge_deg_embed.dw", "edge_degree_embedding.tp"),
    ("edge_deg_embed.rad", "edge_degree_embedding.radial"),
    ("edge_deg_embed.proj", "edge_degree_embedding.proj"),
    ("force_embed", "force_encoder.linear"),
    ("blocks.{n}.ffn.fctp_1", "blocks.{n}.ffn.linear_1"),
    ("blocks.{n}.ffn.fctp_2", "blocks.{n}.ffn.linear_2"),
]
# Whose inverse depends on the model (`head` or `energy_head`): the export keeps the pairs of its model.
_MODEL_DEPENDENT: list[tuple[str, str]] = [
    ("blocks.{n}.ga", "blocks.{n}.attention"),
    ("denoising_pos_head", "noise_head"),
    ("head.0", "energy_head.linear_1"),
    ("head.2", "energy_head.linear_2"),
    ("energy_head.0", "energy_head.linear_1"),
    ("energy_head.2", "energy_head.linear_2"),
]
# Key prefixes official -> dens, first match wins, anchored at the start.
_RENAMES: list[tuple[str, str]] = prefix_rules([*_MODULES, *_MODEL_DEPENDENT], suffix=r"(?=\.)")
# Inside an attention block (official GraphAttention -> EquivariantGraphAttention). `sep` is the single
# separable tensor product of the linear-message variant, `sep_act`/`sep_value` those of non-linear ones;
# the export keeps the pairs of the block's variant.
_ATTENTION_MODULES: list[tuple[str, str]] = [
    ("sep_act.dtp_rad", "message_radial"),
    ("sep_act.dtp", "message_tp"),
    ("sep_act.lin", "message_linear"),
    ("sep_alpha", "alpha_linear"),
    ("sep_value.dtp", "value_tp"),
    ("sep_value.lin", "value_linear"),
    ("sep.dtp_rad", "message_radial"),
    ("sep.dtp", "message_tp"),
    ("sep.lin", "message_linear"),
]
_ATTENTION_RENAMES: list[tuple[str, str]] = prefix_rules(_ATTENTION_MODULES, suffix=r"(?=\.)")
_ATTENTION = re.compile(r"^(blocks\.\d+\.attention\.|noise_head\.)(.*)$")
# Official entries without a dens counterpart: e3nn output masks, the empty weights of gates and of
# tensor products fed by a radial MLP. The `_w3j_*` buffers are read for the sign check.
_IGNORED = re.compile(r"\.output_mask$|\.gate\.mul\.weight$")
_W3J = re.compile(r"^(.*)\.tp\._compiled_main_left_right\._w3j_(\d+)_(\d+)_(\d+)$")

# Official constructor options fixed by this implementation (None: any value is accepted).
_REQUIRED: dict[str, Any] = {
    "irreps_node_attr": "1x0e",
    "basis_type": "exp",
    "use_attn_head": False,
    "norm_layer": "layer",
    "scale": None,
    "atomref": None,
    "use_force_encoding": True,
}
# Constructor keys that only concern the trainer (energy normalisation) or the graph builder.
_IGNORED_CONFIG = {"mean", "std", "num_atoms", "bond_feat_dim", "num_targets", "task_mean", "task_std"}
_KNOWN_CONFIG = {
    "irreps_in",
    "irreps_equivariant_inputs",
    "irreps_node_embedding",
    "num_layers",
    "irreps_sh",
    "max_radius",
    "number_of_basis",
    "fc_neurons",
    "irreps_feature",
    "irreps_head",
    "num_heads",
    "irreps_pre_attn",
    "rescale_degree",
    "nonlinear_message",
    "irreps_mlp_mid",
    "alpha_drop",
    "proj_drop",
    "out_drop",
    "drop_path_rate",
}


def official_to_dens_name(key: str) -> str:
    """The dens state-dict name of an official parameter or buffer name."""
    key = apply_rules(key.removeprefix("module."), _RENAMES)
    match = _ATTENTION.match(key)
    if match:
        key = match[1] + apply_rules(match[2], _ATTENTION_RENAMES)
    # e3nn's tensor-product weight and the official bias ParameterList
    return re.sub(r"\.bias\.0$", ".bias", re.sub(r"\.tp\.weight$", ".weight", key))


def equiformer_from_official_config(config: Mapping[str, Any], dens: bool) -> Equiformer:
    """Build :class:`Equiformer` from official constructor kwargs (defaults are the official ones).

    Raises
    ------
    NotImplementedError
        For an official option this implementation does not cover, naming it (``use_attn_head=True``,
        ``basis_type`` other than 'exp', ``norm_layer`` other than 'layer', ``scale``, ``atomref``,
        node attributes other than ``1x0e``, an unknown key).
    """
    for key, value in config.items():
        if key in _IGNORED_CONFIG:
            continue
        if key in _REQUIRED:
            want = _REQUIRED[key]
            same = value == want or (key == "irreps_node_attr" and o3.Irreps(value) == o3.Irreps(want))
            if not same:
                raise NotImplementedError(f"official Equiformer option {key}={value!r} is not supported")
        elif key not in _KNOWN_CONFIG:
            raise NotImplementedError(f"unknown official Equiformer option {key}={value!r}")
    irreps_in = o3.Irreps(config.get("irreps_in", "64x0e"))
    if len(irreps_in) != 1 or irreps_in[0].ir != o3.Irrep("0e"):
        raise NotImplementedError(f"official irreps_in={irreps_in} is not a one-hot of atom types")
    if "irreps_head" not in config:
        raise ValueError(
            "the official irreps_head default ('...16x1o...') is not a valid MD17 setting: give it"
        )
    kwargs: dict[str, Any] = dict(
        irreps_node_embedding=config.get("irreps_node_embedding", "128x0e+64x1e+32x2e"),
        num_layers=config.get("num_layers", 6),
        irreps_sh=config.get("irreps_sh", "1x0e+1x1e+1x2e"),
        max_radius=config.get("max_radius", 5.0),
        number_of_basis=config.get("number_of_basis", 32 if dens else 128),
        fc_neurons=list(config.get("fc_neurons", [64, 64])),
        irreps_feature=config.get("irreps_feature", "512x0e+256x1e+128x2e" if dens else "512x0e"),
        irreps_head=config["irreps_head"],
        num_heads=config.get("num_heads", 4),
        irreps_pre_attn=config.get("irreps_pre_attn", "128x0e+64x1e+32x2e" if dens else None),
        irreps_mlp_mid=config.get("irreps_mlp_mid", "128x0e+64x1e+32x2e"),
        nonlinear_message=config.get("nonlinear_message", dens),
        rescale_degree=config.get("rescale_degree", False),
        alpha_drop=config.get("alpha_drop", 0.0 if dens else 0.2),
        proj_drop=config.get("proj_drop", 0.0),
        out_drop=config.get("out_drop", 0.0),
        drop_path_rate=config.get("drop_path_rate", 0.0),
        max_atom_type=irreps_in[0].mul,
        avg_num_nodes=AVG_NUM_NODES,
        avg_degree=AVG_DEGREE,
        dens_heads=dens,
    )
    if dens:
        kwargs["irreps_force_encoding"] = config.get("irreps_equivariant_inputs", "1x0e+1x1e+1x2e")
    return Equiformer(**kwargs)


def _official_cg(model: Equiformer, state_dict: Mapping[str, Tensor]) -> dict[str, dict[tuple, Tensor]]:
    """The checkpoint's CG tensors, per dens tensor-product module and ``(l1, l2, l3)``."""
    modules = dict(model.named_modules())
    found: dict[str, dict[tuple, Tensor]] = {}
    for key, value in state_dict.items():
        match = _W3J.match(key.removeprefix("module."))
        if match is None:
            continue
        name = official_to_dens_name(match[1] + ".tp.weight").removesuffix(".weight")
        if not isinstance(modules.get(name), DepthwiseTensorProduct):
            raise ValueError(f"official buffer {key} belongs to no dens tensor product (looked for {name!r})")
        found.setdefault(name, {})[(int(match[2]), int(match[3]), int(match[4]))] = value.detach()
    return found


def _sign(key: str, theirs: Tensor, ls: tuple[int, int, int]) -> int:
    ours = o3.wigner_3j(*ls, dtype=torch.float64)
    theirs = theirs.to(torch.float64).cpu()
    if theirs.shape != ours.shape:
        raise ValueError(
            f"official CG buffer {key}{ls} has shape {tuple(theirs.shape)}, not {tuple(ours.shape)}"
        )
    if torch.allclose(theirs, ours, atol=1e-5, rtol=0):
        return 1
    if torch.allclose(theirs, -ours, atol=1e-5, rtol=0):
        return -1
    raise ValueError(f"official CG buffer {key}{ls} is neither + nor - e3nn's wigner_3j{ls}")


def _radial_of(model: Equiformer, tp_name: str) -> str:
    """The radial MLP that produces the per-edge weights of a tensor product."""
    owner = tp_name.rsplit(".", 1)[0]
    radial = owner + (".radial" if tp_name.endswith(".tp") else ".message_radial")
    if radial not in dict(model.named_modules()):
        raise ValueError(f"no radial MLP found for the tensor product {tp_name}")
    return radial


def load_official_equiformer(
    model: Equiformer, state_dict: Mapping[str, Tensor], adopt_checkpoint_cg: bool = True
) -> list[str]:
    """Load an official Equiformer v1 state_dict (optionally ``module.``-prefixed) into ``model``.

    Parameters
    ----------
    model : Equiformer
        Built for the checkpoint's configuration (:func:`equiformer_from_official_config`).
    state_dict : mapping
        The official ``state_dict()``, ``_w3j_*`` buffers included (without them the checkpoint's CG
        signs cannot be checked and e3nn >= 0.5 signs are assumed).
    adopt_checkpoint_cg : bool
        Also use the checkpoint's (sign-corrected, single-precision) CG values; the difference to dens's
        double-precision ones is below 1e-7 relative.

    Returns
    -------
    list of str
        The tensor-product paths whose weights were negated (empty for an e3nn >= 0.5 checkpoint).

    Raises
    ------
    ValueError
        Naming every official key with no dens counterpart, every dens parameter or buffer left unset,
        every shape mismatch, and CG buffers that are not e3nn's.
    """
    mapped: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        bare = key.removeprefix("module.")
        if _IGNORED.search(bare) or _W3J.match(bare):
            continue
        if bare.endswith(".tp.weight") and value.numel() == 0:
            continue  # the weights of this tensor product come from a radial MLP
        mapped[official_to_dens_name(bare)] = value.detach().clone()
    expected = model.state_dict()
    unknown = sorted(k for k in mapped if k not in expected)
    missing = sorted(k for k in expected if k not in mapped)
    if unknown or missing:
        raise ValueError(
            "official Equiformer state_dict does not match the dens model: "
            f"unknown keys (dens names) {unknown[:20]}{' ...' if len(unknown) > 20 else ''}; "
            f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}"
        )
    bad = [
        f"{k}: {tuple(v.shape)} vs dens {tuple(expected[k].shape)}"
        for k, v in mapped.items()
        if v.shape != expected[k].shape
    ]
    if bad:
        raise ValueError(f"official Equiformer state_dict has wrong shapes: {bad[:20]}")

    modules = dict(model.named_modules())
    flipped = []
    adopt: list[tuple[DepthwiseTensorProduct, tuple, Tensor]] = []
    for tp_name, tensors in _official_cg(model, state_dict).items():
        tp = modules[tp_name]
        for ls, w3j in tensors.items():
            sign = _sign(tp_name, w3j, ls)
            adopt.append((tp, ls, sign * w3j.to(torch.float64)))
            if sign == 1:
                continue
            for *_, path_ls, sl in tp.paths:
                if path_ls != ls:
                    continue
                if tp.weight is not None:
                    mapped[f"{tp_name}.weight"][sl] *= -1
                else:
                    radial = _radial_of(model, tp_name)
                    last = f"{radial}.net.{len(modules[radial].net) - 1}.weight"
                    mapped[last][sl] *= -1
                    mapped[f"{radial}.offset"][sl] *= -1
                flipped.append(f"{tp_name} {ls}")
    model.load_state_dict(mapped, strict=True)
    if adopt_checkpoint_cg:
        for tp, ls, w3j in adopt:
            tp.set_coupling(ls, w3j)
    return flipped


def _only(pairs: list[tuple[str, str]], variant: str, variants: tuple[str, ...]) -> list[tuple[str, str]]:
    """The pairs whose official name is not that of another variant (``variants``, as prefixes)."""
    return [p for p in pairs if not p[0].startswith(variants) or p[0].startswith(variant)]


def _official_module_name(name: str, model: Equiformer) -> str:
    """The official name of a dens module: the import's renames inverted, for this model's variant."""
    whole = r"(?=\.|$)"  # whole module names
    match = re.match(r"^(blocks\.\d+\.attention|noise_head)\.(.+)$", name)
    if match:
        sep = "sep_act." if dict(model.named_modules())[match[1]].nonlinear_message else "sep."
        inner = prefix_rules(_only(_ATTENTION_MODULES, sep, ("sep.", "sep_act.")), inverse=True, suffix=whole)
        name = f"{match[1]}.{apply_rules(match[2], inner)}"
    head = "energy_head." if model.has_dens_heads else "head."
    outer = [*_MODULES, *_only(_MODEL_DEPENDENT, head, ("head.", "energy_head."))]
    return apply_rules(name, prefix_rules(outer, inverse=True, suffix=whole))


def export_official_equiformer(model: Equiformer) -> dict[str, Tensor]:
    """``model``'s state under the official names, for the official code (load with ``strict=False``).

    Holds the parameters, the radial-basis buffers and dens's CG tensors in the official ``_w3j_*``
    buffers (so the official model computes what dens computes under any e3nn version); e3nn's output
    masks are not written.

    Raises
    ------
    ValueError
        For a model without an official counterpart (``attention=False`` or ``layer_norm=False``).
    """
    for module in model.modules():
        if isinstance(module, EquivariantGraphAttention) and not module.attention:
            raise ValueError("models with attention=False have no official counterpart")
    if not isinstance(model.norm, IrrepsLayerNorm):
        raise ValueError("models with layer_norm=False have no official counterpart")
    out: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        official = _official_module_name(name, model)
        own = {k: v for k, v in module.named_parameters(recurse=False)}
        own.update({k: v for k, v in module.named_buffers(recurse=False) if k in ("means", "betas")})
        for key, value in own.items():
            if isinstance(module, IrrepsLinear | DepthwiseTensorProduct) and key == "weight":
                key = "tp.weight"
            elif isinstance(module, IrrepsLinear) and key == "bias":
                key = "bias.0"
            out[f"{official}.{key}" if official else key] = value.detach().clone()
        if isinstance(module, DepthwiseTensorProduct):
            for ls in sorted({p[3] for p in module.paths}):
                if min(ls) > 0:  # e3nn keeps buffers only for paths without a scalar
                    buffer = f"{official}.tp._compiled_main_left_right._w3j_{ls[0]}_{ls[1]}_{ls[2]}"
                    out[buffer] = module.coupling(ls).detach().to(torch.float32).clone()
    return out


def load_official_equiformer_checkpoint(
    path_or_checkpoint: str | Path | Mapping[str, Any],
    preset: str | None = None,
    config: Mapping[str, Any] | None = None,
    dens: bool | None = None,
) -> Equiformer:
    """Build an :class:`Equiformer` from an official MD17 checkpoint (``{'state_dict': ...}``).

    Parameters
    ----------
    path_or_checkpoint : str, Path or mapping
        The ``.pth.tar`` file written by ``main_md17.py`` / ``main_md17_dens.py``, its loaded dict or a
        bare state_dict.
    preset : str, optional
        ``'md17_l2'`` or ``'md17_l3'`` (the paper's configurations) ...
    config : mapping, optional
        ... or the official constructor kwargs (e.g. from the training config file).
    dens : bool, optional
        A DeNS model; by default True when the checkpoint has a ``denoising_pos_head``.
    """
    ckpt = path_or_checkpoint
    if not isinstance(ckpt, Mapping):
        ckpt = torch.load(ckpt, map_location="cpu", weights_only=False)
    state_dict = ckpt.get("state_dict", ckpt)
    if dens is None:
        dens = any(k.removeprefix("module.").startswith("denoising_pos_head.") for k in state_dict)
    if (preset is None) == (config is None):
        raise ValueError("give exactly one of preset ('md17_l2' / 'md17_l3') and config")
    if preset is not None:
        if preset not in PRESETS:
            raise KeyError(f"unknown Equiformer preset {preset!r}; choose from {sorted(PRESETS)}")
        model = Equiformer.from_preset(preset, dens_heads=dens)
    else:
        model = equiformer_from_official_config(config, dens)
    load_official_equiformer(model, state_dict)
    return model


def run_equiformer_fixture(
    fixture: Mapping[str, Any], dtype: torch.dtype = torch.float64
) -> dict[str, dict[str, Tensor]]:
    """Reproduce an official Equiformer v1 fixture: ``{mode: {output key: tensor}}``.

    Builds the dens model for ``fixture['model']`` / ``fixture['config']``, imports
    ``fixture['state_dict']``, casts to ``dtype`` and runs every mode of ``fixture['inputs']`` on the
    stored edge list (edge vectors are recomputed from the positions, as the official forward does). In
    ``dens`` mode the force input ``forces_in`` (true forces, zero outside the corrupted structures) is
    encoded for the ``noise_mask`` atoms, whose ``forces`` are the noise prediction.

    float64 outputs agree with ``outputs_float64`` to round-off (about 1e-15 relative), float32 outputs
    with ``outputs`` to about 1e-6.
    """
    name = fixture["model"]
    if name not in EQUIFORMER_CLASSES:
        raise ValueError(
            f"not an official Equiformer v1 fixture: {name!r}; known: {sorted(EQUIFORMER_CLASSES)}"
        )
    model = equiformer_from_official_config(fixture["config"], EQUIFORMER_CLASSES[name])
    load_official_equiformer(model, fixture["state_dict"])
    model = model.to(dtype).eval()
    results = {}
    for mode, inputs in fixture["inputs"].items():
        pos = inputs["pos"].to(dtype)
        edge_index = inputs["edge_index"].long()
        extra, mask = None, None
        if mode != "s2ef" and model.has_dens_heads:
            mask = inputs["noise_mask"].bool()
            extra = model.force_encoder(inputs["forces_in"].to(dtype), mask)
        out = model(
            inputs["atomic_numbers"].long(),
            pos,
            inputs["batch"].long(),
            edge_index,
            torch.zeros(edge_index.shape[1], 3, dtype=dtype),
            int(inputs["natoms"].numel()),
            extra_embedding=extra,
            noise_mask=mask,
        )
        results[mode] = {k: out[k].detach() for k in fixture["outputs"][mode] if k in out}
    return results
