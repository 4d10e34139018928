"""Official EquiformerV2 / EquiformerV2+DeNS weights: config translation, state-dict import/export, fixture runner.

The official modules are ``EquiformerV2S_OC20`` and ``EquiformerV2S_OC20_DenoisingPos`` of
``atomicarchitects/DeNS``. Their parameter names are dens's but for the force encoder
(``force_embedding.* -> force_encoder.linear.*``). dens computes the official constant buffers (grids,
index maps, Wigner matrices) instead of storing them: the import adopts a checkpoint's grid matrices
(:func:`_adopt_official_grids`) and skips the rest; the export writes none.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..equiformer_v2 import AVG_DEGREE, EquiformerV2
from ..s2 import SphereGrid
from ..so3 import edge_frames_official
from .renames import load_mapped_state_dict

__all__ = [
    "equiformer_v2_from_official_config",
    "export_official_equiformer_v2",
    "import_official_equiformer_v2",
]

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


def import_official_equiformer_v2(model: EquiformerV2, state_dict: Mapping[str, Tensor]) -> None:
    """Load an official EquiformerV2 state_dict (optionally ``module.``-prefixed) into ``model``.

    Raises
    ------
    ValueError
        Naming every official key with no dens counterpart and every dens parameter left unset.
    """
    official = {k.removeprefix("module."): v for k, v in state_dict.items()}
    buffers = {k: v for k, v in official.items() if _EQV2_BUFFER.search(k)}
    _adopt_official_grids(model, buffers)
    mapped = {}
    for key, value in official.items():
        if key in buffers or key == "force_embedding.expand_index":
            continue
        mapped[key.replace("force_embedding.", "force_encoder.linear.", 1)] = value
    load_mapped_state_dict(model, mapped, "official")


def export_official_equiformer_v2(model: EquiformerV2) -> dict[str, Tensor]:
    """The official names of ``model``'s parameters (inverse of :func:`import_official_equiformer_v2`).

    The official constant buffers are not written; load the result there with ``strict=False``
    (OCP: ``task.strict_load: False``).
    """
    return {
        k.replace("force_encoder.linear.", "force_embedding.", 1): v.detach().clone()
        for k, v in model.state_dict().items()
    }


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
