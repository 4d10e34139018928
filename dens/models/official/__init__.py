"""Official checkpoints: import, export and the parity check against the official fixtures.

Official EquiformerV2 / EquiformerV2+DeNS (``atomicarchitects/DeNS``), eSCN / eSCN+DeNS (OCP) and
Equiformer / Equiformer+DeNS (``atomicarchitects/equiformer``, MD17) weights map onto dens modules by
name. This module dispatches on the official class name or the dens model; each family has its own
module, and everything public is re-exported here:

- :mod:`~dens.models.official.equiformer_v2`: EquiformerV2 (config, state dict both ways, fixture runner);
- :mod:`~dens.models.official.escn`: eSCN (likewise);
- :mod:`~dens.models.official.equiformer`: Equiformer v1 (likewise, with the e3nn sign correction);
- :mod:`~dens.models.official.renames`: the name renames shared by the families, and the strict load.

fairchem 1.x checkpoints (OMat24, MPtrj, sAlex) are :mod:`dens.models.fairchem`'s.
:mod:`dens.models.convert` re-exports the public names of this module.

Examples
--------
>>> import torch
>>> from dens.models.official import load_official_checkpoint  # doctest: +SKIP
>>> model = load_official_checkpoint("eq2_83M_dens.pt")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..equiformer import Equiformer
from ..equiformer_v2 import EquiformerV2
from ..escn import ESCN
from .equiformer import (
    EQUIFORMER_CLASSES,
    equiformer_from_official_config,
    export_official_equiformer,
    load_official_equiformer,
    load_official_equiformer_checkpoint,
    official_to_dens_name,
    run_equiformer_fixture,
)
from .equiformer_v2 import (
    _EQV2_BUFFER,
    _run_equiformer_v2,
    equiformer_v2_from_official_config,
    export_official_equiformer_v2,
    import_official_equiformer_v2,
)
from .escn import (
    config_to_kwargs,
    export_official_escn,
    import_official_escn,
    load_official_escn,
    run_escn_fixture,
)
from .renames import apply_rules, load_mapped_state_dict, prefix_rules

__all__ = [
    "EQUIFORMER_CLASSES",
    "EQV2_CLASSES",
    "ESCN_CLASSES",
    "apply_rules",
    "build_official_model",
    "config_to_kwargs",
    "equiformer_from_official_config",
    "equiformer_v2_from_official_config",
    "export_official_equiformer",
    "export_official_equiformer_v2",
    "export_official_escn",
    "export_official_state_dict",
    "import_official_equiformer_v2",
    "import_official_escn",
    "import_official_state_dict",
    "load_mapped_state_dict",
    "load_official_checkpoint",
    "load_official_equiformer",
    "load_official_equiformer_checkpoint",
    "load_official_escn",
    "official_to_dens_name",
    "prefix_rules",
    "run_equiformer_fixture",
    "run_escn_fixture",
    "run_fixture",
]

# official class name -> DeNS model? (Equiformer v1's: EQUIFORMER_CLASSES)
EQV2_CLASSES = {"EquiformerV2S_OC20": False, "EquiformerV2S_OC20_DenoisingPos": True}
ESCN_CLASSES = {"eSCN": False, "eSCN_DenoisingPos": True}


def import_official_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load an official state_dict (optionally ``module.``-prefixed) into ``model``, by its family.

    Raises
    ------
    ValueError
        Naming every official key with no dens counterpart and every dens parameter left unset.
    """
    if isinstance(model, ESCN):
        import_official_escn(model, state_dict)
    elif isinstance(model, Equiformer):
        load_official_equiformer(model, state_dict)
    else:
        import_official_equiformer_v2(model, state_dict)


def export_official_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The official names of ``model``'s parameters, for use with the official code.

    The official constant buffers are not written; load the result there with ``strict=False``
    (OCP: ``task.strict_load: False``).
    """
    if isinstance(model, ESCN):
        return export_official_escn(model)
    if isinstance(model, Equiformer):
        return export_official_equiformer(model)
    return export_official_equiformer_v2(model)


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
        from ...checkpoint import load_checkpoint

        ckpt = load_checkpoint(ckpt, what="official checkpoint")  # errors name the file
    state_dict = {k.removeprefix("module."): v for k, v in ckpt.get("state_dict", ckpt).items()}
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
        # imported here: dens.models.fairchem builds on this subpackage
        from ..fairchem import run_fairchem_fixture

        return run_fairchem_fixture(fixture, dtype=dtype)
    if model_name in EQUIFORMER_CLASSES:
        return run_equiformer_fixture(fixture, dtype=dtype)
    model = build_official_model(model_name, fixture["config"])
    import_official_state_dict(model, fixture["state_dict"])
    model = model.to(dtype).eval()
    if isinstance(model, EquiformerV2):
        return _run_equiformer_v2(model, fixture, dtype)
    return run_escn_fixture(fixture, dtype=dtype, model=model)
