"""Import and export of official checkpoints, and the parity check against official fixtures.

Official EquiformerV2 / EquiformerV2+DeNS (``atomicarchitects/DeNS``) and eSCN / eSCN+DeNS (OCP) weights
map onto dens modules by name. dens stores no constant buffers (grids, index maps, Clebsch-Gordan-free
Wigner matrices are computed), so the official buffers are checked when present and otherwise ignored.

Examples
--------
>>> import torch
>>> from dens.models.convert import load_official_checkpoint  # doctest: +SKIP
>>> model = load_official_checkpoint("eq2_83M_dens.pt")  # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._official_equiformer import (
    EQUIFORMER_CLASSES,
    equiformer_from_official_config,
    export_official_equiformer,
    load_official_equiformer,
    run_equiformer_fixture,
)
from ._official_escn import config_to_kwargs, export_official_escn, import_official_escn, run_escn_fixture
from .equiformer import Equiformer
from .equiformer_v2 import AVG_DEGREE, EquiformerV2
from .escn import ESCN
from .s2 import SphereGrid
from .so3 import edge_frames_official

__all__ = [
    "equiformer_v2_from_official_config",
    "export_official_state_dict",
    "import_official_state_dict",
    "load_official_checkpoint",
    "run_fixture",
]

EQV2_CLASSES = {"EquiformerV2S_OC20": False, "EquiformerV2S_OC20_DenoisingPos": True}
ESCN_CLASSES = {"eSCN": False, "eSCN_DenoisingPos": True}

# Official constant buffers of EquiformerV2 that dens computes instead of storing.
_EQV2_BUFFER = re.compile(
    r"(^|\.)(mappingReduced|SO3_rotation|SO3_grid)\.|(^|\.)(expand_index|balance_degree_weight)$"
)

# Official options that the paper's configurations fix; anything else is not implemented.
_EQV2_REQUIRED = {
    "use_pbc": None,
    "regress_forces": None,
    "otf_graph": None,
    "max_neighbors": None,
    "enforce_max_neighbors_strictly": None,
    "num_sphere_samples": None,
    "num_distance_basis": None,
    "weight_init": None,
    "use_energy_lin_ref": False,
    "load_energy_lin_ref": False,
    "use_atom_edge_embedding": True,
    "share_atom_edge_embedding": False,
    "use_m_share_rad": False,
    "distance_function": "gaussian",
    "attn_activation": "silu",
    "ffn_activation": "silu",
    "use_tp_reparam": False,
    "use_s2_act_attn": False,
    "use_attn_renorm": True,
    "use_gate_act": False,
    "use_grid_mlp": True,
    "use_sep_s2_act": True,
    "use_force_encoding": None,
    "use_noise_schedule_sigma_encoding": False,
}


def equiformer_v2_from_official_config(
    config: Mapping[str, Any], dens: bool, **overrides: Any
) -> EquiformerV2:
    """Build :class:`EquiformerV2` from an official constructor-kwargs dict (``overrides``: further
    :class:`EquiformerV2` arguments, e.g. a stress head).

    Raises
    ------
    NotImplementedError
        For an option the paper's configurations do not use (multi-resolution ``lmax_list``, gate
        activation, ...), naming it.
    """
    for key, value in config.items():
        if key in _EQV2_REQUIRED:
            if _EQV2_REQUIRED[key] is not None and value != _EQV2_REQUIRED[key]:
                raise NotImplementedError(f"official EquiformerV2 option {key}={value!r} is not supported")
    lmax_list, mmax_list = list(config.get("lmax_list", [6])), list(config.get("mmax_list", [2]))
    if len(lmax_list) != 1 or len(mmax_list) != 1:
        raise NotImplementedError(f"multi-resolution lmax_list={lmax_list} is not supported")
    return EquiformerV2(
        num_layers=config.get("num_layers", 12),
        lmax=lmax_list[0],
        mmax=mmax_list[0],
        sphere_channels=config.get("sphere_channels", 128),
        attn_hidden_channels=config.get("attn_hidden_channels", 128),
        num_heads=config.get("num_heads", 8),
        attn_alpha_channels=config.get("attn_alpha_channels", 32),
        attn_value_channels=config.get("attn_value_channels", 16),
        ffn_hidden_channels=config.get("ffn_hidden_channels", 512),
        edge_channels=config.get("edge_channels", 128),
        norm_type=config.get("norm_type", "rms_norm_sh"),
        grid_resolution=config.get("grid_resolution", 18),
        max_num_elements=config.get("max_num_elements", 90),
        cutoff=config.get("max_radius", 12.0),
        num_distance_basis=600,  # hard-coded in the official model; its num_distance_basis is unused
        alpha_drop=config.get("alpha_drop", 0.1),
        drop_path_rate=config.get("drop_path_rate", 0.05),
        proj_drop=config.get("proj_drop", 0.0),
        avg_num_nodes=config.get("avg_num_nodes", 77.81317),
        avg_degree=config.get("avg_degree", AVG_DEGREE),
        # official use_force_encoding=False (Table 6, Index 3): the noise head without a force encoder
        dens_heads=dens,
        encode_forces=bool(config.get("use_force_encoding", True)),
        **overrides,
    )


def _strip_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def _adopt_official_grids(model: EquiformerV2, buffers: dict[str, Tensor]) -> None:
    """Use the checkpoint's grid matrices where it has them (they share storage across blocks)."""
    grids = {}
    for key, value in buffers.items():
        match = re.search(r"SO3_grid\.(\d+)\.(\d+)\.(to|from)_grid_mat$", key)
        if match is not None:
            grids.setdefault((int(match[1]), int(match[2])), {})[match[3]] = value
    for module in model.modules():
        pair = grids.get((module.lmax, module.mmax)) if isinstance(module, SphereGrid) else None
        if pair is not None and len(pair) == 2:
            module.load_official(pair["to"], pair["from"])


def import_official_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load an official EquiformerV2 state_dict (optionally ``module.``-prefixed) into ``model``.

    Raises
    ------
    ValueError
        Naming every official key with no dens counterpart and every dens parameter left unset.
    """
    if isinstance(model, ESCN):
        import_official_escn(model, state_dict)
        return
    if isinstance(model, Equiformer):
        load_official_equiformer(model, state_dict)
        return
    official = _strip_prefix(state_dict)
    buffers = {k: v for k, v in official.items() if _EQV2_BUFFER.search(k)}
    _adopt_official_grids(model, buffers)
    mapped = {}
    for key, value in official.items():
        if key in buffers or key == "force_embedding.expand_index":
            continue
        mapped[key.replace("force_embedding.", "force_encoder.linear.", 1)] = value
    load_mapped_state_dict(model, mapped, "official")


def load_mapped_state_dict(
    model: nn.Module, mapped: Mapping[str, Tensor], source: str, unknown: list[str] | None = None
) -> None:
    """Load a state dict already renamed to ``model``'s names, strictly, with errors that list the keys.

    ``source`` names where it came from (``official``, ``fairchem``); ``unknown``: keys the renaming could
    not place, reported with the rest.
    """
    expected = model.state_dict()
    unknown = list(unknown or []) + sorted(set(mapped) - set(expected))
    missing = sorted(set(expected) - set(mapped))
    if unknown or missing:
        raise ValueError(
            f"{source} state_dict does not match the dens model: unknown keys {unknown[:20]}"
            f"{' ...' if len(unknown) > 20 else ''}, missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}"
        )
    for key, value in mapped.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{source} {key} has shape {tuple(value.shape)}, dens expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(mapped, strict=True)


def export_official_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The official names of ``model``'s parameters, for use with the official code.

    The official constant buffers are not written; load the result there with ``strict=False``
    (OCP: ``task.strict_load: False``).
    """
    if isinstance(model, ESCN):
        return export_official_escn(model)
    if isinstance(model, Equiformer):
        return export_official_equiformer(model)
    return {
        k.replace("force_encoder.linear.", "force_embedding.", 1): v.detach().clone()
        for k, v in model.state_dict().items()
    }


def load_official_checkpoint(
    path_or_checkpoint: str | Path | Mapping[str, Any],
    model_name: str | None = None,
    config: Mapping[str, Any] | None = None,
    use_ema: bool = True,
) -> nn.Module:
    """Build a dens model from an official checkpoint file (or its loaded dict).

    Parameters
    ----------
    path_or_checkpoint : str, Path or dict
        An OCP/DeNS checkpoint (``state_dict``, ``config``, optional ``ema``), or a bare state_dict.
    model_name, config : optional
        Official class name and constructor kwargs; read from ``checkpoint['config']['model']`` when
        absent.
    use_ema : bool
        Use the EMA weights when the checkpoint holds them (``ema.shadow_params``, in parameter order).
    """
    ckpt = path_or_checkpoint
    if not isinstance(ckpt, Mapping):
        from ..checkpoint import load_checkpoint

        ckpt = load_checkpoint(ckpt, what="official checkpoint")  # errors name the file
    state_dict = _strip_prefix(ckpt.get("state_dict", ckpt))
    if config is None or model_name is None:
        model_cfg = dict(ckpt.get("config", {}).get("model", {}))
        if not model_cfg:
            raise ValueError("the checkpoint has no config['model']: pass model_name and config")
        model_name = model_name or model_cfg.pop("name")
        config = config or model_cfg
    model = build_official_model(model_name, config)
    ema = ckpt.get("ema") if use_ema else None
    if ema and "shadow_params" in ema:
        param_keys = [k for k in state_dict if not _EQV2_BUFFER.search(k) and not k.endswith(("offset",))]
        if len(param_keys) != len(ema["shadow_params"]):
            raise ValueError(
                f"EMA has {len(ema['shadow_params'])} tensors but the state_dict {len(param_keys)} parameters"
            )
        state_dict = {**state_dict, **dict(zip(param_keys, ema["shadow_params"], strict=True))}
    import_official_state_dict(model, state_dict)
    return model


def build_official_model(model_name: str, config: Mapping[str, Any]) -> nn.Module:
    """The dens model for an official class name and its constructor kwargs."""
    if model_name in EQV2_CLASSES:
        return equiformer_v2_from_official_config(config, EQV2_CLASSES[model_name])
    if model_name in ESCN_CLASSES:
        kwargs = config_to_kwargs(config)
        kwargs["dens_heads"] = ESCN_CLASSES[model_name]  # the DeNS classes have the noise head either way
        return ESCN(**kwargs)
    if model_name in EQUIFORMER_CLASSES:
        return equiformer_from_official_config(config, EQUIFORMER_CLASSES[model_name])
    known = sorted(EQV2_CLASSES) + sorted(ESCN_CLASSES) + sorted(EQUIFORMER_CLASSES)
    raise ValueError(f"unknown official model {model_name!r}; known: {known}")


def _edge_shift(inputs: Mapping[str, Tensor], dtype: torch.dtype) -> Tensor:
    """``n @ cell`` of each edge's source image (zeros for molecules)."""
    num_edges = inputs["edge_index"].shape[1]
    if "cell_offsets" not in inputs or "cell" not in inputs:
        return torch.zeros(num_edges, 3, dtype=dtype)
    src = inputs["edge_index"][0]
    cell = inputs["cell"].to(dtype)[inputs["batch"][src]]
    return torch.einsum("ei,eij->ej", inputs["cell_offsets"].to(dtype), cell)


def _run_equiformer_v2(model: EquiformerV2, fixture: Mapping[str, Any], dtype: torch.dtype) -> dict:
    results = {}
    for mode, inputs in fixture["inputs"].items():
        pos = inputs["pos"].to(dtype)
        edge_index = inputs["edge_index"]
        shift = _edge_shift(inputs, dtype)
        edge_vec = pos[edge_index[0]] + shift - pos[edge_index[1]]
        if not torch.allclose(edge_vec, inputs["edge_distance_vec"].to(dtype), atol=1e-4):
            raise ValueError(f"fixture mode {mode!r}: edge vectors do not follow pos[j] + n @ cell - pos[i]")
        # The fixtures' float32 references took the stored float64 edge vectors rounded to float32
        # (`.float()`), while pos[j] + shift - pos[i] from float32 positions (|pos| up to ~12 Å) rounds
        # them by up to ~1e-6 Å, which alone doubles the float32 force error (fairchem fixtures: 1.8e-5
        # -> 8.3e-6 of the largest force; fairchem's own float32 vs float64 gap is 4.2e-6). The model reads
        # positions only through edge vectors, so feed the stored ones exactly: zero positions, the
        # vectors as shifts (float64: the same vectors to round-off).
        pos, shift = torch.zeros_like(pos), inputs["edge_distance_vec"].to(dtype)
        edge_vec = shift
        frames = edge_frames_official(edge_vec, fixture["edge_frames"][mode]["edge_rand"].to(dtype) - 0.5)
        extra, mask = None, None
        if mode != "s2ef" and model.has_dens_heads:
            forces = inputs["forces_in"].to(dtype)
            mask = inputs.get("noise_mask") if mode == "dens" else torch.ones(len(pos), dtype=torch.bool)
            extra = model.force_encoder(forces, None if mode == "dens_all" else mask)
        with torch.no_grad():
            out = model(
                inputs["atomic_numbers"].long(),
                pos,
                inputs["batch"],
                edge_index,
                shift,
                int(inputs["natoms"].numel()),
                extra_embedding=extra,
                edge_frames=frames,
                noise_mask=mask,
            )
        results[mode] = {k: out[k] for k in fixture["outputs"][mode] if k in out}
    return results


def run_fixture(
    fixture: Mapping[str, Any], dtype: torch.dtype = torch.float64
) -> dict[str, dict[str, Tensor]]:
    """Reproduce an official fixture with the dens model: ``{mode: {output key: tensor}}``.

    Builds the dens model for ``fixture['model']`` and ``fixture['config']``, imports
    ``fixture['state_dict']``, casts to ``dtype`` and runs every mode of ``fixture['inputs']`` on the
    fixture's explicit graph with its recorded edge frames (``fixture['edge_frames']``).

    In float64 the outputs agree with ``outputs_float64`` to about 1e-9 of their largest magnitude;
    in float32 with ``outputs`` to the official float32 error (see the fixtures' README).
    """
    model_name = fixture["model"]
    if isinstance(model_name, Mapping):  # fairchem hydra fixtures name their backbone and heads
        from .fairchem import run_fairchem_fixture

        return run_fairchem_fixture(fixture, dtype=dtype)
    if model_name in EQUIFORMER_CLASSES:
        return run_equiformer_fixture(fixture, dtype=dtype)
    model = build_official_model(model_name, fixture["config"])
    import_official_state_dict(model, fixture["state_dict"])
    model = model.to(dtype).eval()
    if isinstance(model, EquiformerV2):
        return _run_equiformer_v2(model, fixture, dtype)
    return run_escn_fixture(fixture, dtype=dtype, model=model)
