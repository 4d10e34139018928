"""Import and export of official eSCN / eSCN+DeNS weights, and the runner of the official fixtures.

The official modules are OCP's ``eSCN`` (``ocpmodels/models/escn/escn.py``) and DeNS's
``eSCN_DenoisingPos``. Their state-dict names map onto :class:`~dens.models.escn.ESCN` by the prefix
renames in :data:`_RENAMES`; the shapes and layouts are identical (see the module docstring of
:mod:`dens.models.escn`). The official grids are not in the state dict (they are computed lazily);
dens builds them the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..escn import ESCN
from ..so3 import edge_frames_official
from .renames import apply_rules, prefix_rules

__all__ = [
    "config_to_kwargs",
    "export_official_escn",
    "import_official_escn",
    "load_official_escn",
    "run_escn_fixture",
]

_OUTPUT_KEYS = ("energy", "node_energy", "forces", "force_head", "noise_head")

# (official, dens) names, applied in order (see dens.models.official.renames: {n} a layer index, $ the key's end);
# the import and the export rules are both derived from this one list.
_NAMES: list[tuple[str, str]] = [
    ("layer_blocks.{n}.message_block.edge_block.", "layers.{n}.message.edge."),
    ("layer_blocks.{n}.message_block.so2_block_source.", "layers.{n}.message.so2_source."),
    ("layer_blocks.{n}.message_block.so2_block_target.", "layers.{n}.message.so2_target."),
    ("layer_blocks.{n}.", "layers.{n}."),
    ("sphharm_weights.0$", "sphharm_weights$"),
    ("force_embedding.weight$", "force_encoder.linear.weight$"),
    ("force_embedding.bias$", "force_encoder.linear.bias$"),
]
_RENAMES = prefix_rules(_NAMES)
_INVERSE_RENAMES = prefix_rules(_NAMES, inverse=True)
# Official constant buffer that dens rebuilds instead of loading (checked on import).
_EXPAND_INDEX_KEY = "force_embedding.expand_index"

# Official constructor keys that only concern the graph builder or logging (the model takes a graph).
_IGNORED_CONFIG_KEYS = {
    "num_atoms",
    "bond_feat_dim",
    "num_targets",
    "use_pbc",
    "otf_graph",
    "show_timing_info",
}
_PLAIN_CONFIG_KEYS = {
    "num_layers",
    "sphere_channels",
    "hidden_channels",
    "edge_channels",
    "num_sphere_samples",
    "cutoff",
    "max_neighbors",
    "max_num_elements",
    "basis_width_scalar",
    "distance_resolution",
    "regress_forces",
}


def config_to_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Translate the official eSCN constructor kwargs into :class:`ESCN` kwargs.

    Raises
    ------
    ValueError
        For unknown keys, several resolutions (``lmax_list`` of length > 1), ``use_grid=False`` or a
        distance function other than 'gaussian' (not implemented).
    """
    kwargs: dict[str, Any] = {}
    unknown = []
    for key, value in config.items():
        if key in _IGNORED_CONFIG_KEYS:
            continue
        if key in _PLAIN_CONFIG_KEYS:
            kwargs[key] = value
        elif key == "use_force_encoding":  # only the DeNS class has it: encode forces or not, noise head kept
            kwargs["dens_heads"], kwargs["encode_forces"] = True, bool(value)
        elif key in ("lmax_list", "mmax_list"):
            if len(value) != 1:
                raise ValueError(f"only one resolution is implemented, got {key}={list(value)}")
            kwargs[key[:4]] = int(value[0])
        elif key == "use_grid":
            if not value:
                raise ValueError("only the grid version of eSCN (use_grid=True) is implemented")
        elif key == "distance_function":
            if value != "gaussian":
                raise ValueError(f"only distance_function='gaussian' is implemented, got {value!r}")
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown eSCN config keys: {sorted(unknown)}")
    return kwargs


def load_official_escn(state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> ESCN:
    """Build an :class:`ESCN` from an official config and load an official state dict into it.

    Parameters
    ----------
    state_dict : Mapping[str, Tensor]
        Official ``eSCN`` / ``eSCN_DenoisingPos`` state dict; an optional ``module.`` prefix (DDP) is
        stripped.
    config : Mapping[str, Any]
        Official constructor kwargs (see :func:`config_to_kwargs`).

    Returns
    -------
    ESCN
        The model in float32 with the official weights (frozen ``sphere_points`` / ``sphharm_weights``
        included).

    Raises
    ------
    ValueError
        Naming every official key that has no place in the model, every model entry left unset, and
        every shape mismatch.
    """
    model = ESCN(**config_to_kwargs(config))
    import_official_escn(model, state_dict)
    return model


def import_official_escn(model: ESCN, state_dict: Mapping[str, Tensor]) -> None:
    """Load an official state dict into an existing :class:`ESCN` (see :func:`load_official_escn`)."""
    target = model.state_dict()
    mapped: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key == _EXPAND_INDEX_KEY and model.force_encoder is not None:
            expected = model.force_encoder.linear.expand_index
            if not torch.equal(value.cpu(), expected.cpu()):
                raise ValueError(f"{key} differs from the degree index dens uses")
            continue
        name = apply_rules(key, _RENAMES)
        if name not in target:
            unknown.append(key)
            continue
        mapped[name] = value
    missing = sorted(set(target) - set(mapped))
    bad_shapes = [
        f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in mapped.items()
        if tuple(v.shape) != tuple(target[k].shape)
    ]
    if unknown or missing or bad_shapes:
        raise ValueError(
            "official eSCN state dict does not match the model: "
            f"unknown keys {sorted(unknown)}; missing keys {missing}; shape mismatches {bad_shapes}"
        )
    model.load_state_dict(mapped, strict=True)


def export_official_escn(model: ESCN) -> dict[str, Tensor]:
    """The official state dict of ``model`` (inverse of :func:`load_official_escn`).

    The result loads into the official module with ``strict=True``: it also has the official
    ``force_embedding.expand_index`` buffer of DeNS models.
    """
    out: dict[str, Tensor] = {}
    for name, value in model.state_dict().items():
        out[apply_rules(name, _INVERSE_RENAMES)] = value.detach().clone()
    if model.force_encoder is not None:
        out[_EXPAND_INDEX_KEY] = model.force_encoder.linear.expand_index.detach().clone().cpu()
    return out


def run_escn_fixture(
    fixture: Mapping[str, Any], dtype: torch.dtype = torch.float64, model: ESCN | None = None
) -> dict[str, dict[str, Tensor]]:
    """Run the model of an official eSCN fixture on every one of its modes.

    Builds the model from ``fixture['config']``, imports ``fixture['state_dict']``, casts to ``dtype``
    and runs each mode of ``fixture['inputs']`` on the stored graph with the official edge frames
    (built from the stored ``edge_rand`` exactly as the official code builds them).

    DeNS models read ``forces_in`` and ``noise_mask``: the force encoding is
    ``force_encoder(forces_in, noise_mask)`` (all atoms if there is no mask); in modes without
    ``forces_in`` (S2EF) the model adds only the encoder's ``l = 0`` bias, as officially.
    The returned ``forces`` are the noise head on corrupted atoms and the force head elsewhere (the
    noise head everywhere when no mask is given; the force head in S2EF mode).

    Returns
    -------
    dict[str, dict[str, Tensor]]
        Per mode, the outputs under the fixture's own keys (those of ``fixture['outputs'][mode]`` among
        ``energy``, ``node_energy``, ``forces``, ``force_head`` and ``noise_head``).
    """
    if model is None:
        model = load_official_escn(fixture["state_dict"], fixture["config"])
    model = model.to(dtype).eval()
    results: dict[str, dict[str, Tensor]] = {}
    for mode, inputs in fixture["inputs"].items():
        edge_vec = inputs["edge_distance_vec"].to(dtype)
        helper = fixture["edge_frames"][mode]["edge_rand"].to(dtype) - 0.5
        frames = edge_frames_official(edge_vec, helper)
        num_atoms = inputs["atomic_numbers"].shape[0]
        denoising = "forces_in" in inputs
        mask = inputs.get("noise_mask")
        # S2EF mode of a DeNS model: extra=None makes the model add the encoder's l = 0 bias.
        extra, noise_mask = None, None
        if model.force_encoder is not None and denoising:
            extra = model.force_encoder(inputs["forces_in"].to(dtype), mask)
            noise_mask = mask if mask is not None else torch.ones(num_atoms, dtype=torch.bool)
        with torch.no_grad():
            out = model.forward_edges(
                inputs["atomic_numbers"],
                inputs["edge_index"],
                edge_vec,
                inputs["batch"],
                num_graphs=int(inputs["natoms"].numel()),
                extra_embedding=extra,
                edge_frames=frames,
                noise_mask=noise_mask,
            )
        available = {k: v for k, v in out.items() if k in _OUTPUT_KEYS}
        wanted = fixture.get("outputs", {}).get(mode, available)
        results[mode] = {k: available[k] for k in wanted if k in available}
    return results
